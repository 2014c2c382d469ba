"""Activation-aware weight scaling and clipping (AWQ, Lin et al. 2024), before round-to-nearest or GPTQ.

Matches   every folding group of ``qpass.folding.analyze`` (norm -> q/k/v, norm -> gate/up, v -> o,
          up -> down, fused qkv ...) whose linears the following ``quantize`` pass quantizes
Changes   scale: producer channel c /= s_c, consumer input column j *= s_map(j) (function-preserving), with
          s = mean|x|^alpha / sqrt(max * min) and alpha on a grid of `grid` values minimising the group's
          output error sum_j ||x W_j^T - (x / s) Q(W_j s)^T||^2 under the weight quantizer
          (alpha = 0, i.e. s = 1, is the first candidate and wins ties: a group is never worse than RTN)
          clip: every quantized linear of the block except those feeding attention scores (q/k), per output
          row and group, W is clamped (symmetric: [-m, m], m = r * max|W_group|, r in 1.00, 0.95, ... 0.55;
          asymmetric: that or [r * min, r * max]) minimising each row's output error
          sum_t (x_t . (W - Q(clamp(W))))^2, cross-group terms included, no clip a candidate of every
          group (qpass.primitives.awq.clip_search); the following quantizer then sees the clamped weights,
          so its min-max scale is the chosen clip. No nodes added or removed. Errors are exact over all
          calibration tokens through each input's Gram matrix X^T X. ``clip: auto`` (default) clips unless
          a ``gptq`` pass follows: the clip search optimizes round-to-nearest (as the paper's), and GPTQ's
          error feedback re-rounds better from the unclipped range (AWQ+GPTQ at W2 g64 was worse than GPTQ
          alone with clipping, not without)
Requires  calibration data; block by block (qpass.block_sweep, float inputs as the reference by default);
          the weight spec of each linear: an explicit ``weights``, else that of the later ``quantize`` pass
          that quantizes the linear (the search must optimize the grid that is applied)
Preserves graph structure
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch.fx import GraphModule

from qpass.analyses import STRUCTURE, AttentionSites, FoldGroups, LinearSites
from qpass.errors import RecipeError
from qpass.experts import ExpertHessians, expert_sites, token_split
from qpass.folding import canonical_weight, fold_scales, to_channels
from qpass.graph import LinearSite, param_of, select
from qpass.plan import Plan
from qpass.pass_infra import Context, Pass, PassResult
from qpass.primitives.awq import clip_search, fake_quantize_weight, output_error, scale_search
from qpass.primitives.gptq import HessianAccumulator
from qpass.primitives.spec import PerChannel, PerGroup, PerHead, PerToken, QSpec

from .gptq import GptqConfig, shared_weight
from .quantize import QuantizeConfig


@dataclass(frozen=True)
class AwqConfig:
    name: ClassVar[str] = "awq"
    field_docs: ClassVar[dict] = {
        "weights": "weight quantizer to search for (null: each linear's, from the later quantize pass that "
                   "quantizes it)",
        "grid": "alpha grid size: alpha = i / grid for i < grid (20: 0, 0.05, ..., 0.95)",
        "clip": "search per-group clipping after scaling (clamps the weights): true, false, or `auto` (clip "
                "unless a gptq pass follows: the search optimizes round-to-nearest, GPTQ does better unclipped)",
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
    clip: Literal["auto", True, False] = "auto"
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
        if not (self.clip == "auto" or isinstance(self.clip, bool)):
            raise RecipeError("clip", f"must be true, false or 'auto', got {self.clip!r}")
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
    later: tuple = ()                        # configs of the quantize and gptq passes after it (Pass.sees_later)
    name: ClassVar[str] = "awq"
    needs_calibration: ClassVar[bool] = True
    preserves: ClassVar = STRUCTURE          # rescales and clamps parameters only
    # the search optimizes the weight quantizer a later quantize pass applies; clip: auto is off before gptq
    sees_later: ClassVar = (QuantizeConfig, GptqConfig)

    def run(self, gm: GraphModule, ctx: Context) -> PassResult:
        cfg = self.config
        sites = ctx.get(LinearSites(), gm)
        specs, near = self._specs(ctx, sites)
        chosen = select([s.path for s in sites] + [e.key for e in expert_sites(gm)], cfg.targets, cfg.ignore, "awq")
        chosen &= {s.path for s in sites if s.node in specs}
        analysis = ctx.get(FoldGroups(), gm)
        groups = []
        near += [f"{p}: not scaled, {why}" for p, why in analysis.unfoldable.items() if p in chosen]
        for g in analysis.groups:
            left = [c.site.path for c in g.consumers if c.site.path not in chosen]
            if left:
                near.append(f"{g.name}: group not scaled, {', '.join(left)} not selected")
            else:
                groups.append(g)
        todo = [s for s in sites if s.path in chosen]
        experts = self._expert_todo(gm, sites, near)
        stats = {"groups_scaled": 0, "linears_clipped": 0}
        if not todo and not experts:
            return PassResult(modified=False, stats=stats, near_misses=near)
        ctx.require_calibration("awq")
        clip = self._clip_plan(gm, sites, todo, specs, ctx, near) if todo else set()
        found = {"alphas": {}, "loss_vs_rtn": {}, "mean_clip_ratio": {}, "clip_loss_vs_unclipped": {}}
        if todo:
            left = {s.node for s in todo}
            sweep = ctx.sweep(gm, who="awq", blocks=cfg.sequential, feed=cfg.feed, desc="awq")
            with contextlib.closing(iter(sweep)) as steps:   # NOTE: closed now, not by the GC: see Sweep
                for step in steps:
                    mine = [s for s in todo if step.contains(s.node)]
                    if mine:
                        obs = step.observe({s.input: s.input for s in mine}, lambda k, n: _InputStats())
                        local = [g for g in groups if all(step.contains(c.site.node) for c in g.consumers)
                                 and (cfg.feed == "float" or step.contains(g.producer.node))]
                        # NOTE: with feed: float a producer may sit outside this block; on disk it must be
                        # loaded too
                        with ctx.loaded(p.target for g in local for p, _ in g.producer.params):
                            col_scale = self._scale(gm, local, obs, specs, found)
                        self._clip(gm, [s for s in mine if s.node in clip], obs, col_scale, specs, found)
                        left -= {s.node for s in mine}
                    if not left:
                        break
        near += [f"{g.name}: group not scaled, its linears and producer are in different blocks"
                 for g in groups if g.name not in found["alphas"]]
        if experts:
            self._clip_experts(gm, ctx, experts, found, near)
        clipped = [k for k in found["mean_clip_ratio"] if not k.endswith("]")]
        stats.update(groups_scaled=len(found["alphas"]), linears_clipped=len(clipped), **found)
        if experts:
            stats["experts_clipped"] = len(found["mean_clip_ratio"]) - len(clipped)
        # parameters only (the state dict holds the scaled and clipped values): the plan records the decisions
        plan = Plan(self.name, decisions={"alphas": found["alphas"], "clip_ratios": found["mean_clip_ratio"]})
        return PassResult(modified=True, stats=stats, near_misses=near, plan=plan)

    def _scale(self, gm: GraphModule, groups: list, obs: dict, specs: dict, found: dict) -> dict:
        """Search every group of the block on the unchanged weights, then fold (as the reference); return
        the per-input-column scale of every consumer."""
        chosen = []
        for g in groups:
            x_mean = to_channels(g, [obs[c.site.input].mean() for c in g.consumers])
            grams = [obs[c.site.input].xtx for c in g.consumers]
            ws = [canonical_weight(gm, c.site).float() for c in g.consumers]
            alpha, s, losses = scale_search(grams, ws, [c.channel_map for c in g.consumers], x_mean,
                                            [specs[c.site.node] for c in g.consumers], self.config.grid, g.consumed)
            chosen.append((g, s))
            found["alphas"][g.name] = alpha
            found["loss_vs_rtn"][g.name] = min(losses) / losses[0] if losses[0] > 0 else 1.0
        col_scale = {}
        for g, s in chosen:
            fold_scales(gm, g, s)
            col_scale.update({c.site.node: s[c.channel_map] for c in g.consumers})
        return col_scale

    def _clip(self, gm: GraphModule, sites: list[LinearSite], obs: dict, col_scale: dict, specs: dict,
              found: dict) -> None:
        for site in sites:
            gram = obs[site.input].xtx
            if site.node in col_scale:     # the folded linear reads x / s
                inv = 1.0 / col_scale[site.node]
                gram = gram * inv[:, None] * inv[None, :]
            w, spec = canonical_weight(gm, site).float(), specs[site.node]
            clipped, r = clip_search(w, gram, spec, grid=self.config.clip_grid, max_shrink=self.config.max_shrink)
            _write_canonical(gm, site, clipped)
            name = site.path or site.node.name
            found["mean_clip_ratio"][name] = float(r.mean())
            before = output_error(w - fake_quantize_weight(w, spec), gram)
            after = output_error(w - fake_quantize_weight(clipped, spec), gram)
            found["clip_loss_vs_unclipped"][name] = after / before if before > 0 else 1.0

    def _expert_todo(self, gm: GraphModule, sites: list[LinearSite], near: list) -> list:
        """[(expert site, the weight spec the later quantize pass applies)] of the MoE experts to clip per expert.
        Scaling is not searched for experts: they share the norm before them (with the router), so a per-expert
        scale has nowhere to fold."""
        cfg, found = self.config, expert_sites(gm)
        if not found:
            return []
        keys, paths = [e.key for e in found], [s.path for s in sites]
        chosen = select(paths + keys, cfg.targets, cfg.ignore, "awq")
        quants = [c for c in self.later if isinstance(c, QuantizeConfig) and c.weights is not None]
        out = []
        for e in found:
            if e.key not in chosen:
                continue
            spec = cfg.weights
            for q in quants:
                if spec is None and e.key in select(paths + keys, q.targets, q.ignore, "awq (quantize's selection)"):
                    spec = q.weights
            why = ("no later quantize pass quantizes them" if spec is None else
                   "clip search off (clip: auto before gptq, or clip: false)"
                   if not cfg.clip or (cfg.clip == "auto" and any(isinstance(c, GptqConfig) for c in self.later))
                   else f"not clipped, needs per_channel (axis 0) or per_group weights, got {spec.granularity}"
                   if not _clippable(spec) else "no per-expert token split (grouped matmul offsets)"
                   if token_split(e) is None else None)
            note = f"{e.key}: MoE experts ({e.experts}) not scaled (they share the norm before them)"
            near.append(note + (f"; not clipped: {why}" if why else "; clipped per expert"))
            if why is None:
                out.append((e, spec))
        return out

    def _clip_experts(self, gm: GraphModule, ctx: Context, experts: list, found: dict, near: list) -> None:
        """AWQ's clip search per expert, on the Gram matrix of the rows routed to that expert (block by block);
        an expert with fewer than gptq's min_expert_tokens default rows is left unclipped (reported)."""
        cfg, left = self.config, {e.key for e, _ in experts}
        sweep = ctx.sweep(gm, who="awq", blocks=cfg.sequential, feed=cfg.feed, desc="awq experts")
        with contextlib.closing(iter(sweep)) as steps:
            for step in steps:
                mine = [(e, spec) for e, spec in experts if step.contains(e.node)]
                if mine:
                    hs = {e.key: ExpertHessians(e.experts) for e, _ in mine}
                    nodes, parts = {}, {}
                    for e, _ in mine:
                        px, po = hs[e.key].parts()
                        nodes[e.key, "x"], parts[e.key, "x"] = e.input, px
                        nodes[e.key, "offs"], parts[e.key, "offs"] = token_split(e), po
                    step.observe(nodes, lambda k, n: parts[k])
                    with ctx.loaded(e.weight.target for e, _ in mine):
                        for e, spec in mine:
                            self._clip_expert(gm, e, spec, hs[e.key], found, near)
                    left -= {e.key for e, _ in mine}
                if not left:
                    break

    def _clip_expert(self, gm: GraphModule, e, spec: QSpec, hs, found: dict, near: list) -> None:
        param = param_of(gm, e.weight)
        flip = e.in_axis == 1
        for i, acc in enumerate(hs.accs):
            name = f"{e.key}[{i}]"
            if acc.tokens < MIN_EXPERT_TOKENS:
                near.append(f"{name}: {acc.tokens} calibration tokens < {MIN_EXPERT_TOKENS}; not clipped")
                continue
            w = (param[i].t() if flip else param[i]).detach().float()
            clipped, r = clip_search(w, acc.xtx, spec, grid=self.config.clip_grid, max_shrink=self.config.max_shrink)
            with torch.no_grad():
                param[i].copy_(clipped.t() if flip else clipped)
            found["mean_clip_ratio"][name] = float(r.mean())
            before = output_error(w - fake_quantize_weight(w, spec), acc.xtx)
            after = output_error(w - fake_quantize_weight(clipped, spec), acc.xtx)
            found["clip_loss_vs_unclipped"][name] = after / before if before > 0 else 1.0

    def _clip_plan(self, gm: GraphModule, sites: list[LinearSite], todo: list[LinearSite], specs: dict,
                   ctx: Context, near: list) -> set:
        """Nodes of the linears whose weights the clip search may clamp."""
        cfg = self.config
        if cfg.clip == "auto" and any(isinstance(c, GptqConfig) for c in self.later):
            near.append("clip search off (clip: auto): a gptq pass follows; set clip: true to clip anyway")
            return set()
        if not cfg.clip:
            return set()
        site_nodes, plan = {s.node for s in sites}, set()
        scores = {a.score_consumer: a.score_operands for a in ctx.get(AttentionSites(), gm)}
        for s in todo:
            why = shared_weight(gm, s)
            if not _clippable(specs[s.node]):
                near.append(f"{s.path or s.node.name}: not clipped, needs per_channel (axis 0) or per_group "
                            f"weights, got {specs[s.node].granularity}")
            elif why:
                near.append(f"{s.path or s.node.name}: not clipped, {why}")
            elif cfg.clip_qk or not _feeds_attention_scores(s, site_nodes, scores):
                plan.add(s.node)
        return plan

    def _specs(self, ctx: Context, sites: list[LinearSite]) -> tuple[dict, list[str]]:
        """({linear node: the weight quantizer the search optimizes}, notes). Each linear gets awq's own
        `weights`, else the weights of the first later quantize pass that selects it (quantize refuses a
        second quantizer on a weight, so that is the one applied). Only linears a later quantize pass
        quantizes are searched; with no quantize pass after awq, all of them with awq's `weights`."""
        own = self.config.weights
        quants = [c for c in self.later if isinstance(c, QuantizeConfig) and c.weights is not None]
        if not quants:
            if own is None:
                raise RecipeError("awq.weights", "no weight spec: no quantize pass with weights follows awq in the "
                                  "recipe; place '- quantize: {weights: ...}' after '- awq', or give awq 'weights:'")
            return {s.node: own for s in sites}, []
        paths, specs = [s.path for s in sites], {}
        for q in quants:
            picked = select(paths, q.targets, q.ignore, "awq (quantize's selection)")
            specs.update({s.node: q.weights for s in sites if s.path in picked and s.node not in specs})
        notes = sorted({f"awq.weights {own} is searched, but the quantize pass applies {w}" for w in specs.values()
                        if own is not None and w != own})
        return ({n: own for n in specs} if own is not None else specs), notes


