"""Choose an integer or a floating-point format per linear at the same bit width (MoFQ, Zhang et al. 2024).

Matches   every selected linear-like node (qpass.graph.linear_sites)
Changes   per linear, two candidates at the recipe's bit widths: the integer family (int<b>) and the float family
          (8 bits: fp8_e4m3, 4 bits: fp4_e2m1; same granularity, min-max scales), for the weights and, when the
          recipe gives `activations`, for the layer's input too (``joint``: the paper's rule, one family per
          layer, so its GEMM is INT or FP; ``joint: false``: each tensor chooses on its own). The candidate of
          smaller layer error wins (ties: int):
            output_mse   mean (X W^T - Q(X) Q(W)^T)^2 on a sample of calibration tokens (the default; weight-only:
                         Q(X) = X): the layer-output error the paper allows as its metric, which weighs each
                         weight's error by how much the inputs use it
            weight_mse   mean (W - Q(W))^2 (tensor error, no data needed; activations: mean (X - Q(X))^2 on
                         the token sample)
            auto         weight_mse without activations, output_mse with them
          then (``select: model``, the default) scores three whole-model candidates on the calibration
          samples: the per-layer choice above (the paper's), all-int and all-float, each by the mean KL(FP || Q)
          of the graph's output distribution (softmax of the last axis: next-token logits for an LM) against
          the float graph's, and keeps the lowest (ties: the per-layer choice, then int); ``select: layer``
          keeps the per-layer choice as the paper does. Inserts the chosen quantizers as the quantize pass does
          (static activation scales from the recipe's observer, per chosen format)
Requires  calibration data for output_mse (the default), activations or static activation scales
Preserves nothing (adds quantizer nodes)

The plan is the quantize pass's (each quantizer with its chosen spec) plus each linear's choice and both errors,
and with ``select: model`` each candidate's KL and the winner (stats ``candidates`` / ``selected``).

Deviation (``select: model``): the paper picks per layer only. Layer errors do not add up to the model's: a
layer-wise mix can lose end to end to one uniform format (seen at W4A16 on the bundled models, docs/results_wa.md),
so the uniform formats are kept as candidates and the model's own output decides; the paper's mix is kept
whenever it is at least as good. The candidates are scored on the same calibration samples the layer errors
came from (three candidates: little room to overfit them). It needs one copy of the graph per scored candidate
(in memory only: with the weights streamed from disk it falls back to the per-layer choice and says so).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch.fx import GraphModule

from qpass.analyses import LinearSites, Observed
from qpass.calibration import run_graph
from qpass.errors import RecipeError
from qpass.folding import canonical_weight
from qpass.graph import param_of, select
from qpass.pass_infra import Context, Pass, PassResult
from qpass.plan import Plan, build, occurrences
from qpass.primitives import choose_qparams
from qpass.primitives import quant as Q
from qpass.primitives.spec import FloatFormat, IntFormat, PerGroup, PerHead, PerToken, QSpec
from qpass.quantizer import QuantMeta

from .quantize import ObserverConfig, Quantize, _MakeObserver, weight_block_size
from .smoothquant import _MakeInputStats

FLOAT_OF_BITS = {8: "fp8_e4m3", 4: "fp4_e2m1"}
FAMILIES = ("int", "float")


def candidates(spec: QSpec) -> dict[str, QSpec]:
    """{'int': int<b> spec, 'float': the float format of the same bits} with `spec`'s granularity and dynamics."""
    b = spec.format.bits
    fp = dataclasses.replace(spec, format=FloatFormat(FLOAT_OF_BITS[b]), symmetric=True, full_range=False)
    return {"int": dataclasses.replace(spec, format=IntFormat(b)), "float": fp}


