"""Activation-aware weight scaling and clipping (AWQ, Lin et al. 2024), before round-to-nearest or GPTQ.

Matches   every folding group of ``qpass.folding.analyze`` (norm -> q/k/v, norm -> gate/up, v -> o,
          up -> down, fused qkv ...) whose linears the following ``quantize`` pass quantizes
Changes   scale: producer channel c /= s_c, consumer input column j *= s_map(j) (function-preserving), with
          s = mean|x|^alpha / sqrt(max * min) and alpha on a grid of `grid` values minimising the group's
          output error sum_j ||x W_j^T - (x / s) Q(W_j s)^T||^2 under the weight quantizer
          clip: every quantized linear of the block except those feeding attention scores (q/k), per output
          row and group, W is clamped to [-m, m] with m = r * max|W_group|, r in 1.00, 0.95, ... 0.55
          minimising sum_t (x_t . (W - Q(clamp(W)))_group)^2; the following quantizer (RTN or GPTQ) then
          sees the clamped weights, so its min-max scale is the chosen clip. No nodes added or removed.
          Errors are exact over all calibration tokens through each input's Gram matrix X^T X.
Requires  calibration data; block by block (qpass.sequential, float inputs as the reference by default);
          the weight spec of the next ``quantize`` pass in the recipe, or an explicit ``weights``
Preserves graph structure
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch.fx import GraphModule, Node

from qpass.errors import RecipeError
from qpass.folding import analyze, canonical_weight, fold_scales, to_channels
from qpass.graph import LinearSite, linear_sites, param_of, select
from qpass.pass_infra import Context, Pass, PassResult
from qpass.primitives.awq import clip_search, scale_search
from qpass.primitives.gptq import HessianAccumulator
from qpass.primitives.spec import PerChannel, PerGroup, PerHead, PerToken, QSpec
from qpass.sequential import Sweep

from .gptq import shared_weight
from .quantize import QuantizeConfig

aten = torch.ops.aten
_SDPA = aten.scaled_dot_product_attention.default
_SOFTMAX = {aten._softmax.default, aten.softmax.int, aten._safe_softmax.default}


@dataclass(frozen=True)
class AwqConfig:
    name: ClassVar[str] = "awq"
    field_docs: ClassVar[dict] = {
        "weights": "weight quantizer to search for (null: the weights of the next quantize pass)",
        "grid": "alpha grid size: alpha = i / grid for i < grid (20: 0, 0.05, ..., 0.95)",
        "clip": "search per-group clipping ratios after scaling (clamps the weights)",
        "clip_grid": "clip ratios 1 - i / clip_grid for i < max_shrink * clip_grid",
        "max_shrink": "largest clip shrink (0.5: ratios down to 0.55)",
        "clip_qk": "also clip linears feeding attention scores (q/k; the reference skips them)",
        "sequential": "calibrate block by block (false: one run of the whole model)",
        "feed": "inputs of block i+1: `float` (the reference) or `quantized` (block i scaled and clipped)",
        "targets": "module-path globs of linears to scale and clip (a group needs all its linears)",
        "ignore": "module-path globs to leave alone",
    }

    weights: QSpec | None = None
    grid: int = 20
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    clip_qk: bool = False
    sequential: bool = True
    feed: Literal["float", "quantized"] = "float"
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ()

    def __post_init__(self):
        for key in ("grid", "clip_grid"):
            if not 1 <= getattr(self, key) <= 1000:
                raise RecipeError(key, f"must be an integer in [1, 1000] (reference: 20), got {getattr(self, key)}")
        if not 0.0 <= self.max_shrink < 1.0:
            raise RecipeError("max_shrink", f"must be in [0, 1), got {self.max_shrink}")
        w = self.weights
        if w is not None and (w.dynamic or isinstance(w.granularity, (PerToken, PerHead))):
            raise RecipeError("weights", "weights take static per_tensor, per_channel or per_group")
        if w is not None and getattr(w.granularity, "axis", 0) not in (0, 1, -1, -2):
            raise RecipeError("weights.axis", "a weight is [out, in]: axis is 0 (out) or 1 (in)")
        if not self.targets:
            raise RecipeError("targets", "must list at least one module-path glob (e.g. ['*'])")


@dataclass(frozen=True)
class Awq(Pass):
    """Search activation-aware scales (folded into the producers) and weight clipping for a weight quantizer."""

    config: AwqConfig = AwqConfig()
    name: ClassVar[str] = "awq"
    needs_calibration: ClassVar[bool] = True

    def run(self, gm: GraphModule, ctx: Context) -> PassResult:
        if ctx.restoring:   # parameters only: the saved state dict holds the scaled and clipped values
            return PassResult(modified=False, stats={"restored": True})
        cfg = self.config
        spec, quant = self._spec(ctx)
        sites = linear_sites(gm)
        chosen = select([s.path for s in sites], cfg.targets, cfg.ignore, "awq")
        if quant is not None:
            chosen &= select([s.path for s in sites], quant.targets, quant.ignore, "awq (quantize's selection)")
        analysis = analyze(gm)
        groups, near = [], [f"{p}: not scaled, {why}" for p, why in analysis.unfoldable.items() if p in chosen]
        for g in analysis.groups:
            left = [c.site.path for c in g.consumers if c.site.path not in chosen]
            if left:
                near.append(f"{g.name}: group not scaled, {', '.join(left)} not selected")
            else:
                groups.append(g)
        todo = [s for s in sites if s.path in chosen]
        stats = {"groups_scaled": 0, "linears_clipped": 0}
        if not todo:
            return PassResult(modified=False, stats=stats, near_misses=near)
        calib = ctx.require_calibration("awq")
        clip = self._clip_plan(gm, sites, todo, spec, near)
        found = {"alphas": {}, "loss_vs_rtn": {}, "mean_clip_ratio": {}}
        left = {s.node for s in todo}
        sweep = Sweep(gm, calib, blocks=cfg.sequential, feed=cfg.feed, progress=ctx.progress, desc="awq",
                      store=ctx.store)
        with contextlib.closing(iter(sweep)) as steps:   # NOTE: closed now, not by the GC: see Sweep
            for step in steps:
                mine = [s for s in todo if step.contains(s.node)]
                if mine:
                    obs = step.observe({s.input: s.input for s in mine}, lambda k, n: _InputStats())
                    local = [g for g in groups if all(step.contains(c.site.node) for c in g.consumers)
                             and (cfg.feed == "float" or step.contains(g.producer.node))]
                    # NOTE: with feed: float a producer may sit outside this block; on disk it must be loaded too
                    with ctx.loaded(p.target for g in local for p, _ in g.producer.params):
                        col_scale = self._scale(gm, local, obs, spec, found)
                    self._clip(gm, [s for s in mine if s.node in clip], obs, col_scale, spec, found)
                    left -= {s.node for s in mine}
                if not left:
                    break
        near += [f"{g.name}: group not scaled, its linears and producer are in different blocks"
                 for g in groups if g.name not in found["alphas"]]
        stats.update(groups_scaled=len(found["alphas"]), linears_clipped=len(found["mean_clip_ratio"]), **found)
        return PassResult(modified=True, stats=stats, near_misses=near)

    def _scale(self, gm: GraphModule, groups: list, obs: dict, spec: QSpec, found: dict) -> dict:
        """Search every group of the block on the unchanged weights, then fold (as the reference); return
        the per-input-column scale of every consumer."""
        chosen = []
        for g in groups:
            x_mean = to_channels(g, [obs[c.site.input].mean() for c in g.consumers])
            grams = [obs[c.site.input].xtx for c in g.consumers]
            ws = [canonical_weight(gm, c.site).float() for c in g.consumers]
            alpha, s, losses = scale_search(grams, ws, [c.channel_map for c in g.consumers], x_mean, spec,
                                            self.config.grid, g.consumed)
            chosen.append((g, s))
            found["alphas"][g.name] = alpha
            found["loss_vs_rtn"][g.name] = min(losses) / losses[0] if losses[0] > 0 else 1.0
        col_scale = {}
        for g, s in chosen:
            fold_scales(gm, g, s)
            col_scale.update({c.site.node: s[c.channel_map] for c in g.consumers})
        return col_scale

    def _clip(self, gm: GraphModule, sites: list[LinearSite], obs: dict, col_scale: dict, spec: QSpec,
              found: dict) -> None:
        for site in sites:
            gram = obs[site.input].xtx
            if site.node in col_scale:     # the folded linear reads x / s
                inv = 1.0 / col_scale[site.node]
                gram = gram * inv[:, None] * inv[None, :]
            clipped, r = clip_search(canonical_weight(gm, site).float(), gram, spec, grid=self.config.clip_grid,
                                     max_shrink=self.config.max_shrink)
            _write_canonical(gm, site, clipped)
            found["mean_clip_ratio"][site.path or site.node.name] = float(r.mean())

    def _clip_plan(self, gm: GraphModule, sites: list[LinearSite], todo: list[LinearSite], spec: QSpec,
                   near: list) -> set:
        """Nodes of the linears whose weights the clip search may clamp."""
        cfg = self.config
        if not cfg.clip:
            return set()
        if not _clippable(spec):
            near.append(f"clip search skipped: needs per_channel (axis 0) or per_group weights, got {spec.granularity}")
            return set()
        site_nodes, plan = {s.node for s in sites}, set()
        for s in todo:
            why = shared_weight(gm, s)
            if why:
                near.append(f"{s.path or s.node.name}: not clipped, {why}")
            elif cfg.clip_qk or not _feeds_attention_scores(s, site_nodes):
                plan.add(s.node)
        return plan

    def _spec(self, ctx: Context) -> tuple[QSpec, QuantizeConfig | None]:
        quant = next((c for c in ctx.upcoming if isinstance(c, QuantizeConfig) and c.weights is not None), None)
        if self.config.weights is not None:
            return self.config.weights, quant
        if quant is None:
            raise RecipeError("awq.weights", "no weight spec: no quantize pass with weights follows awq in the "
                              "recipe; place '- quantize: {weights: ...}' after '- awq', or give awq 'weights:'")
        return quant.weights, quant


def _clippable(spec: QSpec) -> bool:
    g = spec.granularity
    return (isinstance(g, PerChannel) and g.axis == 0) or (isinstance(g, PerGroup) and g.axis in (-1, 1))


def _write_canonical(gm: GraphModule, site: LinearSite, w: torch.Tensor) -> None:
    p = param_of(gm, site.weight)
    with torch.no_grad():
        p.copy_(w if site.in_axis == 1 else w.t())


def _feeds_attention_scores(site: LinearSite, site_nodes: set, limit: int = 2000) -> bool:
    """Whether the linear's output reaches the query or key operand of attention (SDPA, or a matmul whose
    result goes to a softmax) before passing through another linear."""
    seen, frontier = {site.node}, [site.node]
    while frontier and len(seen) < limit:
        n = frontier.pop()
        for u in n.users:
            if u.op != "call_function":
                continue
            if u.target is _SDPA and n in (list(u.args[:2]) + [u.kwargs.get("query"), u.kwargs.get("key")]):
                return True     # checked on every edge: the value edge may reach the same node first
            if u in seen:
                continue
            seen.add(u)
            if u in site_nodes:
                continue
            if u.target in (aten.matmul.default, aten.bmm.default) and _to_softmax(u):
                return True
            frontier.append(u)
    return False


def _to_softmax(n: Node, depth: int = 4) -> bool:
    frontier = [n]
    for _ in range(depth):
        frontier = [u for m in frontier for u in m.users]
        if any(u.op == "call_function" and u.target in _SOFTMAX for u in frontier):
            return True
    return False


class _InputStats(HessianAccumulator):
    """X^T X of a linear input over the calibration tokens, and its mean |x| per channel."""

    def __init__(self) -> None:
        super().__init__()
        self.abs_sum = None

    def update(self, x: torch.Tensor) -> None:
        super().update(x)
        part = x.detach().reshape(-1, x.shape[-1]).abs().sum(0, dtype=torch.float64)
        self.abs_sum = part if self.abs_sum is None else self.abs_sum + part

    def mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.tokens, 1)


__all__ = ["Awq", "AwqConfig"]