MIN_EXPERT_TOKENS = GptqConfig.min_expert_tokens   # experts with fewer calibration rows are not clipped


def _clippable(spec: QSpec) -> bool:
    g = spec.granularity
    return (isinstance(g, PerChannel) and g.axis == 0) or (isinstance(g, PerGroup) and g.axis in (-1, 1))


def _write_canonical(gm: GraphModule, site: LinearSite, w: torch.Tensor) -> None:
    p = param_of(gm, site.weight)
    with torch.no_grad():
        p.copy_(w if site.in_axis == 1 else w.t())


def _feeds_attention_scores(site: LinearSite, site_nodes: set, scores: dict, limit: int = 2000) -> bool:
    """Whether the linear's output reaches what attention computes scores from (SDPA's query or key, either
    operand of eager attention's q @ kᵀ; `scores`: {that node: its operands}, from AttentionSites) before
    passing through another linear."""
    seen, frontier = {site.node}, [site.node]
    while frontier and len(seen) < limit:
        n = frontier.pop()
        for u in n.users:
            if u.op != "call_function":
                continue
            if n in scores.get(u, ()):
                return True     # checked on every edge: the value edge may reach the same node first
            if u in seen:
                continue
            seen.add(u)
            if u not in site_nodes:
                frontier.append(u)
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
