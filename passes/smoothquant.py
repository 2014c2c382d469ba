"""Move activation outliers into the following weights (SmoothQuant, Xiao et al. 2023).

Matches   every folding group of ``qpass.folding.analyze``: a producer (RMSNorm / LayerNorm weight and
          bias, a per-channel parameter multiply, or a previous linear's output rows) and the linears that
          read it (q/k/v; gate/up; fused qkv; v_proj -> o_proj; up_proj -> down_proj; fc1 -> relu -> fc2)
Changes   producer channel c /= s_c;  consumer input column j *= s_{map(j)};  no nodes added or removed
          s_c = max|X_c|^alpha / max|W_c|^(1 - alpha), the max over the group's inputs and weights, per
          producer channel (repeated GQA heads and fused rows share it), clamped to [min_scale, 1/min_scale]
          alpha fixed, or ``search``: per group, the grid value minimising the group's output error with
          the quantizers of `weights` / `activations` on a sample of calibration inputs
Requires  FoldGroups; Observed linear inputs (one calibration run: per-channel absmax of each group input, plus
          a token sample to search)
Preserves graph structure (LinearSites, AttentionSites, FoldGroups, ResidualStream); outputs equal up to float
          rounding (check with the recipe's ``verify: true``)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch.fx import GraphModule

from qpass.analyses import STRUCTURE, FoldGroups, Observed
from qpass.errors import RecipeError
from qpass.folding import FoldGroup, canonical_weight, fold_scales, to_channels, weight_absmax
from qpass.graph import select
from qpass.plan import Plan
from qpass.pass_infra import Context, Pass, PassResult
from qpass.primitives import choose_qparams
from qpass.primitives import quant as Q
from qpass.primitives.spec import IntFormat, PerChannel, PerHead, PerToken, QSpec


@dataclass(frozen=True)
class SmoothQuantConfig:
    name: ClassVar[str] = "smoothquant"
    field_docs: ClassVar[dict] = {
        "alpha": "migration strength in [0, 1] (0.5 for OPT, 0.8 for LLaMA in the paper), or `search`: a "
                 "grid search per group (a group no grid value improves is left unsmoothed; its alpha is null)",
        "search_step": "grid step of `alpha: search` (0.05: 21 values from 0 to 1)",
        "search_tokens": "calibration tokens kept per group input for `alpha: search`",
        "weights": "weight quantizer assumed by `alpha: search` (not inserted: use the quantize pass)",
        "activations": "input quantizer assumed by `alpha: search` (static specs are emulated per sample)",
        "min_scale": "smoothing scales are clamped to [min_scale, 1 / min_scale]",
        "targets": "module-path globs of the linears to smooth (a group is smoothed if all its linears are)",
        "ignore": "module-path globs of linears to leave alone (their whole group is skipped)",
    }

    alpha: Any = 0.5
    search_step: float = 0.05
    search_tokens: int = 512
    weights: QSpec = QSpec(IntFormat(8), PerChannel(0))
    activations: QSpec = QSpec(IntFormat(8), PerToken(), dynamic=True)
    min_scale: float = 1e-5
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ()

    def __post_init__(self):
        a = self.alpha
        if isinstance(a, str):
            if a != "search":
                raise RecipeError("alpha", f"must be a number in [0, 1] or 'search', got {a!r}")
        elif isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a <= 1.0:
            raise RecipeError("alpha", f"must be a number in [0, 1] or 'search', got {a!r}")
        else:
            object.__setattr__(self, "alpha", float(a))
        if not 0.001 <= self.search_step <= 1.0:
            raise RecipeError("search_step", f"must be in [0.001, 1] (at most 1001 grid values), "
                              f"got {self.search_step}")
        if not 1 <= self.search_tokens <= 1 << 20:
            raise RecipeError("search_tokens", f"must be an integer in [1, {1 << 20}], got {self.search_tokens}")
        if not 0.0 < self.min_scale < 1.0:
            raise RecipeError("min_scale", f"must be in (0, 1), got {self.min_scale}")
        if isinstance(self.weights.granularity, (PerToken, PerHead)) or self.weights.dynamic:
            raise RecipeError("weights", "weights take static per_tensor, per_channel or per_group")
        if getattr(self.weights.granularity, "axis", 0) not in (0, 1, -1, -2):
            raise RecipeError("weights.axis", "a weight is [out, in]: axis is 0 (out) or 1 (in)")
        if isinstance(self.activations.granularity, PerHead):
            raise RecipeError("activations.granularity", "per_head is for the KV cache")
        if getattr(self.activations.granularity, "axis", -1) != -1:
            raise RecipeError("activations.axis", "activation channels are the last axis: use axis: -1")
        if not self.targets:
            raise RecipeError("targets", "must list at least one module-path glob (e.g. ['*'])")

    @property
    def grid(self) -> list[float]:
        n = int(math.floor(1.0 / self.search_step + 1e-9))
        return sorted({round(min(1.0, i * self.search_step), 6) for i in range(n + 1)} | {1.0})


@dataclass(frozen=True)
class SmoothQuant(Pass):
    """Migrate activation outliers into weights with per-channel scales folded into the producers."""

    config: SmoothQuantConfig = SmoothQuantConfig()
    name: ClassVar[str] = "smoothquant"
    needs_calibration: ClassVar[bool] = True
    preserves: ClassVar = STRUCTURE          # rescales parameters only

    def run(self, gm: GraphModule, ctx: Context) -> PassResult:
        cfg = self.config
        analysis = ctx.get(FoldGroups(), gm)
        paths = [c.site.path for g in analysis.groups for c in g.consumers] + list(analysis.unfoldable)
        chosen = select(paths, cfg.targets, cfg.ignore, "smoothquant")
        near = [f"{p}: {why}" for p, why in analysis.unfoldable.items() if p in chosen]
        todo = []
        for g in analysis.groups:
            left = [c.site.path for c in g.consumers if c.site.path not in chosen]
            if left:
                near.append(f"{g.name}: group skipped, {', '.join(left)} excluded by targets/ignore")
            else:
                todo.append(g)
        stats = {"groups_smoothed": 0, "linears_smoothed": 0, "no_folding_point": len(analysis.unfoldable)}
        if not todo:
            return PassResult(modified=False, stats=stats, near_misses=near)
        observed = self._observe(gm, ctx, todo)
        alphas = {}
        for g in todo:
            with ctx.loaded([p.target for p, _ in g.producer.params] + [c.site.weight.target for c in g.consumers]):
                x_absmax = [observed[c.site.input.name].absmax for c in g.consumers]
                a = self._search(gm, g, observed) if cfg.alpha == "search" else cfg.alpha
                if a is not None:
                    s = smoothing_scales(to_channels(g, x_absmax), to_channels(g, [weight_absmax(gm, c.site)
                                                                                   for c in g.consumers]),
                                         a, cfg.min_scale, g.consumed)
                    fold_scales(gm, g, s)
            alphas[g.name] = a
        smoothed = [g for g in todo if alphas[g.name] is not None]
        stats.update(groups_smoothed=len(smoothed), linears_smoothed=sum(len(g.consumers) for g in smoothed))
        if cfg.alpha == "search":
            stats["alphas"] = alphas
        # parameters only (the state dict holds the smoothed values): the plan records the alpha of each group
        plan = Plan(self.name, decisions={"alphas": alphas})
        return PassResult(modified=True, stats=stats, near_misses=near, plan=plan)

    def _observe(self, gm: GraphModule, ctx: Context, groups: list[FoldGroup]) -> dict:
        calib = ctx.require_calibration("smoothquant")
        nodes = tuple(dict.fromkeys(c.site.input.name for g in groups for c in g.consumers))
        keep = -(-self.config.search_tokens // len(calib)) if self.config.alpha == "search" else 0
        return ctx.get(Observed(nodes, _MakeInputStats(keep), who="smoothquant",
                                desc="smoothquant: observing linear inputs"), gm)

    def _search(self, gm: GraphModule, g: FoldGroup, observed: dict) -> float | None:
        """The grid alpha minimising sum over consumers of ||X W^T - Q(X / s) Q(W s)^T||^2, or None (leave the
        group unsmoothed) when no grid value beats s = 1. alpha = 0 is not the identity: s = 1 / max|W|."""
        cfg = self.config
        xs = [observed[c.site.input.name].sample() for c in g.consumers]
        ws = [canonical_weight(gm, c.site).double() for c in g.consumers]
        refs = [x @ w.t() for x, w in zip(xs, ws)]
        x_max = to_channels(g, [observed[c.site.input.name].absmax for c in g.consumers])
        w_max = to_channels(g, [weight_absmax(gm, c.site) for c in g.consumers])
        best = None
        best_err = sum(float(((_fq_act(x, cfg.activations) @ _fq_weight(w, cfg.weights).t() - ref) ** 2).sum())
                       for x, w, ref in zip(xs, ws, refs))
        for a in cfg.grid:
            s = smoothing_scales(x_max, w_max, a, cfg.min_scale, g.consumed)
            err = 0.0
            for c, x, w, ref in zip(g.consumers, xs, ws, refs):
                sc = s[c.channel_map]
                err += float(((_fq_act(x / sc, cfg.activations) @ _fq_weight(w * sc, cfg.weights).t() - ref)
                              ** 2).sum())
            if err < best_err:
                best, best_err = a, err
        return best


def smoothing_scales(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float, floor: float,
                     used: torch.Tensor | None = None) -> torch.Tensor:
    """s = x^alpha / w^(1 - alpha) per channel, clamped to [floor, 1/floor]; 1 where x or w is 0 (a dead
    channel in calibration) or where `used` is False (channels no consumer reads)."""
    x, w = x_absmax.double(), w_absmax.double()
    s = (x.pow(alpha) / w.pow(1.0 - alpha)).clamp(floor, 1.0 / floor)
    keep = (x > 0) & (w > 0) & torch.isfinite(s)
    if used is not None:
        keep &= used
    return torch.where(keep, s, torch.ones_like(s))


def _fq_act(x: torch.Tensor, spec: QSpec) -> torch.Tensor:
    return Q.fake_quantize_dynamic(x, spec.block_size(x.shape), spec.format.name, spec.symmetric, spec.clip_ratio)


def _fq_weight(w: torch.Tensor, spec: QSpec) -> torch.Tensor:
    scale, zp = choose_qparams(w, spec)
    return Q.fake_quantize(w, scale, zp, spec.block_size(w.shape), spec.format.name)


@dataclass(frozen=True)
class _MakeInputStats:
    keep: int

    def __call__(self, name, node) -> "InputStats":
        return InputStats(self.keep)


@dataclass
class InputStats:
    """Per-channel absmax of a linear input over calibration, and up to `keep` random rows per sample."""

    keep: int
    absmax: torch.Tensor | None = None
    rows: list = field(default_factory=list)

    def update(self, x: torch.Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1]).double()
        am = x2.abs().amax(0)
        self.absmax = am if self.absmax is None else torch.maximum(self.absmax, am)
        if self.keep:
            g = torch.Generator().manual_seed(len(self.rows))
            self.rows.append(x2[torch.randperm(x2.shape[0], generator=g)[: self.keep]])

    def sample(self) -> torch.Tensor:
        return torch.cat(self.rows)


__all__ = ["SmoothQuant", "SmoothQuantConfig", "smoothing_scales"]