@dataclass(frozen=True)
class MofqConfig:
    name: ClassVar[str] = "mofq"
    field_docs: ClassVar[dict] = {
        "weights": "bit width (4 or 8) and granularity of the weights; the format is chosen per layer (int<b> or "
                   "fp4_e2m1 / fp8_e4m3); `format` may name either family, it only sets the bits",
        "activations": "bit width and granularity of the linear inputs (null: weight-only); format chosen per layer",
        "metric": "output_mse (default: layer output error on calibration tokens), weight_mse (tensor error, "
                  "no calibration needed for weight-only) or auto (weight_mse without activations, output_mse "
                  "with them)",
        "joint": "one family per layer for weights and activations (the paper: the GEMM is INT or FP); false: each "
                 "tensor chooses on its own",
        "select": "model (default): keep the per-layer choice, all-int or all-float, whichever gives the lowest "
                  "KL(FP || Q) of the model's outputs on the calibration samples; layer: the per-layer choice "
                  "only (the paper; also what model falls back to, with a note, without calibration data or "
                  "with the weights streamed from disk)",
        "tokens": "calibration tokens kept per linear input for output_mse and activation errors",
        "observer": "static activation scale estimator: {kind: minmax|moving_average|percentile|mse, ...}",
        "targets": "module-path globs of the linears to quantize",
        "ignore": "module-path globs to leave in float (a bare name matches as a suffix: lm_head)",
    }

    weights: QSpec = QSpec(IntFormat(4), PerGroup(128))
    activations: QSpec | None = None
    metric: Literal["auto", "weight_mse", "output_mse"] = "output_mse"
    joint: bool = True
    select: Literal["model", "layer"] = "model"
    tokens: int = 512
    observer: ObserverConfig = field(default_factory=ObserverConfig)
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ()

    def __post_init__(self):
        for key, spec in (("weights", self.weights), ("activations", self.activations)):
            if spec is None:
                continue
            if spec.format.kind not in ("int", "float") or spec.format.bits not in FLOAT_OF_BITS:
                raise RecipeError(f"{key}.bits", f"mofq compares int and float formats of 4 bits (int4 / fp4_e2m1) "
                                  f"or 8 bits (int8 / fp8_e4m3), got {spec.format.name}")
        w, a = self.weights, self.activations
        if w.dynamic or isinstance(w.granularity, (PerToken, PerHead)):
            raise RecipeError("weights", "weights take static per_tensor, per_channel or per_group")
        if getattr(w.granularity, "axis", 0) not in (0, 1, -1, -2):
            raise RecipeError("weights.axis", "a weight is [out, in]: axis is 0 (out) or 1 (in)")
        if a is not None:
            if isinstance(a.granularity, PerHead):
                raise RecipeError("activations.granularity", "per_head is for the KV cache (kv_cache pass)")
            if not a.dynamic and isinstance(a.granularity, PerToken):
                raise RecipeError("activations.dynamic", "per_token scales are computed at run time")
            if getattr(a.granularity, "axis", -1) != -1:
                raise RecipeError("activations.axis", "activation channels are the last axis: use axis: -1")
        if self.select not in ("model", "layer"):
            raise RecipeError("select", f"must be 'model' or 'layer', got {self.select!r}")
        if not 1 <= self.tokens <= 1 << 20:
            raise RecipeError("tokens", f"must be an integer in [1, {1 << 20}], got {self.tokens}")
        if not self.targets:
            raise RecipeError("targets", "must list at least one module-path glob (e.g. ['*'])")

    @property
    def output_metric(self) -> bool:
        return self.metric == "output_mse" or (self.metric == "auto" and self.activations is not None)


