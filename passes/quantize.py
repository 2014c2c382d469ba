"""Insert weight and activation quantizers on every selected linear-like node (round-to-nearest).

Matches   linear(x, W[, b]), addmm(b, x, W'), mm(x, W'), matmul(x, W') with W a 2-D parameter; stacked MoE
          expert weights W[E, out, in] (or [E, in, out]) where a grouped/batched matmul consumes them
          (qpass.experts: per-expert scales, keyed <experts module>.<parameter>); routers (linears feeding a
          top-k) stay float unless `routers: true`
Changes   (quantizers inserted with qpass.quantizer.insert_quantizer, metadata a QuantMeta)
          W -> qpass.fake_quantize(W, scale, zero_point, block, fmt)           (min-max scales, or weight_clip's)
          x -> qpass.fake_quantize_dynamic(x, block, fmt, symmetric[, clip_ratio]) (dynamic activations)
            or qpass.fake_quantize(x, scale, zero_point, block, fmt)           (static, from observers)
          tied_embedding: shared (a linear whose weight an embedding lookup also reads: tie_word_embeddings)
          embedding(W, ids) -> embedding(Wq, ids), Wq the linear's own weight quantizer node (one node, one
          set of scales: the lookup reads dequantized rows of the same integer codes; backends store one
          integer copy and no float table)
Requires  calibration data for static activations (one run for all observed inputs)
Preserves nothing (adds nodes and buffers)

One quantizer node per consumer: q/k/v reading the same input each get their own activation quantizer,
which is what backends need to fuse each linear on its own.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch.fx import GraphModule, Node

from qpass.analyses import LinearSites, Observed
from qpass.errors import QuantizationError, RecipeError
from qpass.experts import ExpertSite, expert_sites, routers, weight_block
from qpass.experts import weight_quantizer as expert_weight_quantizer
from qpass.graph import LinearSite, describe, is_quantizer, linear_sites, module_path, param_of, select, site_key
from qpass.patterns import storage_twins
from qpass.pass_infra import Context, Pass, PassResult
from qpass.plan import Plan, PlanError, SiteIndex, build, occurrences
from qpass.primitives import OBSERVERS, choose_qparams
from qpass.primitives.gptq import clipped_qparams
from qpass.quantizer import NO_SIDE, QuantMeta, ScaleQuant, SideChannels, insert_quantizer
from qpass.primitives.spec import IntFormat, PerChannel, PerGroup, PerHead, PerTensor, PerToken, QSpec


@dataclass(frozen=True)
class ObserverConfig:
    """How static scales are estimated from calibration data."""

    kind: Literal["minmax", "moving_average", "percentile", "mse"] = "minmax"
    percentile: float = 99.99
    averaging_constant: float = 0.01

    def __post_init__(self):
        if not 0.0 < self.percentile <= 100.0:
            raise RecipeError("percentile", f"must be in (0, 100], got {self.percentile}")
        if not 0.0 < self.averaging_constant <= 1.0:
            raise RecipeError("averaging_constant", f"must be in (0, 1], got {self.averaging_constant}")

    def make(self, spec: QSpec):
        kwargs = {"moving_average": {"averaging_constant": self.averaging_constant},
                  "percentile": {"percentile": self.percentile}}.get(self.kind, {})
        return OBSERVERS[self.kind](spec, **kwargs)


@dataclass(frozen=True)
class DoubleQuantConfig:
    """Second-level quantization of the weight scales (QLoRA's double quantization): the first-level scales of
    each weight, flattened in row order, are quantized in blocks of `block` to `format` (symmetric, absmax)."""

    format: str = "int8"
    block: int = 256

    def __post_init__(self):
        from qpass.primitives.formats import get_format

        try:
            f = get_format(self.format)
        except (KeyError, ValueError) as e:
            raise RecipeError("format", f"unknown format {self.format!r} for the scales ({e})") from None
        if f.kind not in ("int", "float") or f.bits < 4:
            raise RecipeError("format", f"scales are quantized to an int or float format of 4+ bits, got {self.format}")
        if not 1 <= self.block <= 1 << 16:
            raise RecipeError("block", f"must be in [1, 65536], got {self.block}")


@dataclass(frozen=True)
class QuantizeConfig:
    name: ClassVar[str] = "quantize"
    field_docs: ClassVar[dict] = {
        "weights": "weight quantizer (null: keep weights in float); scales from min-max (or weight_clip)",
        "weight_clip": "each weight row's (group's) scale from its min-max range shrunk by the ratio (1, 0.99, .., "
                       "0.21) that minimises sum |q(w) - w|^2.4 (GPTQ's Quantizer(mse=True), QuaRot's --w_clip for "
                       "RTN); false: min-max",
        "activations": "input quantizer of each linear (null: none); dynamic per_token or static per_tensor",
        "targets": "module-path globs to quantize",
        "ignore": "module-path globs to leave in float (a bare name matches as a suffix: lm_head)",
        "observer": "static activation scale estimator: {kind: minmax|moving_average|percentile|mse, ...}",
        "double_quant": "quantize the weight scales too (QLoRA): {format: int8 or fp8_e4m3, block: 256}; null: "
                        "fp16 scales",
        "routers": "also quantize MoE routers (linears whose output feeds a top-k expert selection); default: "
                   "kept float and reported",
        "tied_embedding": "a quantized linear whose weight an embedding lookup also reads (tied lm_head, "
                          "tie_word_embeddings): 'float' quantizes the linear's use only (the lookup reads the "
                          "float table, stored beside the integer copy); 'shared' makes the lookup read the same "
                          "quantized table (one integer copy, the float table goes; the embeddings change too). "
                          "On a model without a tied pair 'shared' changes nothing (a report line says so); on a "
                          "tied model whose tied linear this pass does not quantize it is an error",
    }

    weights: QSpec | None = QSpec(IntFormat(8), PerChannel(0))
    activations: QSpec | None = None
    weight_clip: bool = False
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ()
    observer: ObserverConfig = field(default_factory=ObserverConfig)
    double_quant: DoubleQuantConfig | None = None
    routers: bool = False
    tied_embedding: Literal["float", "shared"] = "float"

    def __post_init__(self):
        w, a = self.weights, self.activations
        if self.tied_embedding == "shared" and w is None:
            raise RecipeError("tied_embedding", "'shared' gives the embedding lookup the tied linear's quantized "
                              "weight: needs weights (not null) in this pass")
        if self.weight_clip and (w is None or w.format.kind != "int" or w.full_range or w.scale_pow2):
            raise RecipeError("weight_clip", "searches a clipping ratio for integer weight scales (min-max ones: "
                              "without full_range or scale_pow2); needs weights with an int format")
        if self.double_quant is not None and (w is None or isinstance(w.granularity, PerTensor)):
            raise RecipeError("double_quant", "quantizes the weight scales: needs weights with per_channel or "
                              "per_group scales")
        if w is not None:
            if w.dynamic:
                raise RecipeError("weights.dynamic", "weights are quantized once, offline; set dynamic: false")
            if isinstance(w.granularity, (PerToken, PerHead)):
                raise RecipeError("weights.granularity", "weights take per_tensor, per_channel or per_group")
            if getattr(w.granularity, "axis", 0) not in (0, 1, -1, -2):
                raise RecipeError("weights.axis", "a weight is [out, in]: axis is 0 (out) or 1 (in)")
        if a is not None:
            if isinstance(a.granularity, PerHead):
                raise RecipeError("activations.granularity", "per_head is for the KV cache (kv_cache pass)")
            if not a.dynamic and not isinstance(a.granularity, (PerTensor, PerChannel)):
                raise RecipeError("activations.granularity", "static activation scales are per_tensor or "
                                  "per_channel (axis -1); use dynamic: true for per_token / per_group")
            if isinstance(a.granularity, (PerChannel, PerGroup)) and a.granularity.axis != -1:
                raise RecipeError("activations.axis", "activation channels are the last axis: use axis: -1")
        if not self.targets:
            raise RecipeError("targets", "must list at least one module-path glob (e.g. ['*'])")


@dataclass(frozen=True)
class Quantize(Pass):
    """Insert round-to-nearest weight quantizers and dynamic or static activation quantizers on linears."""

    config: QuantizeConfig = QuantizeConfig()
    name: ClassVar[str] = "quantize"

    def run(self, gm: GraphModule, ctx: Context) -> PassResult:
        cfg = self.config
        router = set() if cfg.routers else set(routers(gm))
        sites = [*ctx.get(LinearSites(), gm), *expert_sites(gm)]
        chosen = select([site_key(s) for s in sites], cfg.targets, cfg.ignore, "quantize")
        at = dict(zip((s.node for s in sites), occurrences(site_key(s) for s in sites)))
        todo = [s for s in sites if site_key(s) in chosen and site_key(s) not in router]
        skipped = [f"{site_key(s)}: excluded by targets/ignore" for s in sites if site_key(s) not in chosen]
        skipped += [f"{p}: MoE router (its output selects experts: top-k) kept float; routers: true quantizes it"
                    for p in sorted(router & chosen)]
        experts = [s for s in todo if isinstance(s, ExpertSite)]
        if experts and cfg.double_quant is not None:
            raise QuantizationError(f"double_quant does not take stacked expert weights ({experts[0].key})",
                                    fix="ignore the experts in this pass (ignore: ['*.experts.*'])")
        _refuse_double_quantization(gm, [s for s in todo if not isinstance(s, ExpertSite)], cfg)
        for s in experts:
            if cfg.weights is not None and expert_weight_quantizer(s) is not None:
                raise QuantizationError(f"the expert weights {s.key} are already quantized by an earlier pass",
                                        fix="set weights: null in this quantize pass, or ignore '*.experts.*'")
        tied = _tied_embeddings(gm, sites, todo, cfg) if cfg.tied_embedding == "shared" else {}
        if cfg.tied_embedding == "shared" and not tied:
            skipped.append("tied_embedding: shared: no embedding lookup reads a weight this pass quantizes (the "
                           "model's embeddings are not tied): nothing to share, the embedding stays float")
        act_qparams = self._static_activation_qparams(gm, ctx, todo)
        items = []
        for site in todo:
            for role, spec in (("weight", cfg.weights), ("input", cfg.activations)):
                if spec is None:
                    continue
                block, tensors = (self._weight_qparams(gm, site, spec, ctx) if role == "weight" else
                                  (spec.block_size(site.input.meta["val"].shape),
                                   _qparam_dict(act_qparams.get(site.input.name))))
                items.append((QuantMeta(role, "", site_key(site), spec), block, tensors, at[site.node]))
        dq = cfg.double_quant
        if dq is not None:
            for meta, _, tensors, _ in items:
                if meta.role == "weight":
                    tensors["scale_scale"] = _scale_of_scales(tensors["scale"], dq)
        decisions = {"double_quant": {"format": dq.format, "block": dq.block}} if dq is not None else {}
        if tied:
            decisions["tied_embedding"] = tied
        plan = build(self.name, items, decisions=decisions)
        self.apply(gm, plan)
        stats = {"linears": len(todo) - len(experts), "weights_quantized": len(todo) if cfg.weights else 0,
                 "inputs_quantized": len(todo) if cfg.activations else 0, "skipped": len(skipped)}
        if cfg.tied_embedding == "shared":
            stats["tied_embeddings_shared"] = sum(len(v) for v in tied.values())
        if experts or router:
            stats.update(expert_weights=len(experts), experts=sum(s.experts for s in experts),
                         routers_float=len(router & chosen))
        return PassResult(modified=bool(items), stats=stats, near_misses=skipped, plan=plan)

    @classmethod
    def apply(cls, gm: GraphModule, plan: Plan) -> None:
        """Insert the plan's quantizers on the linears it names (module path and occurrence): weight
        quantizers on the weight as the matmul consumes it, input quantizers on that linear's input only."""
        sites = [*linear_sites(gm), *expert_sites(gm)]
        index = SiteIndex(sites)
        tied = plan.decisions.get("tied_embedding", {})
        twins = storage_twins(gm) if tied else {}
        for qp, t in zip(plan.quantizers, plan.tensors()):
            site = index.quantized(qp)
            meta = dataclasses.replace(qp.meta, site=site.node.name, path=site_key(site))
            if isinstance(site, ExpertSite) and meta.role == "weight":   # on the stacked parameter, every use
                w, first = site.weight, min(site.weight.users, key=_order(gm))
                q = insert_quantizer(gm, first, w, meta, block=list(qp.block), scale=t.get("scale"),
                                     zero_point=t.get("zero_point"), name=f"{w.target}_scale", origin="quantize")
                w.replace_all_uses_with(q.node, delete_user_cb=lambda u: u is not q.node)
                continue
            src = site.weight_use if meta.role == "weight" else site.input
            if meta.role == "weight":
                name = f"{site.weight.target}_scale"
            else:   # NOTE: named by module path: another capture (the decode graph) gets the same names
                name = f"{site_key(site)}_input_scale"
            side = NO_SIDE
            if "scale_scale" in t:
                dq = plan.decisions["double_quant"]
                side = SideChannels(scale_q=ScaleQuant(t["scale_scale"], _dq_block(t["scale"].shape, dq["block"]),
                                                       dq["format"]))
            lookups = _embedding_readers(gm, site, twins) if meta.role == "weight" and meta.path in tied else []
            if meta.role == "weight" and len(lookups) != len(tied.get(meta.path, ())):
                raise PlanError(f"the plan shares {meta.path!r}'s quantized weight with {len(tied[meta.path])} "
                                f"embedding lookup(s) {tied[meta.path]}; this graph has {len(lookups)} reading it",
                                fix="apply plans to a capture of the model they were made on")
            before = min([site.node, *lookups], key=_order(gm)) if lookups else site.node
            q = insert_quantizer(gm, before, src, meta, block=list(qp.block), scale=t.get("scale"),
                                 zero_point=t.get("zero_point"), name=None if "scale" not in t else name,
                                 origin="quantize", side=side,
                                 **({"nn_module_stack": site.node.meta["nn_module_stack"]}
                                    if lookups and "nn_module_stack" in site.node.meta else {}))
            site.node.replace_input_with(src, q.node)
            for e in lookups:              # tied_embedding: shared: the lookup reads the same quantized table
                e.replace_input_with(e.args[0], q.node)

    # -- weights
    def _weight_qparams(self, gm: GraphModule, site: LinearSite | ExpertSite, spec: QSpec, ctx: Context):
        if isinstance(site, ExpertSite):           # per expert: block 1 along the expert axis
            block = weight_block(spec.granularity.block_size((0, 0)), site.in_axis)
            with ctx.loaded([site.weight.target]):
                scale, zp = self._choose(param_of(gm, site.weight).detach(), spec, block)
            return block, {"scale": scale, "zero_point": zp}
        block = weight_block_size(spec, use_in_axis=site.use_in_axis)
        flip = site.weight_use is not site.weight                  # consumed transposed (mm family)
        with ctx.loaded([site.weight.target]):   # weights on disk: one linear in memory at a time
            w = param_of(gm, site.weight).detach()
            scale, zp = self._choose(w.t() if flip else w, spec, block)
        return block, {"scale": scale, "zero_point": zp}

    def _choose(self, w: torch.Tensor, spec: QSpec, block) -> tuple:
        if self.config.weight_clip:        # the scales go into the plan: a reload does not search again
            return clipped_qparams(w, spec, block)
        return choose_qparams(w, spec, block_size=block)

    # -- activations
    def _static_activation_qparams(self, gm: GraphModule, ctx: Context, todo: list[LinearSite]) -> dict:
        spec = self.config.activations
        if spec is None or spec.dynamic or not todo:
            return {}
        inputs = {s.input.name: s.input for s in todo}
        observers = ctx.get(Observed(tuple(inputs), _MakeObserver(self.config.observer, spec),
                                     who="quantize with static activations",
                                     desc="quantize: observing linear inputs"), gm)
        return {k: obs.qparams() for k, obs in observers.items()}


def _embedding_readers(gm: GraphModule, site: LinearSite, twins: dict) -> list[Node]:
    """The embedding lookups (``aten.embedding(W, ids)``) whose table is `site`'s weight: the same get_attr
    node, or another name of the same storage (`twins`: qpass.patterns.storage_twins), in graph order."""
    if not isinstance(site, LinearSite):
        return []
    names = {site.weight.target, *twins.get(site.weight.target, ())}
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.embedding.default
            and isinstance(n.args[0], Node) and n.args[0].op == "get_attr" and n.args[0].target in names]


