"""Re-round the weights the quantize pass inserted with QuantEase (Behdin et al. 2023): cyclic coordinate descent
on the layer objective ||WX - W_hat X||^2.

Matches   every linear whose weight goes through a static ``qpass.fake_quantize`` weight quantizer (inserted by an
          earlier ``quantize`` pass, built-in grid, no side channels), selected by targets/ignore
Changes   the float weight W -> Q (exactly representable: fake_quantize(Q) == Q) and, with ``init: gptq``, the
          quantizer's scale / zero point (GPTQ's); Q comes from ``iterations`` sweeps of closed-form coordinate
          updates on the grid (qpass.primitives.quantease), started from GPTQ (``init: gptq``, the reference's
          gptq_quantease) or from the quantize pass's rounding (``init: rtn``)
          ``outliers: p`` (the outlier-aware variant): the weight quantizer becomes ``qpass.fake_quantize_ext`` with
          round(p * out * in) sparse float values added after dequantization (the ``outliers`` side channel),
          fitted by iterative hard thresholding between the sweeps; the torch backend lowers it (generic
          dequantize-then-matmul), the ONNX backend as a ScatterND add (onnx_qdq/side_channels.py)
Requires  calibration data: GPTQ's block sweep and Hessians (passes.gptq.hessian_sweep), block i calibrated on
          the outputs of blocks 0..i-1 as already re-rounded (``feed: quantized``) or of the float model
Preserves graph structure without outliers (weights and qparam buffers change in place)

Reports, per linear, ||WX - W_hat X||^2 over the calibration tokens for QuantEase, for GPTQ and for RTN with the
same quantizer and the same inputs (GPTQ is run for the comparison also when ``init: rtn``), and their ratio:
QuantEase started from GPTQ never ends above it (each coordinate step is an exact minimisation on the grid).
Deviations from the reference code are listed in qpass.primitives.quantease.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch.fx import GraphModule

from qpass.analyses import LinearSites
from qpass.errors import QuantizationError, RecipeError
from qpass.graph import LinearSite, describe, linear_sites, param_of, select, site_key
from qpass.pass_infra import Context, Pass, PassResult
from qpass.plan import Plan, PlanError, SiteIndex, occurrences
from qpass.primitives.gptq import HessianAccumulator, gptq_quantize, reconstruction_error
from qpass.primitives.quantease import quantease
from qpass.quantizer import Quantizer, SideChannels, SparseValues, insert_quantizer

from .gptq import WeightState, _weight_quantizer, hessian_sweep, requantizable


@dataclass(frozen=True)
class QuantEaseConfig:
    name: ClassVar[str] = "quantease"
    field_docs: ClassVar[dict] = {
        "iterations": "coordinate-descent sweeps over all columns (the reference: 30)",
        "init": "starting point: gptq (GPTQ's weights and scales; the reference's gptq_quantease) or rtn (the "
                "quantize pass's rounding and scales)",
        "outliers": "fraction of each linear's weights kept as sparse float values beside the grid (the "
                    "outlier-aware variant; the reference: 0.01); 0 = off",
        "act_order": "visit columns by decreasing diag(H) (and GPTQ's act-order for init: gptq)",
        "damp": "init gptq: dampening, a fraction of mean(diag H)",
        "block_size": "columns per lazy batch update (GPTQ's and the sweeps')",
        "sequential": "calibrate block by block (false: one run of the whole model with float weights)",
        "true_sequential": "within a block, re-round linears in dependency order, re-observing in between",
        "feed": "inputs of block i+1: `quantized` (block i as re-rounded) or `float` (the float model)",
        "targets": "module-path globs of quantized linears to re-round",
        "ignore": "module-path globs to leave as the quantize pass rounded them",
    }

    iterations: int = 30
    init: Literal["gptq", "rtn"] = "gptq"
    outliers: float = 0.0
    act_order: bool = True
    damp: float = 0.01
    block_size: int = 128
    sequential: bool = True
    true_sequential: bool = True
    feed: Literal["quantized", "float"] = "quantized"
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ()

    def __post_init__(self):
        if not 0 <= self.iterations <= 10_000:
            raise RecipeError("iterations", f"must be a number of sweeps in [0, 10000] (the paper: 30), "
                              f"got {self.iterations}")
        if not 0.0 <= self.outliers < 1.0:
            raise RecipeError("outliers", f"must be a fraction of the weights in [0, 1) (the paper: 0.01), "
                              f"got {self.outliers}")
        if not 0.0 <= self.damp < 10.0:
            raise RecipeError("damp", f"must be in [0, 10) (a fraction of mean(diag H)), got {self.damp}")
        if not 1 <= self.block_size <= 1 << 16:
            raise RecipeError("block_size", f"must be in [1, {1 << 16}] (usual: 128), got {self.block_size}")
        if not self.targets:
            raise RecipeError("targets", "must list at least one module-path glob (e.g. ['*'])")


@dataclass(frozen=True)
class QuantEase(Pass):
    """Re-round quantized weights by coordinate descent on ||WX - W_hat X||^2 (QuantEase), block by block."""

    config: QuantEaseConfig = QuantEaseConfig()
    name: ClassVar[str] = "quantease"
    needs_calibration: ClassVar[bool] = True

    def run(self, gm: GraphModule, ctx: Context) -> PassResult:
        cfg = self.config
        sites = ctx.get(LinearSites(), gm)
        quantized = [s for s in sites if _weight_quantizer(s) is not None]
        if sites and not quantized:
            raise QuantizationError(
                f"quantease found no quantized weights among the {len(sites)} linears (e.g. "
                f"{describe(gm, sites[0].node)})",
                fix="place '- quantize: {weights: {bits: 3, granularity: per_group, group_size: 64}}' before "
                    "'- quantease' in the recipe: quantease re-rounds the weights that pass inserted")
        chosen = select([s.path for s in quantized], cfg.targets, cfg.ignore, "quantease") if quantized else set()
        at = dict(zip((s.node for s in sites), occurrences(site_key(s) for s in sites)))
        near = [f"{site_key(s)}: excluded by targets/ignore" for s in quantized if s.path not in chosen]
        todo, why_not = requantizable(gm, [s for s in quantized if s.path in chosen])
        near += why_not
        stats = {"linears": 0, "mean_ratio_vs_gptq": None, "at_or_below_gptq": 0, "outliers": 0}
        if not todo:
            return PassResult(modified=False, stats=stats, near_misses=near)
        counts = [{"path": site_key(s), "at": at[s.node], "count": _outlier_count(gm, s, cfg.outliers)} for s in todo]
        counts = [c for c in counts if c["count"]]
        plan = Plan(self.name, decisions={"linears": sorted(site_key(s) for s in todo), "outliers": counts})
        if counts:           # the sparse side channel first (zeros), filled in place by the sweep below
            self.apply(gm, plan)
            fresh = {s.node: s for s in linear_sites(gm)}
            todo = [fresh[s.node] for s in todo]
        errors = {}

        def requantize(s: LinearSite, acc: HessianAccumulator) -> None:
            errors[site_key(s)] = self._requantize(gm, s, acc)

        hessians, blocks = hessian_sweep(gm, ctx, todo, requantize, who="quantease", sequential=cfg.sequential,
                                         true_sequential=cfg.true_sequential, feed=cfg.feed)
        ratios = [e["ratio_vs_gptq"] for e in errors.values()]
        stats.update(linears=len(errors), hessians=hessians, blocks=blocks,
                     mean_ratio_vs_gptq=sum(ratios) / len(ratios), at_or_below_gptq=sum(r <= 1 for r in ratios),
                     outliers=sum(c["count"] for c in counts), errors=errors)
        return PassResult(modified=True, stats=stats, near_misses=near, plan=plan)

    @classmethod
    def apply(cls, gm: GraphModule, plan: Plan) -> None:
        """Give the weight quantizers the plan lists outliers for their sparse side channel (the values come
        from the fresh run or the saved state dict); re-rounded values need nothing else in the graph."""
        sites = linear_sites(gm)
        index = SiteIndex(sites)
        for o in plan.decisions.get("outliers", []):
            site = index.get(o["path"], o["at"])
            q = Quantizer.of(site.weight_use) if site is not None else None
            if q is None or q.role != "weight" or q.side_channels:
                raise PlanError(f"the plan adds outliers to the weight quantizer of {o['path']!r} (occurrence "
                                f"{o['at']}), which this graph does not have as a plain weight quantizer",
                                fix="apply the plans in order to a capture of the model they were made on")
            k = int(o["count"])
            side = SideChannels(outliers=SparseValues(torch.zeros(k, dtype=torch.int64), torch.zeros(k)))
            meta = dataclasses.replace(q.meta, site=site.node.name)
            new = insert_quantizer(gm, q.node, q.x, meta, block=list(q.block), scale=q.scale,
                                   zero_point=q.zero_point, name=site.weight.target, side=side, origin="quantease")
            q.node.replace_all_uses_with(new.node)
            gm.graph.erase_node(q.node)

    def _requantize(self, gm: GraphModule, site: LinearSite, acc: HessianAccumulator) -> dict:
        """QuantEase one linear; write weight, qparams and outliers back in their stored layouts."""
        cfg, ws = self.config, WeightState.of(gm, site)
        h = acc.hessian
        rtn = ws.rtn()
        gptq = gptq_quantize(ws.w, h, ws.spec, block=ws.block, percdamp=cfg.damp, block_size=cfg.block_size,
                             act_order=cfg.act_order)
        if cfg.init == "gptq":
            start, scale, zp = gptq.weight, gptq.scale, gptq.zero_point
        else:
            start, scale, zp = rtn, ws.scale, ws.zero_point
        side = Quantizer(_weight_quantizer(site)).side_channels.outliers
        k = param_of(gm, side.index).numel() if side is not None else 0
        res = quantease(ws.w, h, start, scale, zp, ws.block, ws.fq.fmt_name, iterations=cfg.iterations, outliers=k,
                        act_order=cfg.act_order, block_size=cfg.block_size)
        ws.write(res.weight, scale, zp)
        final = res.weight
        if k:
            out_f, in_f = ws.w.shape
            rows, cols = res.outlier_index // in_f, res.outlier_index % in_f
            with torch.no_grad():     # flat indices into the quantizer's own layout ([in, out] for the mm family)
                param_of(gm, side.index).copy_(cols * out_f + rows if ws.flip else res.outlier_index)
                param_of(gm, side.value).copy_(res.outlier_value)
            final = res.weight.double().reshape(-1).index_add(0, res.outlier_index, res.outlier_value.double())
            final = final.reshape(ws.w.shape)
        err = reconstruction_error(ws.w, final, acc.xtx)
        err_g, err_r = reconstruction_error(ws.w, gptq.weight, acc.xtx), reconstruction_error(ws.w, rtn, acc.xtx)
        return {"quantease": err, "gptq": err_g, "rtn": err_r, "ratio_vs_gptq": err / err_g if err_g > 0 else 1.0,
                "sweeps": len(res.objective) - 1, "outliers": k}


def _outlier_count(gm: GraphModule, site: LinearSite, fraction: float) -> int:
    return int(round(fraction * param_of(gm, site.weight).numel()))



__all__ = ["QuantEase", "QuantEaseConfig"]
