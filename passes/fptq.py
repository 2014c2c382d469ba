"""W4A8 with a layer-wise activation strategy and logarithmic activation equalization (FPTQ, Li et al. 2023).

Matches   every selected linear-like node (qpass.graph.linear_sites); LAE where ``qpass.folding.analyze`` finds a
          folding group (norm -> q/k/v, norm -> gate/up, v_proj -> o_proj, up_proj -> down_proj, ...) whose
          linears are all selected
Changes   per linear, from v = max |X| of its input over calibration (the paper's layer-wise strategy, v0 = 15,
          v1 = 150):
            v <= v0        per-tensor static int8 activations ("static")
            v0 < v <= v1   LAE, then per-tensor static int8 ("lae"): per producer channel j
                             s_j = max|X_j| / log2(2 + max|X_j|)
                           folded like SmoothQuant (producer channel /= s, consumer columns *= s), so the
                           channel's max becomes log2(2 + max|X_j|); a linear with no folding point gets
                           per-token dynamic int8 instead ("per_token", reported)
            v > v1         per-token dynamic int8 ("per_token")
          and fine-grained (group-wise) weight quantizers (`weights`, default int4 g128) on every selected linear,
          inserted as the quantize pass does (a later ``gptq`` re-rounds them, as the paper optionally does)
Requires  calibration data (absmax per input channel; then, after LAE, the static scales' observers)
Preserves nothing (adds quantizer nodes); the LAE fold alone keeps the function (float rounding)

The plan is the quantize pass's (every quantizer with its spec and tensor shapes) plus the decisions: each
linear's strategy and v. LAE scales live in the saved weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch.fx import GraphModule

from qpass.analyses import ActAbsMax, FoldGroups, LinearSites, Observed
from qpass.errors import RecipeError
from qpass.folding import fold_scales, to_channels
from qpass.graph import param_of, select
from qpass.pass_infra import Context, Pass, PassResult
from qpass.plan import Plan, build, occurrences
from qpass.primitives import choose_qparams
from qpass.primitives.spec import IntFormat, PerGroup, PerHead, PerTensor, PerToken, QSpec
from qpass.quantizer import QuantMeta

from .quantize import ObserverConfig, Quantize, _MakeObserver, weight_block_size

STRATEGIES = ("static", "lae", "per_token")


@dataclass(frozen=True)
class FptqConfig:
    name: ClassVar[str] = "fptq"
    field_docs: ClassVar[dict] = {
        "v0": "activation range (max |X| over calibration) at or below which a linear gets per-tensor static "
              "activations (paper: 15)",
        "v1": "range above which a linear gets per-token dynamic activations; between v0 and v1: LAE, then "
              "per-tensor static (paper: 150)",
        "weights": "weight quantizer (fine-grained: int4 in groups of 128 in the paper); gptq may follow",
        "activation_bits": "integer bits of the activations (8: W4A8)",
        "static": "false: per-token dynamic activations on every linear (LAE still on the v0..v1 layers)",
        "observer": "static activation scale estimator (after LAE): {kind: minmax|moving_average|percentile|mse}",
        "targets": "module-path globs of the linears to quantize",
        "ignore": "module-path globs to leave in float (a bare name matches as a suffix: lm_head)",
    }

    v0: float = 15.0
    v1: float = 150.0
    weights: QSpec = QSpec(IntFormat(4), PerGroup(128))
    activation_bits: int = 8
    static: bool = True
    observer: ObserverConfig = field(default_factory=ObserverConfig)
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ()

    def __post_init__(self):
        if not 0.0 <= self.v0 <= self.v1:
            raise RecipeError("v0", f"needs 0 <= v0 <= v1, got v0 {self.v0}, v1 {self.v1}")
        if not 2 <= self.activation_bits <= 8:
            raise RecipeError("activation_bits", f"must be an integer in [2, 8], got {self.activation_bits}")
        w = self.weights
        if w.dynamic or isinstance(w.granularity, (PerToken, PerHead)):
            raise RecipeError("weights", "weights take static per_tensor, per_channel or per_group")
        if getattr(w.granularity, "axis", 0) not in (0, 1, -1, -2):
            raise RecipeError("weights.axis", "a weight is [out, in]: axis is 0 (out) or 1 (in)")
        if not self.targets:
            raise RecipeError("targets", "must list at least one module-path glob (e.g. ['*'])")

    def activation_spec(self, strategy: str) -> QSpec:
        fmt = IntFormat(self.activation_bits)
        if strategy == "per_token" or not self.static:
            return QSpec(fmt, PerToken(), dynamic=True)
        return QSpec(fmt, PerTensor())


def lae_scales(x_absmax: torch.Tensor, used: torch.Tensor | None = None) -> torch.Tensor:
    """s_j = m_j / log2(2 + m_j) per channel (m = max |X_j|), so that m_j / s_j = log2(2 + m_j); 1 where m_j is 0
    (a dead channel in calibration), not finite, or not `used` (channels no consumer reads)."""
    m = x_absmax.double()
    s = m / torch.log2(2.0 + m)
    keep = (m > 0) & torch.isfinite(s)
    if used is not None:
        keep &= used
    return torch.where(keep, s, torch.ones_like(s))


@dataclass(frozen=True)
class Fptq(Pass):
    """Layer-wise activation strategy (static, LAE + static, per-token) with fine-grained weights (W4A8)."""

    config: FptqConfig = FptqConfig()
    name: ClassVar[str] = "fptq"
    needs_calibration: ClassVar[bool] = True

    def run(self, gm: GraphModule, ctx: Context) -> PassResult:
        cfg = self.config
        sites = list(ctx.get(LinearSites(), gm))
        keys = [s.path or s.node.name for s in sites]
        chosen = select(keys, cfg.targets, cfg.ignore, "fptq")
        todo = [(s, k) for s, k in zip(sites, keys) if k in chosen]
        near = [f"{k}: excluded by targets/ignore" for k in keys if k not in chosen]
        stats = {"linears": 0, "static": 0, "lae": 0, "per_token": 0, "groups_equalized": 0}
        if not todo:
            return PassResult(modified=False, stats=stats, near_misses=near)
        ctx.require_calibration("fptq")
        absmax = ctx.get(ActAbsMax(tuple(dict.fromkeys(s.input.name for s, _ in todo))), gm)
        ranges = {k: float(absmax[s.input.name].max()) for s, k in todo}
        strategy = {k: "static" if v <= cfg.v0 else "per_token" for k, v in ranges.items()}
        analysis = ctx.get(FoldGroups(), gm)
        foldable = {c.site.path for g in analysis.groups for c in g.consumers}
        groups = 0
        for g in analysis.groups:
            paths = [c.site.path for c in g.consumers]
            if not all(p in chosen for p in paths):
                continue
            v = max(ranges[p] for p in paths)
            if not cfg.v0 < v <= cfg.v1:
                continue
            with ctx.loaded([p.target for p, _ in g.producer.params] + [c.site.weight.target for c in g.consumers]):
                x = to_channels(g, [absmax[c.site.input.name] for c in g.consumers])
                fold_scales(gm, g, lae_scales(x, g.consumed))
            strategy.update({p: "lae" for p in paths})
            groups += 1
        for k, v in ranges.items():
            if cfg.v0 < v <= cfg.v1 and strategy[k] != "lae":
                why = "no folding point" if k not in foldable else "its group has a linear outside targets or " \
                      "a range outside (v0, v1]"
                near.append(f"{k}: range {v:.4g} in (v0, v1] but {why}: per-token dynamic activations")
        static = {s.input.name: s.input for s, k in todo if not cfg.activation_spec(strategy[k]).dynamic}
        qparams = {}
        if static:   # observed after LAE (a new calibration run on the equalized graph)
            spec = QSpec(IntFormat(cfg.activation_bits), PerTensor())
            obs = ctx.get(Observed(tuple(static), _MakeObserver(cfg.observer, spec), who="fptq static activations",
                                   desc="fptq: observing linear inputs after LAE"), gm)
            qparams = {k: o.qparams() for k, o in obs.items()}
        at = dict(zip((s.node for s in sites), occurrences(keys)))
        items = []
        for s, k in todo:
            block = weight_block_size(cfg.weights, use_in_axis=s.use_in_axis)
            with ctx.loaded([s.weight.target]):
                w = param_of(gm, s.weight).detach()
                scale, zp = choose_qparams(w.t() if s.weight_use is not s.weight else w, cfg.weights,
                                           block_size=block)
            items.append((QuantMeta("weight", "", k, cfg.weights), block, {"scale": scale, "zero_point": zp},
                          at[s.node]))
            aspec = cfg.activation_spec(strategy[k])
            tensors = {} if aspec.dynamic else dict(zip(("scale", "zero_point"), qparams[s.input.name]))
            items.append((QuantMeta("input", "", k, aspec), aspec.block_size(s.input.meta["val"].shape), tensors,
                          at[s.node]))
        decisions = {"v0": cfg.v0, "v1": cfg.v1, "strategy": strategy,
                     "range": {k: round(v, 6) if math.isfinite(v) else None for k, v in ranges.items()}}
        plan = build(self.name, items, decisions=decisions)
        self.apply(gm, plan)
        for k in strategy.values():
            stats[k] += 1
        stats.update(linears=len(todo), groups_equalized=groups, strategy=strategy,
                     range={k: round(v, 3) for k, v in ranges.items()})
        return PassResult(modified=True, stats=stats, near_misses=near, plan=plan)

    @classmethod
    def apply(cls, gm: GraphModule, plan: Plan) -> None:
        """Insert the plan's quantizers (as the quantize pass does); LAE scales are in the saved weights."""
        Quantize.apply(gm, plan)


__all__ = ["Fptq", "FptqConfig", "lae_scales", "STRATEGIES"]