def _tied_embeddings(gm: GraphModule, sites: list, todo: list, cfg: QuantizeConfig) -> dict[str, list[str]]:
    """tied_embedding: shared: {path of a linear this pass quantizes: module paths of the embedding lookups
    reading its weight}. A tied linear the pass does not quantize, or one that reads the weight transposed
    (the table would have to be laid out twice), is a QuantizationError."""
    out, twins = {}, storage_twins(gm)
    for site in sites:
        if not isinstance(site, LinearSite):
            continue
        lookups = _embedding_readers(gm, site, twins)
        if not lookups:
            continue
        if is_quantizer(site.weight_use):       # quantized by an earlier pass (again in this one: refused below)
            continue
        names = [module_path(gm, e) or e.name for e in lookups]
        where = f"{describe(gm, site.node)}, tied with the embedding {', '.join(names)}"
        if site not in todo:
            raise QuantizationError(
                f"tied_embedding: shared gives the embedding lookup the quantized weight of its tied linear, but "
                f"this pass does not quantize that linear ({where})",
                fix=f"set tied_embedding: shared in the quantize pass that quantizes {site_key(site)} (its "
                    "targets), or remove the option (tied_embedding: float)")
        if site.weight_use is not site.weight:
            raise QuantizationError(
                f"tied_embedding: shared takes a tied linear that reads the table as stored ([out, in] = [vocab, "
                f"hidden]); this one reads it transposed ({where})", fix="use tied_embedding: float for this model")
        out[site_key(site)] = names
    return out


