"""Learned rounding of quantized weights with signed gradient descent (SignRound / AutoRound, Cheng et al. 2024).

Matches   every linear whose weight goes through a static int ``qpass.fake_quantize`` weight quantizer (inserted
          by an earlier ``quantize`` pass) fed by the weight parameter itself, selected by targets/ignore
Changes   per weight element a rounding offset V in [-0.5, 0.5] (start 0): W~ = s * (clamp(round(W / s + V) + z)
          - z); with ``minmax_tuning`` (AutoRound's default) per scale block multipliers on the block's min and
          max (start 1, clamped to [0, 1]: only shrinking) from which s and z are recomputed. Trained block by
          block (qpass.blockwise) against the float block's outputs (MSE), SignSGD (lr 1/steps, linearly decayed
          as AutoRound's repo does), the best step's values (on held-out samples) kept. Baked: the weight
          parameter becomes the dequantized learned rounding s * (q - z), exactly representable (the quantizer
          maps it to itself), and the quantizer's scale / zero-point buffers the tuned ones; no node added
Requires  calibration data (the block-by-block sweep); the recipe's other quantizers (activations) stay live
          while training
Preserves graph structure
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch.fx import GraphModule, Node

from qpass.analyses import STRUCTURE, LinearSites
from qpass.blockwise import TRAIN_DOCS, BlockMethod, BlockState, BlockwiseConfig, ste_round, summarize, train_blocks
from qpass.errors import QuantizationError
from qpass.graph import LinearSite, describe, param_of, select
from qpass.pass_infra import Context, Pass, PassResult
from qpass.plan import Plan
from qpass.primitives import quant as Q
from qpass.quantizer import Quantizer, role_of

from .gptq import shared_weight

ClipMode = Literal["none", "minmax", "sigmoid"]


@dataclass(frozen=True)
class SignRoundConfig(BlockwiseConfig):
    name: ClassVar[str] = "signround"
    field_docs: ClassVar[dict] = {**TRAIN_DOCS, "minmax_tuning": "also learn per-block multipliers in [0, 1] on "
                                  "the min and max the scale is computed from (AutoRound's enable_minmax_tuning)"}

    steps: int = 200
    lr: float = 0.005                   # 1 / steps (AutoRound)
    batch_size: int = 8
    optimizer: Literal["signsgd", "adam", "adamw"] = "signsgd"
    schedule: Literal["constant", "linear"] = "linear"
    feed: Literal["quantized", "float"] = "quantized"     # use_quant_input=True
    minmax_tuning: bool = True


class LearnedWeightQuantizer:
    """A weight quantizer whose rounding offsets (`rounding`) and/or clipping range (`clip`: `minmax`, AutoRound's
    multipliers clamped to [0, 1]; `sigmoid`, OmniQuant's LWC factors sigmoid(logit)) are trainable. `value()` is
    the differentiable fake-quantized weight in the quantizer's layout; `bake` writes it to the graph."""

    def __init__(self, gm: GraphModule, site: LinearSite, *, rounding: bool, clip: ClipMode, init_logit: float = 4.0):
        self.node = site.weight_use
        q = Quantizer(self.node)
        self.q, self.site, self.clip = q, site, clip
        self.param = param_of(gm, q.x)
        self.scale_t = param_of(gm, q.scale)
        self.zp_t = param_of(gm, q.zero_point) if q.zero_point is not None else None
        self.block, self.fmt = tuple(q.block), q.fmt_name
        self.w = self.param.detach().float().clone()
        self.mn, self.mx = (t.float() for t in Q.block_minmax(self.w, self.block))
        self.params: list[torch.Tensor] = []
        self.v = None
        if rounding:
            self.v = torch.zeros_like(self.w, requires_grad=True)
            self.params.append(self.v)
        if clip == "minmax":
            self.a_min = torch.ones_like(self.mn, requires_grad=True)
            self.a_max = torch.ones_like(self.mx, requires_grad=True)
            self.params += [self.a_min, self.a_max]
        elif clip == "sigmoid":
            self.a_min = torch.full_like(self.mn, init_logit, requires_grad=True)
            self.a_max = torch.full_like(self.mx, init_logit, requires_grad=True)
            self.params += [self.a_min, self.a_max]

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scale, zero point) in scale shape: the quantizer's own, or recomputed from the learned clip range
        (the min-max formulas of qpass.primitives.quant, the zero point rounded with a straight-through
        estimator)."""
        if self.clip == "none":
            zp = None if self.zp_t is None else self.zp_t.float()
            return self.scale_t.float(), zp
        if self.clip == "minmax":
            g_min, g_max = self.a_min, self.a_max
        else:
            g_min, g_max = torch.sigmoid(self.a_min), torch.sigmoid(self.a_max)
        mn, mx = self.mn * g_min, self.mx * g_max
        if self.zp_t is None:
            scale = torch.maximum(-mn, mx).clamp(min=0) / Q.qrange(self.fmt, True)[1]
            return scale.clamp(min=Q.SCALE_FLOOR), None
        lo, hi = mn.clamp(max=0), mx.clamp(min=0)
        scale = ((hi - lo) / Q.qrange(self.fmt, False)[1]).clamp(min=Q.SCALE_FLOOR)
        zp = ste_round(-lo / scale).clamp(*Q.qrange(self.fmt, False))
        return scale, zp

    def _codes(self, scale, zp, rounder):
        s = Q.expand_to(scale, self.block, self.w.shape)
        y = self.w / s
        if self.v is not None:
            y = y + self.v
        lo, hi = Q.qrange(self.fmt, zp is None)
        if zp is None:
            return rounder(y).clamp(lo, hi), s
        z = Q.expand_to(zp, self.block, self.w.shape)
        return (rounder(y) + z).clamp(lo, hi) - z, s

    def value(self) -> torch.Tensor:
        scale, zp = self.qparams()
        k, s = self._codes(scale, zp, ste_round)
        return (k * s).to(self.param.dtype)

    def project(self) -> None:
        with torch.no_grad():
            if self.v is not None:
                self.v.clamp_(-0.5, 0.5)
            if self.clip == "minmax":
                self.a_min.clamp_(0.0, 1.0)
                self.a_max.clamp_(0.0, 1.0)

    @torch.no_grad()
    def bake(self) -> dict:
        """Write the learned rounding: weight = s * (q - z) (which the quantizer maps to itself), scale and zero
        point buffers; return what changed (codes that moved off round-to-nearest, mean clip factors)."""
        scale, zp = self.qparams()
        k, s = self._codes(scale, zp, torch.round)
        w = (k * s).to(self.param.dtype)
        rtn = Q.fake_quantize(self.w, self.scale_t.float(), None if self.zp_t is None else self.zp_t.float(),
                              self.block, self.fmt)
        self.param.copy_(w)
        self.scale_t.copy_(scale.to(self.scale_t.dtype))
        if self.zp_t is not None:
            self.zp_t.copy_(zp.round().to(self.zp_t.dtype))
        again = Q.fake_quantize(w, self.scale_t, self.zp_t, self.block, self.fmt)
        if not torch.equal(again, w):
            raise QuantizationError(f"baking the learned rounding of {self.site.path}: the quantizer does not map "
                                    f"the baked weight to itself ({int((again != w).sum())} elements differ)",
                                    fix="report this as a qpass bug")
        rec = {"changed": float((w != rtn).float().mean())}
        if self.clip != "none":
            g = (self.a_min, self.a_max) if self.clip == "minmax" else (torch.sigmoid(self.a_min),
                                                                        torch.sigmoid(self.a_max))
            rec.update(clip_min=float(g[0].mean()), clip_max=float(g[1].mean()))
        return rec


class WeightRoundingState(BlockState):
    """The learned weight quantizers of one block (SignRound, OmniQuant's LWC)."""

    def __init__(self, learned: list[LearnedWeightQuantizer], lr: float):
        self.learned = learned
        self.groups = [{"params": [p for lq in learned for p in lq.params], "lr": lr}]

    def overrides(self) -> dict[Node, torch.Tensor]:
        return {lq.node: lq.value() for lq in self.learned}

    def project(self) -> None:
        for lq in self.learned:
            lq.project()

    def bake(self, gm: GraphModule) -> dict:
        return {lq.site.path or lq.site.node.name: lq.bake() for lq in self.learned}


@dataclass
class WeightRounding(BlockMethod):
    sites: list[LinearSite]
    rounding: bool
    clip: ClipMode
    lr: float
    init_logit: float = 4.0

    def setup(self, gm: GraphModule, step, nodes: list[Node]) -> BlockState | None:
        mine = [s for s in self.sites if step.contains(s.node)]
        if not mine:
            return None
        return WeightRoundingState([LearnedWeightQuantizer(gm, s, rounding=self.rounding, clip=self.clip,
                                                           init_logit=self.init_logit)
                                    for s in mine], self.lr)


def trainable_weight_sites(gm: GraphModule, ctx: Context, cfg: BlockwiseConfig, who: str, *,
                           clip: bool) -> tuple[list[LinearSite], list[str]]:
    """The linears whose weight quantizer a block-wise pass can learn (and notes on those it cannot)."""
    sites = ctx.get(LinearSites(), gm)
    quantized = [s for s in sites if role_of(s.weight_use) == "weight"]
    if sites and not quantized:
        raise QuantizationError(
            f"{who} found no quantized weights among the {len(sites)} linears (e.g. {describe(gm, sites[0].node)})",
            fix=f"place '- quantize: {{weights: {{bits: 3, granularity: per_group, group_size: 64}}}}' before "
                f"'- {who}' in the recipe: {who} learns the quantizers that pass inserted")
    chosen = select([s.path for s in quantized], cfg.targets, cfg.ignore, who) if quantized else set()
    todo, near = [], [f"{s.path}: excluded by targets/ignore" for s in quantized if s.path not in chosen]
    for s in (s for s in quantized if s.path in chosen):
        why = learnable_reason(gm, s, clip)
        if why:
            near.append(f"{s.path or s.node.name}: {why}")
        else:
            todo.append(s)
    return todo, near


def learnable_reason(gm: GraphModule, site: LinearSite, clip: bool) -> str | None:
    """Why the weight quantizer of `site` cannot be learned, or None."""
    q = Quantizer(site.weight_use)
    if q.op != "fake_quantize" or q.dynamic:
        return f"weight quantizer is a {q.op}, not a static fake_quantize"
    if q.fmt.kind != "int":
        return f"weight format {q.fmt_name} is not an integer grid"
    if q.x is not site.weight:
        return "the weight reaches its quantizer through another op"
    spec = q.meta.spec if q.meta is not None else None
    if clip and spec is not None and (spec.full_range or spec.scale_pow2):
        return "full_range / scale_pow2 scales: the clip range cannot be learned (set the clip option off)"
    return shared_weight(gm, site)


@dataclass(frozen=True)
class SignRound(Pass):
    """Learn the rounding (and min/max range) of quantized weights block by block with SignSGD."""

    config: SignRoundConfig = SignRoundConfig()
    name: ClassVar[str] = "signround"
    needs_calibration: ClassVar[bool] = True
    preserves: ClassVar = STRUCTURE          # changes weights and qparam buffers only

    def run(self, gm: GraphModule, ctx: Context) -> PassResult:
        cfg = self.config
        todo, near = trainable_weight_sites(gm, ctx, cfg, self.name, clip=cfg.minmax_tuning)
        if not todo:
            return PassResult(modified=False, stats={"blocks": 0, "linears": 0}, near_misses=near)
        method = WeightRounding(todo, rounding=True, clip="minmax" if cfg.minmax_tuning else "none", lr=cfg.lr)
        results = train_blocks(gm, ctx, method, cfg, who=self.name)
        stats = {"linears": len(todo), **summarize(results)}
        plan = Plan(self.name, decisions={"linears": sorted(s.path or s.node.name for s in todo),
                                          "blocks": {r.block: r.kept for r in results}})
        return PassResult(modified=True, stats=stats, near_misses=near, plan=plan)


__all__ = ["SignRound", "SignRoundConfig", "LearnedWeightQuantizer", "WeightRounding", "WeightRoundingState",
           "trainable_weight_sites", "learnable_reason"]
