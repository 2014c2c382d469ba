"""Re-round the weights the quantize pass inserted with SpQR (Dettmers, Svirschevski, Egiazarian et al. 2024):
GPTQ with tiny groups, 3-bit group statistics and unstructured float outliers.

Matches   every linear whose weight goes through a static ``qpass.fake_quantize`` weight quantizer of an
          asymmetric integer format in groups along the input (inserted by an earlier ``quantize`` pass, e.g.
          ``{bits: 3, granularity: per_group, group_size: 16, symmetric: false}``), selected by targets/ignore
Changes   the weight quantizer -> ``qpass.fake_quantize_ext`` with two side channels: second-level scales
          (``scale_q``: the group scales quantized to ``scale_bits`` with min-max in blocks of ``scale_group``
          output rows, fp16 second-level scale and int16 zero point per block) and, with outliers on, sparse
          float values (``outliers``: int64 flat index, fp16 value); the float weight -> its grid values (0 at
          an outlier, whose code is the zero point) and the group scales / zero points, in place. The numerics
          (leave-one-out outlier-aware statistics, the column loop with outliers kept in float by the
          error-reduction criterion ``((w - q(w)) / [U]_jj)^2 > tau``) are qpass.primitives.spqr
          ``target_bits``: per linear, the smallest relative threshold whose outliers fit the bits left after
          codes and statistics (as qpass.eval counts them: 48 bits per outlier) is searched (log bisection,
          ``search_steps`` runs of the column loop), so each linear meets the target
Requires  calibration data: GPTQ's block sweep and Hessians (passes.gptq.hessian_sweep), block i calibrated on the
          outputs of blocks 0..i-1 as already re-rounded (``feed: quantized``) or of the float model
Preserves nothing (the weight quantizers change op)

The side channels are inserted before the sweep, with room for at most ``max_outliers`` (a fraction; the
target's budget with ``target_bits``) outliers per linear, so blocks calibrated later see the earlier ones
exactly as they end up; afterwards the outlier tensors are cut to the count found, which the plan records.
"""
from __future__ import annotations

import dataclasses
import math
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
from qpass.primitives.spqr import SpqrResult, spqr_quantize
from qpass.quantizer import Quantizer, ScaleQuant, SideChannels, SparseValues, insert_quantizer

from .gptq import WeightState, _weight_quantizer, hessian_sweep, requantizable

OUTLIER_BITS = 48          # an fp16 value and an int32 index, as qpass.eval.quantizer_bytes counts them
STAT_BITS = 16             # a second-level scale (fp16) or zero point (int16)


@dataclass(frozen=True)
class SpqrConfig:
    name: ClassVar[str] = "spqr"
    field_docs: ClassVar[dict] = {
        "scale_bits": "bits of the quantized group scales (the paper: 3)",
        "scale_group": "output rows per second-level group of scales (the paper: 16)",
        "outlier_threshold": "relative threshold tau of the error-reduction criterion (the paper: 0.2); "
                             "null: no outliers (GPTQ with quantized statistics); the start of the target_bits search",
        "target_bits": "average bits per weight each linear may use, outliers included: the threshold is "
                       "searched per linear (null: use outlier_threshold as it is)",
        "max_outliers": "without target_bits: at most this fraction of each linear's weights become outliers "
                        "(the column loop stops adding them there)",
        "search_steps": "target_bits: runs of the column loop per linear in the threshold search",
        "act_order": "visit columns by decreasing diag(H) (the paper's permutation order act_order)",
        "damp": "dampening, a fraction of mean(diag H) (the paper's README: 1.0 for near-lossless)",
        "block_size": "columns per lazy batch update",
        "sequential": "calibrate block by block (false: one run of the whole model with float weights)",
        "true_sequential": "within a block, quantize linears in dependency order, re-observing in between",
        "feed": "inputs of block i+1: `quantized` (block i as re-rounded) or `float` (the float model)",
        "targets": "module-path globs of quantized linears to re-round",
        "ignore": "module-path globs to leave as the quantize pass rounded them",
    }

    scale_bits: int = 3
    scale_group: int = 16
    outlier_threshold: float | None = 0.2
    target_bits: float | None = None
    max_outliers: float = 0.05
    search_steps: int = 10
    act_order: bool = True
    damp: float = 0.01
    block_size: int = 128
    sequential: bool = True
    true_sequential: bool = True
    feed: Literal["quantized", "float"] = "quantized"
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ()

    def __post_init__(self):
        if not 2 <= self.scale_bits <= 8:
            raise RecipeError("scale_bits", f"must be in [2, 8] (the paper: 3), got {self.scale_bits}")
        if self.scale_group < 1:
            raise RecipeError("scale_group", f"must be a number of rows >= 1 (the paper: 16), got {self.scale_group}")
        if self.outlier_threshold is not None and not self.outlier_threshold > 0:
            raise RecipeError("outlier_threshold", f"must be > 0 (the paper: 0.2; null: no outliers), got "
                              f"{self.outlier_threshold}")
        if self.target_bits is not None and not 1.0 < self.target_bits < 32.0:
            raise RecipeError("target_bits", f"must be an average bits per weight in (1, 32), got {self.target_bits}")
        if not 0.0 <= self.max_outliers < 1.0:
            raise RecipeError("max_outliers", f"must be a fraction in [0, 1), got {self.max_outliers}")
        if not 1 <= self.search_steps <= 64:
            raise RecipeError("search_steps", f"must be in [1, 64], got {self.search_steps}")
        if not 0.0 <= self.damp < 10.0:
            raise RecipeError("damp", f"must be in [0, 10) (a fraction of mean(diag H)), got {self.damp}")
        if not 1 <= self.block_size <= 1 << 16:
            raise RecipeError("block_size", f"must be in [1, {1 << 16}] (usual: 128), got {self.block_size}")
        if not self.targets:
            raise RecipeError("targets", "must list at least one module-path glob (e.g. ['*'])")

    @property
    def outliers(self) -> bool:
        return self.target_bits is not None or self.outlier_threshold is not None