def _dq_block(shape, block: int) -> tuple[int, int]:
    """Blocks of `block` consecutive scales in row order over a [rows, cols] scale tensor: whole rows when a row
    is shorter than the block (block // cols of them), else `block` scales of one row."""
    rows, cols = (1, int(shape[0])) if len(shape) == 1 else (int(shape[0]), int(shape[-1]))
    return (max(1, block // cols), cols) if cols <= block else (1, block)


def _scale_of_scales(scale: torch.Tensor, dq: DoubleQuantConfig) -> torch.Tensor:
    """The second-level scales of `scale` (symmetric absmax per block of _dq_block)."""
    from qpass.primitives.formats import get_format

    spec = QSpec(get_format(dq.format), PerTensor(), symmetric=True)
    s2, _ = choose_qparams(scale.float(), spec, block_size=_dq_block(scale.shape, dq.block))
    return s2



def _order(gm: GraphModule):
    pos = {n: i for i, n in enumerate(gm.graph.nodes)}
    return pos.__getitem__


def _qparam_dict(qparams) -> dict:
    if qparams is None:                 # dynamic: no tensors
        return {}
    scale, zp = qparams
    return {"scale": scale, "zero_point": zp}


@dataclass(frozen=True)
class _MakeObserver:
    """An activation observer of `spec` (by value: equal requests share one calibration run)."""

    observer: ObserverConfig
    spec: QSpec

    def __call__(self, name, node):
        return self.observer.make(self.spec)


def _refuse_double_quantization(gm: GraphModule, todo: list[LinearSite], cfg: QuantizeConfig) -> None:
    for site in todo:
        for role, spec, node in (("weights", cfg.weights, site.weight_use), ("activations", cfg.activations,
                                                                                site.input)):
            if spec is not None and is_quantizer(node):
                raise QuantizationError(
                    f"{role} of {describe(gm, site.node)} are already quantized by an earlier pass",
                    fix=f"set {role}: null in this quantize pass, or use targets/ignore to skip this module")


def weight_block_size(spec: QSpec, use_in_axis: int) -> tuple[int, int]:
    """Block size of a weight quantizer on the weight *as the matmul consumes it* ([out, in] for linear,
    [in, out] for mm/addmm/matmul). Spec axes are in canonical [out, in] terms."""
    canonical = spec.granularity.block_size((0, 0))   # [out, in]; only block entries matter
    return canonical if use_in_axis == 1 else (canonical[1], canonical[0])


__all__ = ["Quantize", "QuantizeConfig", "ObserverConfig", "DoubleQuantConfig", "weight_block_size"]
