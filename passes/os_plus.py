"""Shift and scale activation channels before quantizing (Outlier Suppression+, Wei et al. 2023).

Matches   every folding group of ``qpass.folding.analyze`` (a norm, a per-channel multiply or a linear, and the
          linears that read it); the shift only where ``folding.shift_reason`` allows it (norm -> q/k/v, norm ->
          gate/up, v_proj -> o_proj through attention; not through ReLU or ``silu(gate) * up``)
Changes   per producer channel j, from the consumers' calibration inputs:
            z_j = (max_j + min_j) / 2                               (shift: centres each channel)
            s_j = max(1, max|x_j - z_j| / t)                        (scale: only channels above t shrink)
          producer: bias -= z, then channel /= s;  consumers: bias += W z[map], input columns *= s[map]
          t per group by a grid search (``search_steps`` values, geometric, from max_j |x_j - z_j| down to the
          smallest channel range) minimising sum_i ||X W_i^T - Q((X - z) / s) Q(W_i s)^T - W_i z||^2 over the
          group's linears on a sample of calibration tokens, with the quantizers of `weights` / `activations`;
          "do nothing" (z = 0, s = 1) and "shift only" (s = 1) are candidates, so a group no candidate improves
          is left alone
          a bias is added where the shift needs one and there is none (RMSNorm: ``add(g * x_hat, b)``; linears
          without a bias: a bias argument): these are the plan's ``edits``, which ``apply`` repeats with zeros
Requires  FoldGroups; Observed linear inputs (one calibration run: per-channel min/max and a token sample)
Preserves nothing (may add nodes); outputs equal up to float rounding (check with the recipe's ``verify: true``)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch.fx import GraphModule

from qpass import folding
from qpass.analyses import FoldGroups, Observed
from qpass.errors import RecipeError
from qpass.folding import FoldGroup, canonical_weight, fold_scales, fold_shifts, shift_reason
from qpass.graph import linear_sites, select
from qpass.pass_infra import Context, Pass, PassResult
from qpass.plan import Plan, PlanError, occurrences
from qpass.primitives import choose_qparams
from qpass.primitives import quant as Q
from qpass.primitives.spec import BUILTIN_KINDS, IntFormat, PerChannel, PerHead, PerTensor, PerToken, QSpec

aten = torch.ops.aten
_NORM_OPS = (aten.layer_norm.default, aten.mul.Tensor)


@dataclass(frozen=True)
class OsPlusConfig:
    name: ClassVar[str] = "os_plus"
    field_docs: ClassVar[dict] = {
        "shift": "centre each channel (z = (max + min) / 2), folded into biases (added where missing)",
        "scale": "search the scale threshold t (s = max(1, max|x - z| / t)); false: shift only",
        "search_steps": "threshold candidates per group (geometric grid from the largest to the smallest channel "
                        "range); 'do nothing' is always a candidate",
        "search_tokens": "calibration tokens kept per linear input for the search",
        "weights": "weight quantizer assumed by the search (not inserted: use the quantize pass)",
        "activations": "input quantizer assumed by the search (static specs: one scale over the token sample)",
        "targets": "module-path globs of the linears to transform (a group is transformed if all its linears are)",
        "ignore": "module-path globs of linears to leave alone (their whole group is skipped)",
    }

    shift: bool = True
    scale: bool = True
    search_steps: int = 20
    search_tokens: int = 512
    weights: QSpec = QSpec(IntFormat(8), PerChannel(0))
    activations: QSpec = QSpec(IntFormat(8), PerTensor())
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.shift and not self.scale:
            raise RecipeError("shift", "shift and scale are both false: nothing to do; drop the pass")
        if not 1 <= self.search_steps <= 1000:
            raise RecipeError("search_steps", f"must be an integer in [1, 1000], got {self.search_steps}")
        if not 1 <= self.search_tokens <= 1 << 20:
            raise RecipeError("search_tokens", f"must be an integer in [1, {1 << 20}], got {self.search_tokens}")
        for key, spec in (("weights", self.weights), ("activations", self.activations)):
            if spec.format.kind not in BUILTIN_KINDS:
                raise RecipeError(f"{key}.format", f"the search emulates int, fp8, fp4 and nf4 only, got "
                                  f"{spec.format.name}")
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


@dataclass(frozen=True)
class OsPlus(Pass):
    """Centre (shift) and shrink (scale) outlier channels of linear inputs, folded into producers and consumers."""

    config: OsPlusConfig = OsPlusConfig()
    name: ClassVar[str] = "os_plus"
    needs_calibration: ClassVar[bool] = True
    preserves: ClassVar = ()                 # shifts may add bias nodes

    def run(self, gm: GraphModule, ctx: Context) -> PassResult:
        cfg = self.config
        analysis = ctx.get(FoldGroups(), gm)
        paths = [c.site.path for g in analysis.groups for c in g.consumers] + list(analysis.unfoldable)
        chosen = select(paths, cfg.targets, cfg.ignore, "os_plus")
        near = [f"{p}: {why}" for p, why in analysis.unfoldable.items() if p in chosen]
        todo = []
        for g in analysis.groups:
            left = [c.site.path for c in g.consumers if c.site.path not in chosen]
            if left:
                near.append(f"{g.name}: group skipped, {', '.join(left)} excluded by targets/ignore")
            else:
                todo.append(g)
        stats = {"groups_shifted": 0, "groups_scaled": 0, "groups_unchanged": 0, "biases_added": 0,
                 "no_folding_point": len(analysis.unfoldable)}
        if not todo:
            return PassResult(modified=False, stats=stats, near_misses=near)
        keep = -(-cfg.search_tokens // len(ctx.require_calibration("os_plus")))
        nodes = tuple(dict.fromkeys(c.site.input.name for g in todo for c in g.consumers))
        observed = ctx.get(Observed(nodes, _MakeStats(keep), who="os_plus", desc="os_plus: observing linear inputs"),
                           gm)
        stats_of = {g.name: [observed[c.site.input.name] for c in g.consumers] for g in todo}
        keys = [_group_key(gm, g) for g in todo]
        decisions, edits, current = {}, [], analysis      # analysed again after each bias edit
        for key, name in zip(keys, [g.name for g in todo]):
            g = _find(gm, current, key)
            why = shift_reason(g) if cfg.shift else "shift: false"
            if why and cfg.shift:
                near.append(f"{g.name}: scale only, no shift ({why})")
            with ctx.loaded(_param_names(gm, g)):
                z, s, t = self._search(gm, g, stats_of[name], shift=why is None)
                if z is not None:
                    new = _bias_edits(gm, g)
                    if new:
                        _apply_edits(gm, new)
                        edits += new
                        current = folding.analyze(gm)     # still valid after: the shift then adds no node
                        g = _find(gm, current, key)
                    with ctx.loaded(_param_names(gm, g)):
                        fold_shifts(gm, g, z)
                if s is not None:
                    fold_scales(gm, g, s)
            decisions[name] = {"shift": z is not None, "t": t}
            stats["groups_shifted"] += z is not None
            stats["groups_scaled"] += s is not None
            stats["groups_unchanged"] += z is None and s is None
        stats["biases_added"] = len(edits)
        plan = Plan(self.name, decisions={"groups": decisions, "edits": [list(e) for e in edits]})
        modified = any(d["shift"] or d["t"] is not None for d in decisions.values())
        return PassResult(modified=modified, stats=stats, near_misses=near, plan=plan)

    @classmethod
    def apply(cls, gm: GraphModule, plan: Plan) -> None:
        """Add the biases the shifts needed (zeros; a saved model's values are loaded over them). Scales and
        shifts themselves only change parameter values, which the state dict holds."""
        edits = [tuple(e) for e in plan.decisions.get("edits", ())]
        if edits:
            _apply_edits(gm, edits)

    def _search(self, gm: GraphModule, g: FoldGroup, stats: list, shift: bool):
        """(z or None, s or None, t or None): the candidate of least quantized output error over the group's
        linears (ties keep the earlier: do nothing, then shift only, then decreasing t)."""
        cfg = self.config
        n = g.producer.channels
        lo = torch.full((n,), math.inf, dtype=torch.float64)
        hi = torch.full((n,), -math.inf, dtype=torch.float64)
        for c, st in zip(g.consumers, stats):
            lo.scatter_reduce_(0, c.channel_map, st.min, reduce="amin")
            hi.scatter_reduce_(0, c.channel_map, st.max, reduce="amax")
        used = g.consumed & torch.isfinite(lo) & torch.isfinite(hi)
        lo, hi = torch.where(used, lo, 0.0), torch.where(used, hi, 0.0)
        z = (hi + lo) / 2 if shift else torch.zeros(n, dtype=torch.float64)
        r = torch.maximum(hi - z, z - lo)
        xs = [st.sample() for st in stats]
        ws = [canonical_weight(gm, c.site).double() for c in g.consumers]
        refs = [x @ w.t() for x, w in zip(xs, ws)]
        ones = torch.ones(n, dtype=torch.float64)
        cands = [(None, None, None)] + ([(z, None, None)] if shift else [])
        if cfg.scale:
            for t in threshold_grid(r[used], cfg.search_steps)[1:]:
                cands.append((z if shift else None, outlier_scales(r, t, used), t))
        best, best_err = cands[0], math.inf
        for zc, sc, t in cands:
            err = 0.0
            for c, x, w, ref in zip(g.consumers, xs, ws, refs):
                zi = (zc if zc is not None else 0.0 * ones)[c.channel_map]
                si = (sc if sc is not None else ones)[c.channel_map]
                out = _fq(((x - zi) / si), cfg.activations) @ _fq(w * si, cfg.weights).t() + w @ zi
                err += float(((out - ref) ** 2).sum())
            if err < best_err:
                best, best_err = (zc, sc, t), err
        return best


def threshold_grid(ranges: torch.Tensor, steps: int) -> list[float]:
    """`steps` thresholds, geometric from the largest channel range down to the smallest positive one (the
    first, the largest, scales nothing)."""
    pos = ranges[ranges > 0]
    if pos.numel() == 0:
        return []
    top, bottom = float(pos.max()), float(pos.min())
    if steps == 1 or bottom >= top:
        return [top]
    return [top * (bottom / top) ** (i / (steps - 1)) for i in range(steps)]


def outlier_scales(ranges: torch.Tensor, t: float, used: torch.Tensor) -> torch.Tensor:
    """s_j = max(1, range_j / t) on the channels a consumer reads, 1 elsewhere (OS+ eq. 5)."""
    s = (ranges.double() / t).clamp(min=1.0)
    return torch.where(used & torch.isfinite(s), s, torch.ones_like(s))


def _fq(x: torch.Tensor, spec: QSpec) -> torch.Tensor:
    """Fake-quantize a weight or a token sample as `spec` does (static specs: qparams from this tensor)."""
    block = spec.block_size(x.shape)
    if spec.dynamic:
        return Q.fake_quantize_dynamic(x, block, spec.format.name, spec.symmetric, spec.clip_ratio)
    scale, zp = choose_qparams(x, spec)
    return Q.fake_quantize(x, scale, zp, block, spec.format.name)


# ---------------------------------------------------------------------------------- structural edits
# An edit is (kind, module path, occurrence): ("linear", path, at) gives the linear a zero bias argument;
# ("layer_norm", path, at) gives a layer_norm without bias one; ("norm", path, at) adds a zero bias after a
# per-channel multiply (an RMSNorm's g * x_hat). Occurrences count linears (layer_norm / multiply producers)
# with that path in graph order, so another capture of the model (decode graph, ONNX step) finds the same ones.


def _linear_keys(gm: GraphModule):
    sites = linear_sites(gm)
    keys = [s.path or s.node.name for s in sites]
    return sites, list(zip(keys, occurrences(keys)))


def _norm_keys(gm: GraphModule):
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _NORM_OPS and
             isinstance(folding.producer_at(gm, n), folding.Producer)]
    keys = [folding.producer_at(gm, n).path or n.name for n in nodes]
    return nodes, list(zip(keys, occurrences(keys)))


def _group_key(gm: GraphModule, g: FoldGroup) -> tuple:
    """The group's consumers as (path, occurrence): stable across the bias edits (mm may become addmm)."""
    sites, keys = _linear_keys(gm)
    at = {s.node: k for s, k in zip(sites, keys)}
    return tuple(at[c.site.node] for c in g.consumers)


def _find(gm: GraphModule, analysis, key: tuple) -> FoldGroup:
    sites, keys = _linear_keys(gm)
    at = {s.node: k for s, k in zip(sites, keys)}
    for g in analysis.groups:
        if tuple(at.get(c.site.node) for c in g.consumers) == key:
            return g
    raise RuntimeError(f"os_plus: the group of {[k[0] for k in key]} is gone after adding biases")


def _bias_edits(gm: GraphModule, g: FoldGroup) -> list[tuple]:
    """The biases ``fold_shifts`` would add at `g` (which ``_apply_edits`` adds first, as zeros)."""
    sites, keys = _linear_keys(gm)
    at = {s.node: k for s, k in zip(sites, keys)}
    out = [("linear", *at[c.site.node]) for c in g.consumers if c.site.bias is None]
    prod = g.producer
    if prod.kind == "linear":
        site = next(s for s in sites if s.node is prod.node)
        out += [("linear", *at[site.node])] if site.bias is None else []
    elif prod.node.target is aten.layer_norm.default and len(prod.params) == 1:
        out.append(("layer_norm", *_norm_key(gm, prod.node)))
    elif prod.node.target is aten.mul.Tensor:
        out.append(("norm", *_norm_key(gm, prod.node)))
    return out


def _norm_key(gm: GraphModule, node) -> tuple:
    nodes, keys = _norm_keys(gm)
    return keys[nodes.index(node)]


def _apply_edits(gm: GraphModule, edits: list[tuple]) -> None:
    """Add the zero biases `edits` name (found first, then added, so earlier edits do not move later ones)."""
    sites, lkeys = _linear_keys(gm)
    nodes, nkeys = _norm_keys(gm)
    by_linear, by_norm = dict(zip(lkeys, sites)), dict(zip(nkeys, nodes))
    found = []
    for kind, path, at in edits:
        target = by_linear.get((path, at)) if kind == "linear" else by_norm.get((path, at))
        has_bias = target is not None and (
            target.bias is not None if kind == "linear" else len(folding.producer_at(gm, target).params) > 1
            if kind == "layer_norm" else any(u.target is aten.add.Tensor and
                                             isinstance(folding.producer_at(gm, u), folding.Producer)
                                             for u in target.users))
        if target is None or has_bias:
            why = "does not have it" if target is None else "already has a bias there"
            raise PlanError(f"the os_plus plan adds a bias to {kind} {path!r} (occurrence {at}), but this graph "
                            f"{why}", fix="apply plans to a capture of the model they were made on")
        found.append((kind, target))
    for kind, target in found:
        folding.add_zero_bias(gm, kind, target)
    gm.graph.lint()
    gm.recompile()


def _param_names(gm: GraphModule, g: FoldGroup) -> list[str]:
    names = [p.target for p, _ in g.producer.params]
    for c in g.consumers:
        names += [c.site.weight.target] + ([c.site.bias.target] if c.site.bias is not None else [])
    return names


# ------------------------------------------------------------------------------------------ statistics


@dataclass(frozen=True)
class _MakeStats:
    keep: int

    def __call__(self, name, node) -> "ChannelStats":
        return ChannelStats(self.keep)


@dataclass
class ChannelStats:
    """Per-channel min and max of a linear input over calibration, and up to `keep` random rows per sample."""

    keep: int
    min: torch.Tensor | None = None
    max: torch.Tensor | None = None
    rows: list = field(default_factory=list)

    def update(self, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1]).double()
        mn, mx = x2.amin(0), x2.amax(0)
        self.min = mn if self.min is None else torch.minimum(self.min, mn)
        self.max = mx if self.max is None else torch.maximum(self.max, mx)
        g = torch.Generator().manual_seed(len(self.rows))
        self.rows.append(x2[torch.randperm(x2.shape[0], generator=g)[: self.keep]])

    def sample(self) -> torch.Tensor:
        return torch.cat(self.rows)


__all__ = ["OsPlus", "OsPlusConfig", "ChannelStats", "threshold_grid", "outlier_scales"]
