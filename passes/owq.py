"""Keep each linear's weak input columns in float and quantize the rest (OWQ, Lee et al., AAAI 2024).

Matches   every selected linear-like node (qpass.graph.linear_sites) whose weight is not quantized yet
Changes   W -> qpass.fake_quantize_ext(W, scale, zero_point, block, fmt, float_columns=weak) (a plain
          qpass.fake_quantize where a linear keeps no column); `weak` = the k input columns of largest
          sensitivity H_jj * ||W[:, j] - rtn(W)[:, j]||^2 (qpass.primitives.owq), H = 2 X X^T on calibration data
          k: `columns` per linear, or the most columns each linear can keep within `target_bits` per weight
          (codes for every element, fp16 scales, zero points, fp16 float columns and an int32 index per column,
          as qpass.eval counts them); scales come from the quantized columns only
          method rtn: round to nearest; the weak columns keep their float values
          method gptq (the paper): block by block on the outputs of the blocks already quantized (as the gptq
          pass, true-sequential), the weak columns are chosen from that Hessian, then the column loop quantizes
          the other columns and feeds its error into the weak ones, which are stored updated (primitives.owq)
Requires  calibration data (rtn: one run for diag H; gptq: a block-by-block sweep)
Preserves nothing (adds nodes and buffers)

Deviations from the paper and its code (xvyaward/owq), and why:
* k per linear is the same fraction of every selected linear (the budget per linear), where the reference takes
  a per-model table of which layer types get columns; here `targets` / `ignore` choose the layers.
* Sensitivity uses round-to-nearest with the pass's min-max weight spec (groups included); the reference uses a
  per-channel quantizer with its MSE truncation search. Scales are min-max by default (`clip: minmax`), so OWQ
  and the RTN/GPTQ rows of qpass compare on the same grid; `clip: mse` runs the reference's truncation search
  (qpass.primitives.owq.clipped_qparams) for the scales of the quantized columns.
* Groups are contiguous in the original column order (no g_idx): a group holding a weak column has fewer
  quantized columns; the reference forms groups over the compacted non-weak columns.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch.fx import GraphModule

from qpass.analyses import LinearSites, Observed
from qpass.errors import RecipeError
from qpass.graph import LinearSite, choose_linears, linear_sites, param_of, site_key
from qpass.pass_infra import Context, Pass, PassResult
from qpass.plan import Plan, SiteIndex, build
from qpass.primitives import owq as O
from qpass.primitives.gptq import HessianAccumulator
from qpass.primitives.spec import BUILTIN_KINDS, IntFormat, PerChannel, PerHead, PerToken, QSpec
from qpass.quantizer import FloatColumns, QuantMeta, Quantizer, SideChannels, insert_quantizer

from .gptq import _stages, shared_weight
from .quantize import weight_block_size


@dataclass(frozen=True)
class OwqConfig:
    name: ClassVar[str] = "owq"
    field_docs: ClassVar[dict] = {
        "weights": "weight quantizer of the other columns (static; per_channel or per_group)",
        "columns": "float columns per linear (give this or target_bits)",
        "target_bits": "average bits per weight each linear may use, float columns included (give this or columns)",
        "method": "rtn: round to nearest; gptq: GPTQ on the other columns, error fed into the weak ones (the paper)",
        "damp": "gptq: dampening, a fraction of mean(diag H)",
        "block_size": "gptq: columns per lazy batch update",
        "act_order": "gptq: quantize the other columns by decreasing diag(H)",
        "clip": "scales: minmax, or mse (the reference's truncation search: per row / group, the min-max range "
                "shrunk by the ratio minimising sum |q(w) - w|^2.4)",
        "targets": "module-path globs to quantize",
        "ignore": "module-path globs to leave in float (a bare name matches as a suffix: lm_head)",
    }

    weights: QSpec = QSpec(IntFormat(3), PerChannel(0))
    columns: int | None = None
    target_bits: float | None = None
    method: Literal["rtn", "gptq"] = "gptq"
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    clip: Literal["minmax", "mse"] = "minmax"
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ()

    def __post_init__(self):
        w = self.weights
        if w.dynamic or isinstance(w.granularity, (PerToken, PerHead)):
            raise RecipeError("weights", "OWQ weights are static, per_tensor, per_channel or per_group")
        if w.format.kind not in BUILTIN_KINDS:
            raise RecipeError("weights", f"OWQ quantizes to a built-in grid, got {w.format.name}")
        if getattr(w.granularity, "axis", 0) not in (0, 1, -1, -2):
            raise RecipeError("weights.axis", "a weight is [out, in]: axis is 0 (out) or 1 (in)")
        if (self.columns is None) == (self.target_bits is None):
            raise RecipeError("columns", "give exactly one of columns (float columns per linear) and target_bits "
                              "(average bits per weight, e.g. 3.1)")
        if self.columns is not None and self.columns < 0:
            raise RecipeError("columns", f"must be >= 0, got {self.columns}")
        if self.target_bits is not None and not w.bits < self.target_bits <= 16:
            raise RecipeError("target_bits", f"must be in ({w.bits}, 16] (above the weight bits: the float "
                              f"columns are what the budget buys), got {self.target_bits}")
        if not 0.0 <= self.damp < 10.0:
            raise RecipeError("damp", f"must be in [0, 10), got {self.damp}")
        if not 1 <= self.block_size <= 1 << 16:
            raise RecipeError("block_size", f"must be in [1, {1 << 16}], got {self.block_size}")
        if self.clip not in ("minmax", "mse"):
            raise RecipeError("clip", f"must be minmax or mse, got {self.clip!r}")
        if not self.targets:
            raise RecipeError("targets", "must list at least one module-path glob (e.g. ['*'])")


@dataclass(frozen=True)
class _SqSum:
    """Observer of sum_t x_t^2 per input feature (diag of X^T X), float64."""

    def __call__(self, name, node):
        return _DiagAcc()


class _DiagAcc:
    def __init__(self):
        self.sq, self.tokens = None, 0

    def update(self, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1]).double()
        s = x2.pow(2).sum(0)
        self.sq = s if self.sq is None else self.sq + s
        self.tokens += x2.shape[0]

    @property
    def diag(self) -> torch.Tensor:
        return self.sq * (2.0 / max(self.tokens, 1))


@dataclass(frozen=True)
class Owq(Pass):
    """Weak columns in float, the rest quantized with RTN or GPTQ (OWQ)."""

    config: OwqConfig = OwqConfig(columns=0)       # a recipe must choose columns or target_bits
    name: ClassVar[str] = "owq"
    needs_calibration: ClassVar[bool] = True

    def run(self, gm: GraphModule, ctx: Context) -> PassResult:
        cfg = self.config
        sites = ctx.get(LinearSites(), gm)
        todo, near, at = choose_linears(gm, sites, cfg.targets, cfg.ignore, "owq")
        if not todo:
            return PassResult(modified=False, stats={"linears": 0}, near_misses=near)
        diag = {}
        if cfg.method == "rtn":
            obs = ctx.get(Observed(tuple(dict.fromkeys(s.input.name for s in todo)), _SqSum(), who="owq",
                                   desc="owq: observing diag(X^T X)"), gm)
            diag = {s.node: obs[s.input.name].diag for s in todo}
        items, ks = [], {}
        for s in todo:
            with ctx.loaded([s.weight.target]):
                w = _canonical(param_of(gm, s.weight).detach(), s)
                block = cfg.weights.block_size(w.shape)
                k = cfg.columns if cfg.columns is not None else \
                    O.columns_for_bits(tuple(w.shape), cfg.weights, block, cfg.target_bits)
                k = min(k, w.shape[1])
                # gptq: placeholder columns now, chosen from the sweep's Hessian below
                cols = O.weak_columns(O.column_sensitivity(w, diag[s.node], cfg.weights, block), k) \
                    if s.node in diag else torch.arange(k, dtype=torch.int64)
                scale, zp = O.owq_rtn_qparams(w, cfg.weights, block, cols, clip=cfg.clip == "mse")
            ks[s.node] = k
            flip = (lambda t: t.t().contiguous()) if s.use_in_axis == 0 else (lambda t: t)
            tensors = {"scale": flip(scale), "zero_point": None if zp is None else flip(zp),
                       "float_columns": cols if k else None}
            items.append((QuantMeta("weight", "", site_key(s), cfg.weights),
                          weight_block_size(cfg.weights, s.use_in_axis),
                          tensors, at[s.node]))
        plan = build(self.name, items,
                     decisions={"method": cfg.method, "columns": {site_key(s): ks[s.node] for s in todo}})
        self.apply(gm, plan)
        if cfg.method == "gptq":
            fresh = {s.node: s for s in linear_sites(gm)}     # weight_use is now the quantizer
            near += self._gptq(gm, ctx, [fresh[s.node] for s in todo])
        stats = {"linears": len(todo), "float_columns": sum(ks.values()),
                 "with_float_columns": sum(k > 0 for k in ks.values()), "method": cfg.method}
        return PassResult(modified=True, stats=stats, near_misses=near, plan=plan)

    @classmethod
    def apply(cls, gm: GraphModule, plan: Plan) -> None:
        """Insert the plan's weight quantizers (float columns along the weight's input axis where recorded)."""
        sites = linear_sites(gm)
        index = SiteIndex(sites)
        for qp, t in zip(plan.quantizers, plan.tensors()):
            site = index.quantized(qp)
            side = SideChannels(float_columns=FloatColumns(t["float_columns"], site.use_in_axis)) \
                if "float_columns" in t else SideChannels()
            meta = dataclasses.replace(qp.meta, site=site.node.name, path=site.path)
            q = insert_quantizer(gm, site.node, site.weight_use, meta, block=list(qp.block), scale=t["scale"],
                                 zero_point=t.get("zero_point"), name=f"{site.weight.target}_scale", side=side,
                                 origin="owq")
            site.node.replace_input_with(site.weight_use, q.node)

    def _gptq(self, gm: GraphModule, ctx: Context, todo: list[LinearSite]) -> list[str]:
        """Choose the weak columns and re-round, block by block on the already quantized blocks' outputs."""
        near, left = [], {s.node for s in todo}
        sweep = ctx.sweep(gm, who="owq", blocks=True, feed="quantized", desc="owq")
        with contextlib.closing(iter(sweep)) as steps:    # NOTE: closed now, not by the GC (see gptq)
            for step in steps:
                mine = [s for s in todo if step.contains(s.node)]
                for stage in _stages(mine) if mine else []:
                    bypass = {s.weight_use for s in todo if s.node in left}
                    accs = step.observe({s.input: s.input for s in stage}, lambda k, n: HessianAccumulator(),
                                        bypass=bypass)
                    for s in stage:
                        why = shared_weight(gm, s)
                        if why:   # NOTE: re-rounding would change a tied weight too: keep the RTN result
                            near.append(f"{site_key(s)}: rtn, not gptq: {why}")
                            self._choose_only(gm, s, accs[s.input].hessian)
                        else:
                            self._requantize(gm, s, accs[s.input].hessian)
                        left.discard(s.node)
                if not left:
                    break
        return near

    def _tensors(self, gm: GraphModule, s: LinearSite):
        q = Quantizer(s.weight_use)
        cols = q.side_channels.float_columns
        return (q, param_of(gm, s.weight), param_of(gm, q.scale),
                param_of(gm, q.zero_point) if q.zero_point is not None else None,
                param_of(gm, cols.index) if cols is not None else None)

    def _choose_only(self, gm: GraphModule, s: LinearSite, h: torch.Tensor) -> None:
        cfg, (q, param, scale, zp, idx) = self.config, self._tensors(gm, s)
        if idx is None:
            return
        w = _canonical(param.detach(), s)
        block = cfg.weights.block_size(w.shape)
        cols = O.weak_columns(O.column_sensitivity(w, torch.diagonal(h), cfg.weights, block), idx.numel())
        s_new, z_new = O.owq_rtn_qparams(w, cfg.weights, block, cols, clip=cfg.clip == "mse")
        _write(s, scale, zp, idx, s_new, z_new, cols)

    def _requantize(self, gm: GraphModule, s: LinearSite, h: torch.Tensor) -> None:
        cfg, (q, param, scale, zp, idx) = self.config, self._tensors(gm, s)
        w = _canonical(param.detach(), s)
        block = cfg.weights.block_size(w.shape)
        k = 0 if idx is None else idx.numel()
        cols = O.weak_columns(O.column_sensitivity(w, torch.diagonal(h), cfg.weights, block), k)
        res = O.owq_gptq(w, h, cfg.weights, cols, block=block, percdamp=cfg.damp, block_size=cfg.block_size,
                         act_order=cfg.act_order, clip=cfg.clip == "mse")
        with torch.no_grad():
            param.copy_(res.weight if s.in_axis == 1 else res.weight.t())
        _write(s, scale, zp, idx, res.scale, res.zero_point, cols)


def _write(s: LinearSite, scale, zp, idx, s_new, z_new, cols) -> None:
    flip = (lambda t: t.t()) if s.use_in_axis == 0 else (lambda t: t)
    with torch.no_grad():
        scale.copy_(flip(s_new))
        if zp is not None:
            zp.copy_(flip(z_new))
        if idx is not None:
            idx.copy_(cols)


def _canonical(param: torch.Tensor, s: LinearSite) -> torch.Tensor:
    """The weight as [out, in]."""
    return param if s.in_axis == 1 else param.t()



__all__ = ["Owq", "OwqConfig"]