@dataclass(frozen=True)
class Mofq(Pass):
    """Per linear, the integer or the float format of the same bit width, whichever gives the smaller error."""

    config: MofqConfig = MofqConfig()
    name: ClassVar[str] = "mofq"

    def run(self, gm: GraphModule, ctx: Context) -> PassResult:
        cfg = self.config
        sites = list(ctx.get(LinearSites(), gm))
        keys = [s.path or s.node.name for s in sites]
        chosen = select(keys, cfg.targets, cfg.ignore, "mofq")
        todo = [(s, k) for s, k in zip(sites, keys) if k in chosen]
        near = [f"{k}: excluded by targets/ignore" for k in keys if k not in chosen]
        stats = {"linears": 0, "weights_int": 0, "weights_float": 0}
        if not todo:
            return PassResult(modified=False, stats=stats, near_misses=near)
        samples = {}
        if cfg.output_metric or cfg.activations is not None:
            calib = ctx.require_calibration("mofq")
            keep = -(-cfg.tokens // len(calib))
            obs = ctx.get(Observed(tuple(dict.fromkeys(s.input.name for s, _ in todo)), _MakeInputStats(keep),
                                   who="mofq", desc="mofq: sampling linear inputs"), gm)
            samples = {k: o.sample() for k, o in obs.items()}
        wc = candidates(cfg.weights)
        ac = candidates(cfg.activations) if cfg.activations is not None else None
        choice = {}
        for s, k in todo:
            with ctx.loaded([s.weight.target]):
                w = canonical_weight(gm, s).double()
            choice[k] = self._choose(w, samples.get(s.input.name), wc, ac)
        selected, scores = "layer", {}
        if cfg.select == "model" and (ctx.calib is None or len(ctx.calib) == 0):
            near.append("mofq: select: model scores the candidates on calibration data and none was given: kept "
                        "the per-layer choice")
        elif cfg.select == "model" and ctx.store is not None:
            near.append("mofq: select: model needs the graph in memory (weights are streamed from disk): kept the "
                        "per-layer choice")
        elif cfg.select == "model":
            uniform = {f: {k: _uniform(c, f, ac is not None) for k, c in choice.items()} for f in FAMILIES}
            cands = {"layer": choice, **{f: u for f, u in uniform.items() if u != choice}}
            calib = ctx.require_calibration("mofq")
            ref = [torch.log_softmax(run_graph(gm, x).float(), -1) for x in calib.samples]
            for name, ch in cands.items():
                trial = copy.deepcopy(gm)
                self.apply(trial, build(self.name, self._items(trial, ctx, sites, keys, todo, ch, wc, ac)))
                trial.recompile()
                scores[name] = _kl(ref, [run_graph(trial, x) for x in calib.samples])
                del trial
            order = ("layer", *FAMILIES)
            selected = min(scores, key=lambda n: (scores[n], order.index(n)))
            choice = cands[selected]
        items = self._items(gm, ctx, sites, keys, todo, choice, wc, ac)
        decisions = {"choice": choice, "select": cfg.select, "selected": selected, "candidates": scores}
        plan = build(self.name, items, decisions=decisions)
        self.apply(gm, plan)
        stats["linears"] = len(todo)
        stats["weights_int"] = sum(c["weights"] == "int" for c in choice.values())
        stats["weights_float"] = len(todo) - stats["weights_int"]
        if ac is not None:
            stats["activations_int"] = sum(c["activations"] == "int" for c in choice.values())
            stats["activations_float"] = len(todo) - stats["activations_int"]
        stats["metric"] = "output_mse" if cfg.output_metric else "weight_mse"
        if cfg.output_metric:     # layers where the tensor error alone would have chosen the other weight format
            stats["weight_mse_disagrees"] = sum(
                c["weights"] != min(FAMILIES, key=lambda f: (c["weight_mse"][f], f == "float")) for c in choice.values())
        stats["choice"] = {k: _summary(c) for k, c in choice.items()}
        if scores:
            stats["candidates"], stats["selected"] = scores, selected
        return PassResult(modified=True, stats=stats, near_misses=near, plan=plan)

    @classmethod
    def apply(cls, gm: GraphModule, plan: Plan) -> None:
        """Insert the plan's quantizers (each with its chosen format), as the quantize pass does."""
        Quantize.apply(gm, plan)

    def _choose(self, w: torch.Tensor, x: torch.Tensor | None, wc: dict, ac: dict | None) -> dict:
        """{'weights': family, 'activations': family or None, 'errors': {candidate: error}} for one linear."""
        cfg = self.config
        if cfg.output_metric:
            ref = x @ w.t()
            pairs = [(f, f) for f in FAMILIES] if ac is None or cfg.joint else \
                [(fw, fa) for fw in FAMILIES for fa in FAMILIES]
            errors = {}
            for fw, fa in pairs:
                xq = x if ac is None else fake_quant(x, ac[fa])
                errors[fw if ac is None else f"{fw}/{fa}"] = float((xq @ fake_quant(w, wc[fw]).t() - ref).pow(2).mean())
            best = min(errors, key=lambda c: (errors[c], c.count("float")))     # ties: int
            fw, _, fa = best.partition("/")
            wmse = {f: float((fake_quant(w, wc[f]) - w).pow(2).mean()) for f in FAMILIES}   # for the report
            return {"weights": fw, "activations": fa or None, "errors": errors, "weight_mse": wmse}
        errors = {f: float((fake_quant(w, wc[f]) - w).pow(2).mean()) for f in FAMILIES}
        fw = min(FAMILIES, key=lambda f: (errors[f], f == "float"))
        out = {"weights": fw, "activations": None, "errors": {f"weights_{f}": e for f, e in errors.items()}}
        if ac is not None:
            aerr = {f: float((fake_quant(x, ac[f]) - x).pow(2).mean()) for f in FAMILIES}
            out["errors"].update({f"activations_{f}": e for f, e in aerr.items()})
            out["activations"] = fw if cfg.joint else min(FAMILIES, key=lambda f: (aerr[f], f == "float"))
        return out

    def _items(self, gm, ctx, sites, keys, todo, choice, wc, ac) -> list:
        cfg = self.config
        at = dict(zip((s.node for s in sites), occurrences(keys)))
        static = {}
        if ac is not None and not cfg.activations.dynamic:
            for fam in FAMILIES:
                nodes = {s.input.name: s.input for s, k in todo if choice[k]["activations"] == fam}
                if nodes:
                    obs = ctx.get(Observed(tuple(nodes), _MakeObserver(cfg.observer, ac[fam]), who="mofq",
                                           desc=f"mofq: observing {fam} activations"), gm)
                    static[fam] = {n: o.qparams() for n, o in obs.items()}
        items = []
        for s, k in todo:
            spec = wc[choice[k]["weights"]]
            block = weight_block_size(spec, use_in_axis=s.use_in_axis)
            with ctx.loaded([s.weight.target]):
                w = param_of(gm, s.weight).detach()
                scale, zp = choose_qparams(w.t() if s.weight_use is not s.weight else w, spec, block_size=block)
            items.append((QuantMeta("weight", "", k, spec), block, {"scale": scale, "zero_point": zp}, at[s.node]))
            if ac is not None:
                fam = choice[k]["activations"]
                aspec = ac[fam]
                tensors = {} if aspec.dynamic else dict(zip(("scale", "zero_point"), static[fam][s.input.name]))
                items.append((QuantMeta("input", "", k, aspec), aspec.block_size(s.input.meta["val"].shape), tensors,
                              at[s.node]))
        return items


def fake_quant(x: torch.Tensor, spec: QSpec) -> torch.Tensor:
    """`x` fake-quantized as `spec` does (static specs: min-max qparams from `x` itself)."""
    block = spec.block_size(x.shape)
    if spec.dynamic:
        return Q.fake_quantize_dynamic(x, block, spec.format.name, spec.symmetric, spec.clip_ratio)
    scale, zp = choose_qparams(x, spec)
    return Q.fake_quantize(x, scale, zp, block, spec.format.name)


def _uniform(c: dict, family: str, activations: bool) -> dict:
    """Linear choice `c` with every tensor in `family` (errors kept: they are the layer's measurements)."""
    return {**c, "weights": family, "activations": family if activations else None}


def _kl(ref_logp: list[torch.Tensor], outputs: list[torch.Tensor]) -> float:
    """Mean over positions of KL(P || Q), P = exp(ref_logp), Q = softmax(output) over the last axis."""
    total, n = 0.0, 0
    for p, q in zip(ref_logp, outputs):
        q = torch.log_softmax(q.float(), -1)
        kl = (p.exp() * (p - q)).sum(-1)
        total, n = total + float(kl.sum()), n + kl.numel()
    return total / max(n, 1)


def _summary(c: dict) -> str:
    errs = ", ".join(f"{k} {v:.3e}" if math.isfinite(v) else f"{k} {v}" for k, v in c["errors"].items())
    if "weight_mse" in c:
        errs += "; weight MSE " + ", ".join(f"{k} {v:.3e}" for k, v in c["weight_mse"].items())
    fams = c["weights"] if c["activations"] is None else f"W {c['weights']}, A {c['activations']}"
    return f"{fams} ({errs})"


__all__ = ["Mofq", "MofqConfig", "candidates", "fake_quant", "FLOAT_OF_BITS"]
