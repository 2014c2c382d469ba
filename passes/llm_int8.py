"""Int8 vector-wise weights and activations with outlier feature dimensions in float (LLM.int8(), Dettmers
et al., NeurIPS 2022).

Matches   every selected linear-like node (qpass.graph.linear_sites) whose weight and input are not quantized yet
Changes   outliers = the input features j with max |x_j| >= threshold on the calibration data (ActAbsMax)
          W -> qpass.fake_quantize_ext(W, scale, None, per output row, int8, float_columns=outliers)
               (symmetric absmax scale per row from the other columns; the outlier columns stay float)
          x -> qpass.fake_quantize_ext(x, None, ..., int8, float_columns=outliers)    (dynamic, per token:
               absmax over the other features; the outlier features stay float)
          so y = x[:, ~O] W[:, ~O]^T in int8 (vector-wise scales) + x[:, O] W[:, O]^T in float, the paper's
          mixed-precision decomposition. A linear without outliers gets the plain W8A8 quantizers
          (qpass.fake_quantize per-channel weights, qpass.fake_quantize_dynamic per-token inputs).
Requires  calibration data (max |x| per input feature)
Preserves nothing (adds nodes and buffers)

Deviation: the paper (and bitsandbytes) finds the outlier columns at run time in every input (any |x| >=
threshold in the current batch). Here the set is decided once from calibration data and is static: the quantizer
IR has no op with a data-dependent set of float columns yet. Nothing forbids one (eager torch can index the
columns found per call, and ONNX expresses it with standard ops of data-dependent shape: ReduceMax(Abs) ->
GreaterOrEqual -> NonZero -> Gather); it is not built (issue 16 keeps it open). A feature that crosses the
threshold only outside the calibration data is quantized with its token's int8 grid. With `threshold` low enough to catch the systematic
outlier dimensions (the paper: they recur across layers and tokens) the two agree on the calibration data.
bitsandbytes counts a feature as an outlier at |x| >= threshold; so does this pass.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.fx import GraphModule

from qpass.analyses import ActAbsMax, LinearSites
from qpass.errors import RecipeError
from qpass.graph import choose_linears, linear_sites, param_of, site_key
from qpass.pass_infra import Context, Pass, PassResult
from qpass.plan import Plan, SiteIndex, build
from qpass.primitives import choose_qparams
from qpass.primitives.spec import IntFormat, PerChannel, PerToken, QSpec
from qpass.quantizer import FloatColumns, QuantMeta, SideChannels, insert_quantizer

from .quantize import weight_block_size

WEIGHTS = QSpec(IntFormat(8), PerChannel(0), symmetric=True)          # vector-wise: one scale per output row
INPUTS = QSpec(IntFormat(8), PerToken(), symmetric=True, dynamic=True)  # vector-wise: one scale per token


@dataclass(frozen=True)
class LlmInt8Config:
    name: ClassVar[str] = "llm_int8"
    field_docs: ClassVar[dict] = {
        "threshold": "an input feature whose largest magnitude on the calibration data reaches this stays in float "
                     "(the paper and bitsandbytes: 6.0)",
        "targets": "module-path globs to quantize",
        "ignore": "module-path globs to leave in float (a bare name matches as a suffix: lm_head)",
    }

    threshold: float = 6.0
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.threshold > 0:
            raise RecipeError("threshold", f"must be > 0 (the paper: 6.0), got {self.threshold}")
        if not self.targets:
            raise RecipeError("targets", "must list at least one module-path glob (e.g. ['*'])")


@dataclass(frozen=True)
class LlmInt8(Pass):
    """Int8 weights and per-token int8 inputs, outlier input features computed in float (LLM.int8())."""

    config: LlmInt8Config = LlmInt8Config()
    name: ClassVar[str] = "llm_int8"
    needs_calibration: ClassVar[bool] = True

    def run(self, gm: GraphModule, ctx: Context) -> PassResult:
        cfg = self.config
        sites = ctx.get(LinearSites(), gm)
        todo, near, at = choose_linears(gm, sites, cfg.targets, cfg.ignore, "llm_int8", inputs=True)
        if not todo:
            return PassResult(modified=False, stats={"linears": 0}, near_misses=near)
        absmax = ctx.get(ActAbsMax(tuple(dict.fromkeys(s.input.name for s in todo))), gm)
        items, counts = [], {}
        for s in todo:
            cols = torch.nonzero(absmax[s.input.name] >= cfg.threshold).flatten().to(torch.int64)
            counts[site_key(s)] = int(cols.numel())
            with ctx.loaded([s.weight.target]):
                w = param_of(gm, s.weight).detach()
                w = w if s.in_axis == 1 else w.t()                                  # [out, in]
                scale, _ = choose_qparams(w.index_fill(1, cols, 0.0), WEIGHTS, block_size=(1, -1))
            side = cols if cols.numel() else None
            scale = scale.t().contiguous() if s.use_in_axis == 0 else scale
            items.append((QuantMeta("weight", "", site_key(s), WEIGHTS), weight_block_size(WEIGHTS, s.use_in_axis),
                          {"scale": scale, "float_columns": side}, at[s.node]))
            items.append((QuantMeta("input", "", site_key(s), INPUTS), INPUTS.block_size(s.input.meta["val"].shape),
                          {"float_columns": side}, at[s.node]))
        plan = build(self.name, items, decisions={"threshold": cfg.threshold, "outlier_features": counts})
        self.apply(gm, plan)
        stats = {"linears": len(todo), "with_outliers": sum(c > 0 for c in counts.values()),
                 "outlier_features": sum(counts.values()),
                 "outlier_fraction": sum(counts.values()) / sum(s.input.meta["val"].shape[-1] for s in todo)}
        return PassResult(modified=True, stats=stats, near_misses=near, plan=plan)

    @classmethod
    def apply(cls, gm: GraphModule, plan: Plan) -> None:
        """Insert the plan's weight and input quantizers (float columns where the plan records them)."""
        sites = linear_sites(gm)
        index = SiteIndex(sites)
        for qp, t in zip(plan.quantizers, plan.tensors()):
            site = index.quantized(qp)
            weight = qp.meta.role == "weight"
            src = site.weight_use if weight else site.input
            axis = site.use_in_axis if weight else -1
            side = SideChannels(float_columns=FloatColumns(t["float_columns"], axis)) \
                if "float_columns" in t else SideChannels()
            meta = dataclasses.replace(qp.meta, site=site.node.name, path=site.path)
            name = f"{site.weight.target}_scale" if weight else f"{site_key(site)}_input"
            q = insert_quantizer(gm, site.node, src, meta, block=list(qp.block), scale=t.get("scale"),
                                 name=name, side=side, origin="llm_int8")
            site.node.replace_input_with(src, q.node)



__all__ = ["LlmInt8", "LlmInt8Config"]