@dataclass(frozen=True)
class Spqr(Pass):
    """Re-round quantized weights with SpQR (GPTQ, quantized group statistics, float outliers), block by block."""

    config: SpqrConfig = SpqrConfig()
    name: ClassVar[str] = "spqr"
    needs_calibration: ClassVar[bool] = True

    def run(self, gm: GraphModule, ctx: Context) -> PassResult:
        cfg = self.config
        sites = ctx.get(LinearSites(), gm)
        quantized = [s for s in sites if _weight_quantizer(s) is not None]
        if sites and not quantized:
            raise QuantizationError(
                f"spqr found no quantized weights among the {len(sites)} linears (e.g. {describe(gm, sites[0].node)})",
                fix="place '- quantize: {weights: {bits: 3, granularity: per_group, group_size: 16, symmetric: "
                    "false}}' before '- spqr' in the recipe: spqr re-rounds the weights that pass inserted")
        chosen = select([site_key(s) for s in quantized], cfg.targets, cfg.ignore, "spqr") if quantized else set()
        at = dict(zip((s.node for s in sites), occurrences(site_key(s) for s in sites)))
        near = [f"{site_key(s)}: excluded by targets/ignore" for s in quantized if site_key(s) not in chosen]
        todo, why_not = requantizable(gm, [s for s in quantized if site_key(s) in chosen])
        near += why_not
        for s in list(todo):
            why = _grid_unsupported(s)
            if why:
                near.append(f"{site_key(s)}: {why}")
                todo.remove(s)
        stats = {"linears": 0, "outliers": 0}
        if not todo:
            return PassResult(modified=False, stats=stats, near_misses=near)
        rows = [self._decision(gm, s, at[s.node]) for s in todo]
        plan = Plan(self.name, decisions={"linears": rows})
        self.apply(gm, plan)            # side channels first (placeholders), filled in place by the sweep
        fresh = {s.node: s for s in linear_sites(gm)}
        todo = [fresh[s.node] for s in todo]
        room = {(r["path"], r["at"]): r["outliers"] or 0 for r in rows}
        errors, found = {}, {}

        def requantize(s: LinearSite, acc: HessianAccumulator) -> None:
            key = (site_key(s), at[s.node])
            errors[site_key(s)], found[key] = self._requantize(gm, s, acc, room[key])

        hessians, blocks = hessian_sweep(gm, ctx, todo, requantize, who="spqr", sequential=cfg.sequential,
                                         true_sequential=cfg.true_sequential, feed=cfg.feed)
        for r, s in zip(rows, todo):    # cut the outlier tensors to the count found
            if cfg.outliers:
                r["outliers"] = found[r["path"], r["at"]]
                _cut_outliers(gm, Quantizer(_weight_quantizer(s)), r["outliers"])
        ratios = [e["ratio_vs_gptq"] for e in errors.values()]
        stats.update(linears=len(errors), hessians=hessians, blocks=blocks, outliers=sum(found.values()),
                     mean_ratio_vs_gptq=sum(ratios) / len(ratios), errors=errors)
        return PassResult(modified=True, stats=stats, near_misses=near, plan=plan)

    def _decision(self, gm: GraphModule, site: LinearSite, at: int) -> dict:
        """The plan row of one linear: where, the second-level block, and room for its outliers."""
        cfg, (fq, (out_f, in_f), block) = self.config, _layout(site)
        room = None
        if cfg.target_bits is not None:
            bits = fq.meta.spec.bits
            left = cfg.target_bits - stat_bits(out_f, in_f, bits, block[1], cfg.scale_bits, cfg.scale_group)
            if left < 0:
                raise QuantizationError(
                    f"spqr: target_bits {cfg.target_bits} is below the {cfg.target_bits - left:.3f} bits/weight that "
                    f"int{bits} codes in groups of {block[1]} with {cfg.scale_bits}-bit statistics take "
                    f"in {site_key(site)}", fix="raise target_bits, or use larger groups (quantize.weights.group_size)")
            room = int(left * out_f * in_f // OUTLIER_BITS)
        elif cfg.outliers:
            room = int(cfg.max_outliers * out_f * in_f)
        return {"path": site_key(site), "at": at, "scale_block": [cfg.scale_group, 1],
                "scale_fmt": f"int{cfg.scale_bits}", "outliers": room}

    @classmethod
    def apply(cls, gm: GraphModule, plan: Plan) -> None:
        """Give the weight quantizers the plan lists their side channels: second-level scales (placeholders of
        the recorded block) and, where recorded (a count, 0 allowed), sparse values; the values come from the
        fresh run or the saved state dict."""
        sites = linear_sites(gm)
        index = SiteIndex(sites)
        for r in plan.decisions["linears"]:
            site = index.get(r["path"], r["at"])
            q = Quantizer.of(site.weight_use) if site is not None else None
            if q is None or q.role != "weight" or q.side_channels or q.zero_point is None:
                raise PlanError(f"the plan gives SpQR side channels to the weight quantizer of {r['path']!r} "
                                f"(occurrence {r['at']}), which this graph does not have as a plain asymmetric "
                                "weight quantizer", fix="apply the plans in order to a capture of the model they "
                                "were made on")
            flip = site.use_in_axis == 0
            canon = lambda t: t.t() if flip else t      # noqa: E731
            scale = param_of(gm, q.scale)
            rows, _ = r["scale_block"]
            out_f = canon(scale).shape[0]
            shape2 = (-(-out_f // rows), canon(scale).shape[1])
            s2 = canon(torch.ones(shape2, dtype=torch.float16))
            z2 = canon(torch.zeros(shape2, dtype=torch.int16))
            block2 = r["scale_block"][::-1] if flip else r["scale_block"]
            k = r.get("outliers")
            outliers = None if k is None else SparseValues(torch.zeros(k, dtype=torch.int64),
                                                           torch.zeros(k, dtype=torch.float16))
            side = SideChannels(outliers=outliers, scale_q=ScaleQuant(s2, tuple(block2), r["scale_fmt"], z2))
            meta = dataclasses.replace(q.meta, site=site.node.name)
            new = insert_quantizer(gm, q.node, q.x, meta, block=list(q.block), scale=q.scale, zero_point=q.zero_point,
                                   name=site.weight.target, side=side, origin="spqr")
            q.node.replace_all_uses_with(new.node)
            gm.graph.erase_node(q.node)

    def _requantize(self, gm: GraphModule, site: LinearSite, acc: HessianAccumulator, room: int) -> tuple[dict, int]:
        """SpQR one linear (searching the threshold for target_bits); write weight, statistics and outliers back."""
        cfg, ws = self.config, WeightState.of(gm, site)
        h = acc.hessian
        run = lambda tau: spqr_quantize(ws.w, h, bits=ws.spec.bits, group_size=ws.block[1],   # noqa: E731
                                        scale_bits=cfg.scale_bits, scale_group=cfg.scale_group, tau=tau,
                                        percdamp=cfg.damp, act_order=cfg.act_order, block_size=cfg.block_size,
                                        max_outliers=room)
        if cfg.target_bits is not None:
            res, tau = search_threshold(run, cfg.outlier_threshold or 0.2, room, cfg.search_steps)
        else:
            tau = cfg.outlier_threshold if cfg.outliers else math.inf
            res = run(tau)
        _write(gm, ws, res)
        gptq = gptq_quantize(ws.w, h, ws.spec, block=ws.block, percdamp=cfg.damp, block_size=cfg.block_size,
                             act_order=cfg.act_order)
        err = reconstruction_error(ws.w, res.dense(), acc.xtx)
        err_g = reconstruction_error(ws.w, gptq.weight, acc.xtx)
        return {"spqr": err, "gptq_float_stats": err_g, "ratio_vs_gptq": err / err_g if err_g > 0 else 1.0,
                "outliers": res.outliers, "tau": tau}, res.outliers


def search_threshold(run, tau0: float, room: int, steps: int) -> tuple[SpqrResult, float]:
    """The result of the smallest relative threshold (on a log grid, `steps` runs at most) whose outliers fit
    `room`; ``run(tau)`` caps the count at `room` anyway, so every candidate fits. More outliers by the
    criterion never raise the layer's error, so the smallest fitting threshold uses the budget best."""
    if room == 0:
        return run(math.inf), math.inf
    fits, over = None, None                       # (tau, result) that fits uncapped / that hits the cap
    tau = tau0
    for _ in range(steps):
        res = run(tau)
        if res.outliers < room:
            fits = (tau, res)
        else:
            over = (tau, res)
        if fits is not None and over is not None:
            tau = math.sqrt(fits[0] * over[0])
        else:
            tau = tau / 4 if over is None else tau * 4
    best = fits if fits is not None else over
    return best[1], best[0]


def stat_bits(out_f: int, in_f: int, bits: int, group: int, scale_bits: int, rows: int) -> float:
    """Bits per weight of codes and statistics (no outliers), as qpass.eval.quantizer_bytes counts them."""
    groups = out_f * -(-in_f // group)
    second = -(-out_f // rows) * -(-in_f // group)
    return bits + (groups * (scale_bits + bits) + second * 2 * STAT_BITS) / (out_f * in_f)


def _write(gm: GraphModule, ws: WeightState, res: SpqrResult) -> None:
    """Weight, scales, zero points, second-level statistics and outliers in the quantizer's layout."""
    ws.write(res.weight, res.scale, res.zero_point)
    side = Quantizer(_weight_quantizer(ws.site)).side_channels
    canon = lambda t: t.t() if ws.flip else t     # noqa: E731
    with torch.no_grad():
        param_of(gm, side.scale_q.scale).copy_(canon(res.scale_scale))
        param_of(gm, side.scale_q.zero_point).copy_(canon(res.scale_zero))
        if side.outliers is not None:
            out_f = ws.w.shape[0]
            idx = res.outlier_index
            if ws.flip:        # flat indices into the quantizer's own layout ([in, out] for the mm family)
                idx = (idx % ws.w.shape[1]) * out_f + idx // ws.w.shape[1]
            index, value = param_of(gm, side.outliers.index), param_of(gm, side.outliers.value)
            index.zero_(), value.zero_()           # unused room: index 0, value 0 (adds nothing)
            index[:idx.numel()] = idx
            value[:idx.numel()] = res.outlier_value


def _cut_outliers(gm: GraphModule, q: Quantizer, k: int) -> None:
    """Shrink the outlier buffers of `q` to their first `k` entries (same buffer names)."""
    for n in (q.side_channels.outliers.index, q.side_channels.outliers.value):
        t = getattr(gm, n.target)[:k].clone()
        gm.register_buffer(n.target, t)
        n.meta["val"] = t


def _layout(site: LinearSite) -> tuple[Quantizer, tuple[int, int], tuple[int, ...]]:
    """The weight quantizer, the canonical [out, in] shape and block, from the graph (no weight values read:
    with the weights on disk they are loaded block by block)."""
    fq = Quantizer(_weight_quantizer(site))
    shape, block = tuple(fq.x.meta["val"].shape), fq.block
    flip = site.use_in_axis == 0
    return fq, (shape[::-1] if flip else shape), (block[::-1] if flip else block)


def _grid_unsupported(site: LinearSite) -> str | None:
    fq, _, block = _layout(site)
    if fq.fmt.kind != "int" or fq.zero_point is None:
        return (f"spqr needs an asymmetric integer weight quantizer (quantize.weights symmetric: false), got "
                f"{fq.fmt_name}{' symmetric' if fq.zero_point is None else ''}")
    if block[0] != 1 or block[1] in (-1, 1):
        return f"spqr needs groups along the input (quantize.weights granularity: per_group), got block {block}"
    return None



__all__ = ["Spqr", "SpqrConfig", "search_threshold", "stat_bits"]
