"""Re-round the weights the quantize pass inserted with GPTQ (Frantar et al. 2023).

Matches   every linear whose weight goes through a ``qpass.fake_quantize`` weight quantizer (inserted by an
          earlier ``quantize`` pass), selected by targets/ignore; its QSpec (int2..8, symmetric or not,
          per-tensor / per-channel / per-group with a partial last group; float and nf4 grids too)
Changes   the float weight W -> W_gptq (exactly representable: fake_quantize(W_gptq) == W_gptq) and the
          quantizer's scale / zero-point buffers, in place; no nodes added or removed
          per linear input: H = 2/n sum x x^T (linears reading the same input share it); the reference
          column loop with dampening, lazy batches, act-order and static groups (qpass.primitives.gptq)
Requires  calibration data; block by block (qpass.block_sweep): block i is calibrated on the outputs of
          blocks 0..i-1 as already re-rounded (``feed: quantized``) or of the float model (``feed: float``);
          with ``true_sequential`` the linears of a block are done in dependency order (q/k/v, o, gate/up,
          down), each observed with the earlier ones quantized and the later ones in float
          MoE experts (qpass.experts: stacked [E, out, in] weights behind a grouped matmul): one Hessian per
          expert from the rows routed to it (the grouped matmul's offsets split the sorted input), GPTQ per
          expert; an expert that received fewer than ``min_expert_tokens`` rows keeps the quantize pass's
          rounding, reported with its count
Preserves graph structure
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch.fx import GraphModule

from qpass.analyses import STRUCTURE, LinearSites
from qpass.errors import QuantizationError, RecipeError
from qpass.experts import ExpertHessians, ExpertSite, expert_sites, token_split
from qpass.experts import weight_quantizer as expert_weight_quantizer
from qpass.graph import LinearSite, describe, is_quantizer, param_of, select
from qpass.plan import Plan
from qpass.pass_infra import Context, Pass, PassResult
from qpass.patterns import storage_twins, weight_users
from qpass.primitives import quant as Q
from qpass.primitives.spec import BUILTIN_KINDS
from qpass.quantizer import Quantizer, role_of
from qpass.primitives.gptq import HessianAccumulator, gptq_quantize, reconstruction_error

log = logging.getLogger("qpass.gptq")


@dataclass(frozen=True)
class GptqConfig:
    name: ClassVar[str] = "gptq"
    field_docs: ClassVar[dict] = {
        "damp": "dampening, a fraction of mean(diag H) added to the diagonal (raised 10x while Cholesky fails)",
        "block_size": "columns per lazy batch update",
        "act_order": "quantize columns by decreasing diag(H) (desc_act); groups stay contiguous in the "
                     "original order (scales computed when the sweep first reaches a group)",
        "static_groups": "compute every group's scale from the original weights before the sweep",
        "clip": "each row's (group's) scale from its min-max range shrunk by the ratio (1, 0.99, .., 0.21) that "
                "minimises sum |q(w) - w|^2.4 of the columns the sweep reaches (the reference's "
                "Quantizer(mse=True), QuaRot's --w_clip); false: min-max",
        "sequential": "calibrate block by block (false: one run of the whole model with float weights)",
        "true_sequential": "within a block, quantize linears in dependency order, re-observing in between "
                           "(with sequential and feed: quantized)",
        "feed": "inputs of block i+1: `quantized` (block i as re-rounded) or `float` (the float model)",
        "targets": "module-path globs of quantized linears to re-round",
        "ignore": "module-path globs to leave as the quantize pass rounded them",
        "min_expert_tokens": "MoE: an expert that received fewer calibration tokens keeps the quantize pass's "
                             "rounding (reported); GPTQ on a few rows fits them, not the expert",
    }

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    static_groups: bool = False
    clip: bool = False
    sequential: bool = True
    true_sequential: bool = True
    feed: Literal["quantized", "float"] = "quantized"
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ()
    min_expert_tokens: int = 32

    def __post_init__(self):
        if self.min_expert_tokens < 1:
            raise RecipeError("min_expert_tokens", f"must be >= 1, got {self.min_expert_tokens}")
        if not 0.0 <= self.damp < 10.0:
            raise RecipeError("damp", f"must be in [0, 10) (a fraction of mean(diag H); 0.01 = 1%), got {self.damp}")
        if not 1 <= self.block_size <= 1 << 16:
            raise RecipeError("block_size", f"must be a number of columns in [1, {1 << 16}] (usual: 128), "
                              f"got {self.block_size}")
        if not self.targets:
            raise RecipeError("targets", "must list at least one module-path glob (e.g. ['*'])")


@dataclass(frozen=True)
class Gptq(Pass):
    """Re-round quantized weights with GPTQ (second-order error feedback), block by block."""

    config: GptqConfig = GptqConfig()
    name: ClassVar[str] = "gptq"
    needs_calibration: ClassVar[bool] = True
    preserves: ClassVar = STRUCTURE          # re-rounds weights and rewrites qparam buffers; no node changes

    def run(self, gm: GraphModule, ctx: Context) -> PassResult:
        cfg = self.config
        sites = ctx.get(LinearSites(), gm)
        quantized = [s for s in sites if _weight_quantizer(s) is not None]
        experts = [s for s in expert_sites(gm) if expert_weight_quantizer(s) is not None]
        if sites and not quantized and not experts:
            raise QuantizationError(
                f"gptq found no quantized weights among the {len(sites)} linears (e.g. {describe(gm, sites[0].node)})",
                fix="place '- quantize: {weights: {bits: 4, granularity: per_group, group_size: 128}}' before "
                    "'- gptq' in the recipe: gptq re-rounds the weights that pass inserted")
        keys = [s.path for s in quantized] + [s.key for s in experts]
        chosen = select(keys, cfg.targets, cfg.ignore, "gptq") if keys else set()
        near = [f"{k}: excluded by targets/ignore" for k in keys if k not in chosen]
        experts, expert_todo = [s for s in experts if s.key in chosen], []
        for s in experts:
            why = _expert_unsupported(s)
            (near.append(f"{s.key}: {why}") if why else expert_todo.append(s))
        todo, why_not = requantizable(gm, [s for s in quantized if s.path in chosen])
        near += why_not
        stats = {"linears": 0, "hessians": 0, "mean_error_ratio": None, "improved": 0, "damp_raised": 0}
        if not todo and not expert_todo:
            return PassResult(modified=False, stats=stats, near_misses=near)
        errors = {}

        def requantize(s: LinearSite, acc: HessianAccumulator) -> None:
            errors[s.path or s.node.name] = self._requantize(gm, s, acc)

        hessians, blocks = hessian_sweep(gm, ctx, todo, requantize, who="gptq", sequential=cfg.sequential,
                                         true_sequential=cfg.true_sequential, feed=cfg.feed) if todo else (0, 0)
        if expert_todo:
            per_expert, fallback = self._experts(gm, ctx, expert_todo)
            errors.update(per_expert)
            near += fallback
            stats.update(experts=len(per_expert), experts_kept_rtn=len(fallback))
        ratios = [e["ratio"] for e in errors.values()]
        stats.update(linears=len(errors) - stats.get("experts", 0), hessians=hessians,
                     mean_error_ratio=sum(ratios) / len(ratios) if ratios else None,
                     improved=sum(r < 1 for r in ratios),
                     damp_raised=sum(e["damp"] > cfg.damp for e in errors.values()),
                     blocks=blocks, errors=errors)
        # values only (the state dict holds the re-rounded weights and scales): the plan records which linears
        plan = Plan(self.name, decisions={"linears": sorted(errors)})
        return PassResult(modified=True, stats=stats, near_misses=near, plan=plan)

    def _experts(self, gm: GraphModule, ctx: Context, experts: list[ExpertSite]) -> tuple[dict, list[str]]:
        """GPTQ every expert of every stacked expert weight with its own Hessian (block by block, like the
        linears); returns ({'<key>[e]': errors}, fallback reasons)."""
        cfg, errors, fallback = self.config, {}, []
        left = {s.key for s in experts}
        sweep = ctx.sweep(gm, who="gptq", blocks=cfg.sequential, feed=cfg.feed, desc="gptq experts")
        staged = cfg.true_sequential and cfg.sequential and cfg.feed == "quantized"
        with contextlib.closing(iter(sweep)) as steps:
            for step in steps:
                mine = [s for s in experts if step.contains(s.node)]
                for stage in (_stages(mine) if staged else [mine]) if mine else []:
                    bypass = {expert_weight_quantizer(s) for s in experts if s.key in left}
                    hs = {s.key: ExpertHessians(s.experts) for s in stage}
                    nodes, parts = {}, {}
                    for s in stage:
                        px, po = hs[s.key].parts()
                        nodes[s.key, "x"], parts[s.key, "x"] = s.input, px
                        nodes[s.key, "offs"], parts[s.key, "offs"] = token_split(s), po
                    step.observe(nodes, lambda k, n: parts[k], bypass=bypass)
                    for s in stage:
                        self._requantize_experts(gm, s, hs[s.key], errors, fallback)
                        left.discard(s.key)
                if not left:
                    break
        return errors, fallback

    def _requantize_experts(self, gm: GraphModule, s: ExpertSite, hs: ExpertHessians, errors: dict,
                            fallback: list) -> None:
        cfg = self.config
        fq = Quantizer(expert_weight_quantizer(s))
        param, scale_t = param_of(gm, s.weight), param_of(gm, fq.scale)
        zp_t = param_of(gm, fq.zero_point) if fq.zero_point is not None else None
        flip = s.in_axis == 1                                    # stored [E, in, out]
        canon = lambda t: t.t() if flip else t                   # noqa: E731
        block = tuple(fq.block[1:][::-1] if flip else fq.block[1:])
        for e, acc in enumerate(hs.accs):
            if acc.tokens < cfg.min_expert_tokens:
                fallback.append(f"{s.key}[{e}]: {acc.tokens} calibration tokens < min_expert_tokens "
                                f"{cfg.min_expert_tokens}; kept the quantize pass's rounding")
                continue
            w = canon(param[e]).detach().clone()
            scale, zp = canon(scale_t[e]).detach(), None if zp_t is None else canon(zp_t[e]).detach()
            rtn = Q.fake_quantize(w, scale, zp, block, fq.fmt_name)
            res = gptq_quantize(w, acc.hessian, fq.meta.spec, block=block, percdamp=cfg.damp,
                                block_size=cfg.block_size, act_order=cfg.act_order, static_groups=cfg.static_groups,
                                clip=cfg.clip)
            with torch.no_grad():
                param[e].copy_(canon(res.weight))
                scale_t[e].copy_(canon(res.scale))
                if zp_t is not None:
                    zp_t[e].copy_(canon(res.zero_point))
            err, err_rtn = reconstruction_error(w, res.weight, acc.xtx), reconstruction_error(w, rtn, acc.xtx)
            errors[f"{s.key}[{e}]"] = {"gptq": err, "rtn": err_rtn, "ratio": err / err_rtn if err_rtn > 0 else 1.0,
                                       "damp": res.damp, "tokens": acc.tokens}

    def _requantize(self, gm: GraphModule, site: LinearSite, acc: HessianAccumulator) -> dict:
        """GPTQ one linear and write weight and qparams back in their stored layouts."""
        cfg, ws = self.config, WeightState.of(gm, site)
        rtn = ws.rtn()
        res = gptq_quantize(ws.w, acc.hessian, ws.spec, block=ws.block, percdamp=cfg.damp, block_size=cfg.block_size,
                   act_order=cfg.act_order, static_groups=cfg.static_groups, clip=cfg.clip)
        ws.write(res.weight, res.scale, res.zero_point)
        err, err_rtn = reconstruction_error(ws.w, res.weight, acc.xtx), reconstruction_error(ws.w, rtn, acc.xtx)
        return {"gptq": err, "rtn": err_rtn, "ratio": err / err_rtn if err_rtn > 0 else 1.0, "damp": res.damp}


@dataclass
class WeightState:
    """A quantized linear's weight as the re-rounding passes see it: `w` a copy in canonical [out, in] layout,
    the quantizer's spec, canonical block and current scale / zero point (`scale`, `zero_point`), and `write`,
    which stores a new weight and qparams back in their stored layouts."""

    fq: Quantizer
    site: LinearSite
    param: torch.Tensor
    scale_t: torch.Tensor
    zp_t: torch.Tensor | None
    w: torch.Tensor

    @classmethod
    def of(cls, gm: GraphModule, site: LinearSite) -> "WeightState":
        fq = Quantizer(_weight_quantizer(site))
        param = param_of(gm, site.weight)
        w = (param if site.in_axis == 1 else param.t()).detach().clone()          # canonical [out, in]
        return cls(fq, site, param, param_of(gm, fq.scale),
                   param_of(gm, fq.zero_point) if fq.zero_point is not None else None, w)

    @property
    def spec(self):
        return self.fq.meta.spec

    @property
    def flip(self) -> bool:                                  # quantizer laid out on [in, out] (mm family)
        return self.site.use_in_axis == 0

    @property
    def block(self) -> tuple[int, ...]:
        return tuple(self.fq.block[::-1] if self.flip else self.fq.block)

    def _canon(self, t: torch.Tensor) -> torch.Tensor:
        return t.t() if self.flip else t

    @property
    def scale(self) -> torch.Tensor:
        return self._canon(self.scale_t.detach())

    @property
    def zero_point(self) -> torch.Tensor | None:
        return None if self.zp_t is None else self._canon(self.zp_t.detach())

    def rtn(self) -> torch.Tensor:
        """The weight rounded to nearest with the current qparams, [out, in]."""
        return Q.fake_quantize(self.w, self.scale, self.zero_point, self.block, self.fq.fmt_name)

    def write(self, weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> None:
        with torch.no_grad():
            self.param.copy_(weight if self.site.in_axis == 1 else weight.t())
            self.scale_t.copy_(self._canon(scale))
            if self.zp_t is not None:
                self.zp_t.copy_(self._canon(zero_point))


def hessian_sweep(gm: GraphModule, ctx: Context, todo: list[LinearSite],
                  each: Callable[[LinearSite, HessianAccumulator], None], *, who: str, sequential: bool = True,
                  true_sequential: bool = True, feed: str = "quantized") -> tuple[int, int]:
    """GPTQ's calibration: the input Hessian of every site of `todo` (linears with a weight quantizer), block by
    block (``sequential``; else one run of the whole graph), ``each(site, accumulator)`` called as soon as a
    site's Hessian is complete. The weight quantizers of the sites not handled yet run as the identity (float,
    as in the reference); with ``true_sequential`` (and ``feed: quantized``) the linears of a block are observed
    in dependency order, each after the earlier ones were handled. Returns (Hessians computed, blocks)."""
    hessians, left = 0, {s.node for s in todo}
    sweep = ctx.sweep(gm, who=who, blocks=sequential, feed=feed, desc=who)
    with contextlib.closing(iter(sweep)) as steps:   # NOTE: closed now, not by the GC: see Sweep
        for step in steps:
            mine = [s for s in todo if step.contains(s.node)]
            # NOTE: re-rounding overwrites the float weights, so only `feed: quantized` can observe a block again
            staged = true_sequential and sequential and feed == "quantized"
            for stage in (_stages(mine) if staged else [mine]) if mine else []:
                bypass = {_weight_quantizer(s) for s in todo if s.node in left}
                inputs = {s.input: s.input for s in stage}
                accs = step.observe(inputs, lambda k, n: HessianAccumulator(), bypass=bypass)
                hessians += len(accs)
                for s in stage:
                    each(s, accs[s.input])
                    left.discard(s.node)
            if not left:
                break
    return hessians, len(sweep.blocks)


def _expert_unsupported(site: ExpertSite) -> str | None:
    """Why GPTQ cannot re-round these experts one by one, or None."""
    fq = Quantizer(expert_weight_quantizer(site))
    if fq.dynamic or fq.codebook is not None or fq.side_channels or fq.fmt.kind not in BUILTIN_KINDS:
        return "weight quantizer is not a static fake_quantize of a built-in format"
    if token_split(site) is None:
        return (f"{site.node.target} gives no per-expert token split (only grouped matmuls with offsets do); kept "
                "the quantize pass's rounding")
    if fq.block[0] != 1:
        return "scales shared across experts"
    return None


def _weight_quantizer(site: LinearSite):
    n = site.weight_use
    return n if role_of(n) == "weight" else None


def requantizable(gm: GraphModule, sites: list[LinearSite]) -> tuple[list[LinearSite], list[str]]:
    """The sites whose weight a re-rounding pass (gptq, quantease) can change, and why each other one cannot."""
    todo, near = [], []
    for s in sites:
        why = _unsupported(gm, s)
        if why:
            near.append(f"{s.path or s.node.name}: {why}")
        else:
            todo.append(s)
    return todo, near


def _unsupported(gm: GraphModule, site: LinearSite) -> str | None:
    """Why GPTQ cannot re-round this weight, or None."""
    fq = Quantizer(_weight_quantizer(site))
    if fq.meta.spec.dynamic or fq.dynamic:
        return "weight quantizer is not a static fake_quantize"
    if fq.codebook is not None or fq.side_channels or fq.fmt.kind not in BUILTIN_KINDS:
        return f"weight quantizer has a {fq.fmt_name} table or side channels {fq.side_channels.names}"
    return shared_weight(gm, site)


def shared_weight(gm: GraphModule, site: LinearSite) -> str | None:
    """Why the weight of `site` cannot be changed on its own (used elsewhere or tied storage), or None."""
    allowed = site.weight_use if is_quantizer(site.weight_use) else site.node
    users = weight_users(site.weight)
    if users != [allowed]:
        return f"weight {site.weight.target} is also used by {[u.name for u in users if u is not allowed]} (tied)"
    twins = storage_twins(gm).get(site.weight.target, ())
    if twins:
        return f"weight {site.weight.target} shares storage with {twins[0]} (tied); changing it would change both"
    return None


def _stages(sites: list[LinearSite]) -> list[list[LinearSite]]:
    """Sites grouped by how many of the other sites lie on their longest input path (q/k/v: 0, o: 1, ...)."""
    nodes = {s.node for s in sites}
    if not sites:
        return []
    graph = sites[0].node.graph
    depth: dict = {}
    for n in graph.nodes:
        depth[n] = max((depth.get(a, 0) + (a in nodes) for a in n.all_input_nodes), default=0)
    by: dict[int, list[LinearSite]] = {}
    for s in sites:
        by.setdefault(depth[s.node], []).append(s)
    return [by[k] for k in sorted(by)]


__all__ = ["Gptq", "GptqConfig", "WeightState", "hessian_sweep", "requantizable", "shared_weight"]
