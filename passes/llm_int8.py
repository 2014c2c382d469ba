"""Int8 vector-wise weights and activations with outlier feature dimensions in float (LLM.int8(), Dettmers
et al., NeurIPS 2022).

Matches   every selected linear-like node (qpass.graph.linear_sites) whose weight and input are not quantized yet
Changes   outliers: dynamic (the default, the paper's):
            W -> qpass.fake_quantize(W, scale, None, per output row, int8)   (absmax over every column)
            x -> qpass.fake_quantize_ext(x, None, ..., int8, float_threshold=threshold)   (dynamic, per token)
          in every call the input features j with max over the call's tokens |x_j| >= threshold stay float;
          the other features are quantized per token (absmax over them only), so
            y = Q8(x with the outlier features zeroed) deq(W)^T + x[:, O] deq(W)[:, O]^T,   O found per call,
          the paper's mixed-precision decomposition. Needs no calibration data (every scale is dynamic).
          outliers: static:
            O = the input features with max |x_j| >= threshold on the calibration data (ActAbsMax), fixed;
            W -> qpass.fake_quantize_ext(W, scale, None, per output row, int8, float_columns=O)
                 (absmax per row from the other columns; the columns O stay float)
            x -> qpass.fake_quantize_ext(x, None, ..., int8, float_columns=O)    (dynamic, per token)
            A linear without outliers gets the plain W8A8 quantizers.
Requires  calibration data for outliers: static only (max |x| per input feature)
Preserves nothing (adds nodes and buffers)

The weight of the outlier columns (dynamic). The paper multiplies the outlier columns "in fp16" with the
matching rows of W; with int8 inference weights (bitsandbytes' has_fp16_weights=False, the memory-saving mode
the paper measures) bitsandbytes stores one int8 matrix with one absmax scale per output row over all columns
and takes the outlier rows of W from it, dequantized (``CB[:, idx] * SCB / 127``). This pass does the same:
the per-row scale cannot depend on a set that changes from call to call, and keeping a float copy of W for
the few columns that may be picked would double the weight memory. The float part is therefore x[:, O] (float)
times deq(W)[:, O] (int8 values in float): exact in the activations, where the outliers are.
The per-token activation scale is the absmax over the features not in O (the int8 part holds those columns
only). bitsandbytes' kernel takes its row absmax over the elements below the threshold, which also counts the
below-threshold entries of an outlier column that are then zeroed; the two agree except on rows where such an
entry is the row's largest.

When to choose static: a target that cannot express a data-dependent set of columns (an exporter without
NonZero/Gather of data-dependent shape, a fixed-shape accelerator kernel), or to reproduce the earlier static
behaviour. A feature that crosses the threshold only outside the calibration data is then quantized on its
token's int8 grid (tests/test_llm_int8.py builds such a case: dynamic keeps float quality, static does not).
bitsandbytes counts a feature as an outlier at |x| >= threshold; so does this pass, in both modes.
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
from qpass.quantizer import FloatColumns, QuantMeta, SideChannels, ThresholdColumns, insert_quantizer

from .quantize import weight_block_size

WEIGHTS = QSpec(IntFormat(8), PerChannel(0), symmetric=True)          # vector-wise: one scale per output row
INPUTS = QSpec(IntFormat(8), PerToken(), symmetric=True, dynamic=True)  # vector-wise: one scale per token


@dataclass(frozen=True)
class LlmInt8Config:
    name: ClassVar[str] = "llm_int8"
    field_docs: ClassVar[dict] = {
        "threshold": "an input feature whose largest magnitude reaches this stays in float (the paper and "
                     "bitsandbytes: 6.0): over the current call's tokens (outliers: dynamic) or over the "
                     "calibration data (static)",
        "outliers": "dynamic: the outlier features are found in every call, as in the paper (no calibration "
                    "data); static: fixed once from the calibration data (for targets that cannot express a "
                    "data-dependent set of columns)",
        "targets": "module-path globs to quantize",
        "ignore": "module-path globs to leave in float (a bare name matches as a suffix: lm_head)",
    }

    threshold: float = 6.0
    outliers: str = "dynamic"
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.threshold > 0:
            raise RecipeError("threshold", f"must be > 0 (the paper: 6.0), got {self.threshold}")
        if self.outliers not in ("dynamic", "static"):
            raise RecipeError("outliers", f"must be 'dynamic' (found per call, the paper) or 'static' (fixed from "
                                          f"calibration data), got {self.outliers!r}")
        if not self.targets:
            raise RecipeError("targets", "must list at least one module-path glob (e.g. ['*'])")


@dataclass(frozen=True)
class LlmInt8(Pass):
    """Int8 weights and per-token int8 inputs, outlier input features computed in float (LLM.int8())."""

    config: LlmInt8Config = LlmInt8Config()
    name: ClassVar[str] = "llm_int8"

    @property
    def needs_calibration(self) -> bool:           # dynamic: every scale and the outlier set come from the call
        return self.config.outliers == "static"

    def run(self, gm: GraphModule, ctx: Context) -> PassResult:
        cfg = self.config
        sites = ctx.get(LinearSites(), gm)
        todo, near, at = choose_linears(gm, sites, cfg.targets, cfg.ignore, "llm_int8", inputs=True)
        if not todo:
            return PassResult(modified=False, stats={"linears": 0}, near_misses=near)
        if cfg.outliers == "dynamic":
            return self._dynamic(gm, ctx, todo, near, at)
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

    def _dynamic(self, gm: GraphModule, ctx: Context, todo, near, at) -> PassResult:
        """Per-row int8 weights over every column; inputs with the per-call threshold columns."""
        cfg, items = self.config, []
        for s in todo:
            with ctx.loaded([s.weight.target]):
                w = param_of(gm, s.weight).detach()
                w = w if s.in_axis == 1 else w.t()                                  # [out, in]
                scale, _ = choose_qparams(w, WEIGHTS, block_size=(1, -1))
            scale = scale.t().contiguous() if s.use_in_axis == 0 else scale
            items.append((QuantMeta("weight", "", site_key(s), WEIGHTS), weight_block_size(WEIGHTS, s.use_in_axis),
                          {"scale": scale}, at[s.node]))
            items.append((QuantMeta("input", "", site_key(s), INPUTS), INPUTS.block_size(s.input.meta["val"].shape),
                          {}, at[s.node]))
        plan = build(self.name, items, decisions={"threshold": cfg.threshold, "outliers": "dynamic"})
        self.apply(gm, plan)
        return PassResult(modified=True, stats={"linears": len(todo), "outliers": "dynamic",
                                                "threshold": cfg.threshold}, near_misses=near, plan=plan)

    @classmethod
    def apply(cls, gm: GraphModule, plan: Plan) -> None:
        """Insert the plan's weight and input quantizers (float columns where the plan records them; the
        threshold columns on every input of a dynamic plan)."""
        sites = linear_sites(gm)
        index = SiteIndex(sites)
        dynamic = plan.decisions.get("outliers") == "dynamic"
        for qp, t in zip(plan.quantizers, plan.tensors()):
            site = index.quantized(qp)
            weight = qp.meta.role == "weight"
            src = site.weight_use if weight else site.input
            axis = site.use_in_axis if weight else -1
            if dynamic and not weight:
                side = SideChannels(threshold_columns=ThresholdColumns(float(plan.decisions["threshold"]), -1))
            elif "float_columns" in t:
                side = SideChannels(float_columns=FloatColumns(t["float_columns"], axis))
            else:
                side = SideChannels()
            meta = dataclasses.replace(qp.meta, site=site.node.name, path=site.path)
            name = f"{site.weight.target}_scale" if weight else f"{site_key(site)}_input"
            q = insert_quantizer(gm, site.node, src, meta, block=list(qp.block), scale=t.get("scale"),
                                 name=name, side=side, origin="llm_int8")
            site.node.replace_input_with(src, q.node)



__all__ = ["LlmInt8", "LlmInt8Config"]
