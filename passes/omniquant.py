"""OmniQuant (Shao et al. 2024): learnable weight clipping and learnable equivalent transformation, block by block.

Matches   every linear whose weight goes through a static int ``qpass.fake_quantize`` weight quantizer (inserted by
          an earlier ``quantize`` pass) fed by the weight parameter itself, selected by targets/ignore; for LET, the
          folding groups of ``qpass.folding.analyze`` on the graph seen without its weight and dynamic activation
          quantizers: norm -> linears, and a linear -> linear group whose path crosses attention (v -> o); not the
          second FFN linear (up -> down, fc1 -> fc2), where the paper found LET unstable
Changes   LWC: per scale block of each weight (per output channel, or per group) clip factors gamma = sigmoid(a) on
          the max and beta = sigmoid(b) on the min the quantizer's scale and zero point are computed from
          (h = (gamma max - beta min) / (2^N - 1), z = -round(beta min / h); symmetric grids: h = max(gamma max,
          -beta min) / qmax); a = b = 4 at the start (the reference's init).
          LET: per producer channel of each group a scale s and (where ``folding.shift_reason`` allows) a shift d:
          the producer computes X' = (X - d) / s (norm weight / s, bias (b - d) / s; a linear producer's rows),
          each consumer W' = W diag(s[map]) and bias B + W d[map]; s starts at SmoothQuant's
          max|X - d|^alpha / max|W|^(1 - alpha), d at OS+'s (max + min) / 2 of the consumers' float inputs.
          Trained block by block (qpass.blockwise) against the float block's outputs (MSE) with AdamW (weight
          decay 0), the recipe's quantizers live, weight quantizer scales recomputed from the transformed weight
          every step; best step kept (on held-out samples by default), the block left as it was when that is
          better. ``aug_loss`` (the reference's --aug_loss, used by its W2A16 g64 LLaMA scripts): the engine's
          second target, the float block on the student's (quantized) inputs, added to the MSE.
          Baked: norm weights and biases, linear biases, and each weight as its dequantized value under
          the learned scale / zero point (which the quantizer maps to itself); LET adds zero biases where a shift
          needs one and there is none (RMSNorm, bias-free linears: the plan's ``edits``), no other node
          NOT done here: the q/k scale inside attention (RoPE sits between q_proj / k_proj and the product on
          LLaMA-style graphs; not implemented for either kind)
Requires  calibration data (the block-by-block sweep; LET: one observation run for its initialisation)
Preserves nothing with LET (may add bias nodes); graph structure without
"""
from __future__ import annotations

from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch.fx import Graph, GraphModule, Node

from qpass import folding
from qpass import patterns as P
from qpass.analyses import Observed
from qpass.blockwise import TRAIN_DOCS, BlockMethod, BlockState, BlockwiseConfig, summarize, train_blocks
from qpass.errors import RecipeError
from qpass.folding import Consumer, FoldGroup, shift_reason
from qpass.graph import LinearSite, is_quantizer, linear_sites, param_of, select
from qpass.pass_infra import Context, Pass, PassResult
from qpass.plan import Plan
from qpass.primitives import quant as Q
from qpass.quantizer import Quantizer, quantizers

from .os_plus import _MakeStats, _apply_edits, _bias_edits, _linear_keys
from .signround import LearnedWeightQuantizer, WeightRounding, learnable_reason, trainable_weight_sites
from .smoothquant import smoothing_scales


@dataclass(frozen=True)
class OmniQuantConfig(BlockwiseConfig):
    name: ClassVar[str] = "omniquant"
    field_docs: ClassVar[dict] = {
        **TRAIN_DOCS,
        "lwc": "learnable weight clipping (false with LET: the weight quantizers keep min-max ranges)",
        "let": "learnable equivalent transformation: true, false, or auto (on when the graph quantizes "
               "activations, off for weight-only recipes: the paper's LLaMA setting; the reference code's "
               "weight-only OPT scripts turn LET on, a per-model-family choice auto does not make)",
        "let_lr": "learning rate of LET's scales and shifts",
        "let_alpha": "SmoothQuant migration strength of LET's initial scales",
        "let_shift": "learn shifts too where the graph allows one (initialised at OS+'s channel centres)",
        "init_logit": "start of the clip logits: gamma = beta = sigmoid(init_logit)"}

    steps: int = 200
    lr: float = 0.01                    # the reference README's --lwc_lr (the paper's text says 5e-3)
    batch_size: int = 4
    optimizer: Literal["signsgd", "adam", "adamw"] = "adamw"
    feed: Literal["quantized", "float"] = "quantized"
    lwc: bool = True
    let: Any = "auto"
    let_lr: float = 0.005               # the reference README's --let_lr (the paper's text says 1e-2)
    let_alpha: float = 0.5              # the reference's --alpha
    let_shift: bool = True
    init_logit: float = 4.0

    def __post_init__(self):
        super().__post_init__()
        if not -20.0 <= self.init_logit <= 20.0:
            raise RecipeError("init_logit", f"must be in [-20, 20] (reference: 4), got {self.init_logit}")
        if self.let not in (True, False, "auto"):
            raise RecipeError("let", f"must be true, false or auto, got {self.let!r}")
        if not 0.0 < self.let_lr < 10.0:
            raise RecipeError("let_lr", f"must be in (0, 10), got {self.let_lr}")
        if not 0.0 <= self.let_alpha <= 1.0:
            raise RecipeError("let_alpha", f"must be in [0, 1] (reference: 0.5), got {self.let_alpha}")


# ----------------------------------------------------------------------------------------------------- LET groups


@dataclass
class LetGroup:
    """One LET folding point on the real graph: its group (real nodes), initial scale and shift (None: none)."""

    group: FoldGroup
    s0: torch.Tensor
    z0: torch.Tensor | None
    key: tuple


def _bypassable(n: Node) -> bool:
    """A weight quantizer or a dynamic activation quantizer: LET transforms what they see. Static activation
    quantizers stay (their calibrated ranges would not follow a transform): sinks of the folding analysis."""
    if not is_quantizer(n):
        return False
    q = Quantizer(n)
    return q.role == "weight" or q.dynamic


def float_view(gm: GraphModule) -> GraphModule:
    """A copy of `gm` (parameters shared) without its weight and dynamic activation quantizers (tests: the graph
    with its quantizers off)."""
    g = Graph()
    out = g.graph_copy(gm.graph, {})
    g.output(out)
    for n in list(g.nodes):
        if _bypassable(n):
            n.replace_all_uses_with(Quantizer(n).x)
            g.erase_node(n)
    return GraphModule(gm, g)


@contextmanager
def _bypassed(gm: GraphModule):
    """`gm`'s graph with its users of weight and dynamic activation quantizers reading the quantizers' inputs
    instead, so that ``folding.analyze`` finds the folding points the recipe's quantizers hide; restored after
    (in place: no copy of the module, which streaming could not make)."""
    saved, cut = {}, {}
    for n in list(gm.graph.nodes):
        if _bypassable(n):
            for u in n.users:
                saved.setdefault(u, (u.args, u.kwargs))
            n.replace_all_uses_with(Quantizer(n).x)
            cut[n] = (n.args, n.kwargs)
    for n in cut:                   # detached: no longer a user of its input and tensors
        n.args, n.kwargs = (), {}
    try:
        yield gm
    finally:
        for n, (args, kwargs) in cut.items():
            n.args, n.kwargs = args, kwargs
        for u, (args, kwargs) in saved.items():
            u.args, u.kwargs = args, kwargs
        gm.recompile()


def _through_attention(group: FoldGroup) -> bool:
    """Whether the producer's values reach a consumer through attention (v -> o), not an FFN activation."""
    stop = {c.site.node for c in group.consumers}
    seen, todo = set(), deque(group.producer.node.users)
    while todo:
        n = todo.popleft()
        if n in seen or n in stop:
            continue
        seen.add(n)
        if n.target is P.SDPA or n.target in P.MATMULS:
            return True
        todo.extend(n.users)
    return False


def _real_group(gm: GraphModule, g: FoldGroup) -> FoldGroup:
    """`g` (found with the quantizers bypassed) with the graph's linear sites as they are (weight quantizers)."""
    sites = {s.node: s for s in linear_sites(gm)}
    return FoldGroup(g.producer, tuple(Consumer(sites[c.site.node], c.channel_map) for c in g.consumers))


def _key(view: GraphModule, g: FoldGroup) -> tuple:
    sites, keys = _linear_keys(view)
    at = {s.node: k for s, k in zip(sites, keys)}
    return tuple(at[c.site.node] for c in g.consumers)


def let_groups(gm: GraphModule, ctx: Context, cfg: OmniQuantConfig) -> tuple[list[LetGroup], list[str], list]:
    """The LET folding points of `gm` with their initial scales and shifts; adds the zero biases the shifts need
    (returned as os_plus-style edits, which ``OmniQuant.apply`` repeats). Returns (groups, near misses, edits)."""
    with _bypassed(gm):
        analysis = folding.analyze(gm)
        found = [(g, _key(gm, g), _through_attention(g), shift_reason(g)) for g in analysis.groups]
    paths = [c.site.path for g, *_ in found for c in g.consumers]
    chosen = select(paths, cfg.targets, cfg.ignore, "omniquant") if paths else set()
    near, todo = [], []
    for g, key, attn, no_shift in found:
        if g.producer.kind == "linear" and not attn:
            near.append(f"{g.name}: no LET before the second FFN linear (unstable in the paper)")
            continue
        left = [c.site.path for c in g.consumers if c.site.path not in chosen]
        if left:
            near.append(f"{g.name}: no LET, {', '.join(left)} excluded by targets/ignore")
            continue
        real = _real_group(gm, g)
        sites = [c.site for c in real.consumers] + ([_producer_site(gm, real)] if g.producer.kind == "linear" else [])
        why = next((f"{s.path}: {w}" for s in sites if (w := _let_reason(gm, s))), None)
        if why:
            near.append(f"{g.name}: no LET ({why})")
            continue
        todo.append((g, real, key, no_shift))
    if not todo:
        return [], near, []
    # the quantizers' inputs, observed on the graph as the recipe made it (earlier blocks quantized)
    names = tuple(dict.fromkeys(c.site.input.name for g, *_ in todo for c in g.consumers))
    stats = ctx.get(Observed(names, _MakeStats(0), who="omniquant",
                             desc="omniquant: observing linear inputs (LET initialisation)"), gm)
    inits, edits = [], []
    for g, real, key, no_shift in todo:
        shift = cfg.let_shift and no_shift is None
        if cfg.let_shift and not shift:
            near.append(f"{g.name}: LET scale only, no shift ({no_shift})")
        with ctx.loaded([c.site.weight.target for c in g.consumers]):
            s0, z0 = _init(gm, g, [stats[c.site.input.name] for c in g.consumers], shift, cfg.let_alpha)
        inits.append((key, s0, z0))
        if z0 is not None:
            edits += _bias_edits(gm, real)
    edits = list(dict.fromkeys(edits))           # a v_proj both consumes and produces
    if edits:
        _apply_edits(gm, edits)
    with _bypassed(gm):
        by_key = {_key(gm, g): g for g in folding.analyze(gm).groups}
    out = [LetGroup(_real_group(gm, by_key[k]), s0, z0, k) for k, s0, z0 in inits]
    return out, near, edits


def _producer_site(gm: GraphModule, g: FoldGroup) -> LinearSite:
    return next(s for s in linear_sites(gm) if s.node is g.producer.node)


def _let_reason(gm: GraphModule, site: LinearSite) -> str | None:
    q = Quantizer.of(site.weight_use)
    if q is None or q.role != "weight":
        return "weight not quantized (LET trains through the weight quantizers)"
    return learnable_reason(gm, site, clip=True)


def _init(gm, g: FoldGroup, stats: list, shift: bool, alpha: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SmoothQuant's scales on the (shifted) channel ranges; OS+'s shift (max + min) / 2 (None: no shift)."""
    n = g.producer.channels
    lo = torch.full((n,), float("inf"), dtype=torch.float64)
    hi = torch.full((n,), float("-inf"), dtype=torch.float64)
    for c, st in zip(g.consumers, stats):
        lo.scatter_reduce_(0, c.channel_map, st.min.double(), reduce="amin")
        hi.scatter_reduce_(0, c.channel_map, st.max.double(), reduce="amax")
    used = g.consumed & torch.isfinite(lo) & torch.isfinite(hi)
    lo, hi = torch.where(used, lo, 0.0), torch.where(used, hi, 0.0)
    z = torch.where(used, (hi + lo) / 2, 0.0) if shift else torch.zeros(n, dtype=torch.float64)
    x = torch.maximum(hi - z, z - lo)
    w = folding.to_channels(g, [folding.weight_absmax(gm, c.site) for c in g.consumers])
    s = smoothing_scales(x, w, alpha, 1e-5, g.consumed)
    return s.float(), (z.float() if shift else None)


# ------------------------------------------------------------------------------------------------ block training


class _LetQuantizer(LearnedWeightQuantizer):
    """LWC on a weight that LET transforms: min / max (hence the scale) recomputed from the transformed weight."""

    def __init__(self, gm: GraphModule, site: LinearSite, *, train_clip: bool, init_logit: float):
        super().__init__(gm, site, rounding=False, clip="sigmoid" if train_clip else "minmax", init_logit=init_logit)
        if not train_clip:
            self.params = []             # min-max: multipliers 1, not trained
        self.w0 = self.w

    def value_of(self, w: torch.Tensor) -> torch.Tensor:
        self.w = w
        self.mn, self.mx = Q.block_minmax(w, self.block)
        return self.value()

    @torch.no_grad()
    def bake_of(self, w: torch.Tensor) -> dict:
        self.w = w.detach()
        self.mn, self.mx = Q.block_minmax(self.w, self.block)
        return self.bake()


class _LetState(BlockState):
    """LWC and LET of one block. Scales / shifts act on the canonical [out, in] weights; every value the block
    reads (weight quantizer outputs, biases, norm weights and biases) is a function of the originals."""

    def __init__(self, gm: GraphModule, sites: list[LinearSite], groups: list[LetGroup], cfg: OmniQuantConfig):
        self._gm = gm
        self.lq = {s.node: _LetQuantizer(gm, s, train_clip=cfg.lwc, init_logit=cfg.init_logit) for s in sites}
        self.sites = {s.node: s for s in sites}
        self.groups = []
        self.let = []                    # (LetGroup, s, z)
        self.col: dict[Node, tuple] = {}     # site node -> (s, z, channel_map) of the group it consumes
        self.row: dict[Node, tuple] = {}     # site node -> (s, z) of the group it produces (v -> o)
        self.norms = []                  # (producer, s, z)
        lets = []
        for lg in groups:
            s = lg.s0.clone().requires_grad_(True)
            z = None if lg.z0 is None else lg.z0.clone().requires_grad_(True)
            lets += [s] + ([z] if z is not None else [])
            self.let.append((lg, s, z))
            for c in lg.group.consumers:
                self.col[c.site.node] = (s, z, c.channel_map)
            if lg.group.producer.kind == "linear":
                self.row[lg.group.producer.node] = (s, z)
            else:
                self.norms.append((lg.group.producer, s, z))
        self.bias0 = {n: param_of(gm, s.bias).detach().float().clone() for n, s in self.sites.items()
                      if s.bias is not None and (n in self.col or n in self.row)}
        self.norm0 = {p: param_of(gm, p).detach().float().clone() for prod, _, _ in self.norms
                      for p, _ in prod.params}
        lwc = [p for q in self.lq.values() for p in q.params]
        if lwc:
            self.groups.append({"params": lwc, "lr": cfg.lr})
        if lets:
            self.groups.append({"params": lets, "lr": cfg.let_lr})

    def _weight(self, n: Node) -> torch.Tensor:
        """The transformed weight of site `n` in its stored layout."""
        site, w = self.sites[n], self.lq[n].w0
        if n not in self.col and n not in self.row:
            return w
        w = w if site.in_axis == 1 else w.t()
        if n in self.col:
            s, _, cmap = self.col[n]
            w = w * s[cmap][None, :]
        if n in self.row:
            w = w / self.row[n][0][:, None]
        return w if site.in_axis == 1 else w.t()

    def _bias(self, n: Node) -> torch.Tensor:
        site, b = self.sites[n], self.bias0[n]
        if n in self.col and self.col[n][1] is not None:
            _, z, cmap = self.col[n]
            w0 = self.lq[n].w0 if site.in_axis == 1 else self.lq[n].w0.t()
            b = b + w0 @ z[cmap]
        if n in self.row:
            s, z = self.row[n]
            b = (b - z) / s if z is not None else b / s
        return b

    def _values(self) -> dict[Node, torch.Tensor]:
        """Biases and norm parameters (weights are the quantizers' business)."""
        out = {}
        for n in self.bias0:
            out[self.sites[n].bias] = self._bias(n)
        for prod, s, z in self.norms:
            (g, _), rest = prod.params[0], prod.params[1:]
            out[g] = self.norm0[g] / s
            if rest:
                b = rest[0][0]
                out[b] = (self.norm0[b] - z) / s if z is not None else self.norm0[b] / s
        return out

    def overrides(self) -> dict[Node, torch.Tensor]:
        out = {self.sites[n].weight_use: q.value_of(self._weight(n)) for n, q in self.lq.items()}
        for node, v in self._values().items():
            out[node] = v.to(param_of(self._gm, node).dtype)
        return out

    def project(self) -> None:
        for q in self.lq.values():
            q.project()
        with torch.no_grad():
            for _, s, _ in self.let:
                s.clamp_(min=1e-5)

    @torch.no_grad()
    def fold_float(self, gm: GraphModule) -> None:
        """Write the transform with float weights (not quantized): the graph without its quantizers then computes
        what it computed before (function preservation; tests)."""
        for n, site in self.sites.items():
            p = param_of(gm, site.weight)
            p.copy_(self._weight(n).to(p.dtype))
        for node, v in self._values().items():
            p = param_of(gm, node)
            p.copy_(v.to(p.dtype))

    @torch.no_grad()
    def bake(self, gm: GraphModule) -> dict:
        weights = {n: self._weight(n) for n in self.lq}
        values = self._values()
        rec = {"linears": {s.path or n.name: self.lq[n].bake_of(weights[n]) for n, s in self.sites.items()}}
        for node, v in values.items():
            p = param_of(gm, node)
            p.copy_(v.to(p.dtype))
        if self.let:
            rec["let"] = {lg.group.name: {"scale_mean": float(s.mean()), "scale_max": float(s.max()),
                                          **({"shift_absmax": float(z.abs().max())} if z is not None else {})}
                          for lg, s, z in self.let}
        return rec


@dataclass
class _OmniMethod(BlockMethod):
    sites: list[LinearSite]
    groups: list[LetGroup]
    cfg: OmniQuantConfig
    used: set = field(default_factory=set)

    def setup(self, gm: GraphModule, step, nodes: list[Node]) -> BlockState | None:
        sites = [s for s in self.sites if step.contains(s.node)]
        nodes_ = {s.node for s in sites}
        mine = [g for g in self.groups if step.contains(g.group.producer.node)
                and all(c.site.node in nodes_ for c in g.group.consumers)
                and (g.group.producer.kind != "linear" or g.group.producer.node in nodes_)]
        self.used.update(g.key for g in mine)
        if not self.cfg.lwc:             # LET only: the weights no group transforms keep their quantizers as is
            touched = {c.site.node for g in mine for c in g.group.consumers} | {g.group.producer.node for g in mine}
            sites = [s for s in sites if s.node in touched]
        if not sites:
            return None
        return _LetState(gm, sites, mine, self.cfg)


# ---------------------------------------------------------------------------------------------------------- pass


def _quantizes_activations(gm: GraphModule) -> bool:
    return any(q.role != "weight" for q in quantizers(gm))


@dataclass(frozen=True)
class OmniQuant(Pass):
    """Learn weight clipping (LWC) and, for weight+activation recipes, equivalent transforms (LET) block by block."""

    config: OmniQuantConfig = OmniQuantConfig()
    name: ClassVar[str] = "omniquant"
    needs_calibration: ClassVar[bool] = True
    preserves: ClassVar = ()                 # LET may add bias nodes

    def run(self, gm: GraphModule, ctx: Context) -> PassResult:
        cfg = self.config
        let = _quantizes_activations(gm) if cfg.let == "auto" else cfg.let
        if not cfg.lwc and not let:
            why = "the graph quantizes no activation (let: auto)" if cfg.let == "auto" else "let: false"
            return PassResult(modified=False, stats={"blocks": 0, "linears": 0},
                              near_misses=[f"lwc: false and no LET ({why}): nothing to train"])
        todo, near = trainable_weight_sites(gm, ctx, cfg, self.name, clip=cfg.lwc)
        if not todo:
            return PassResult(modified=False, stats={"blocks": 0, "linears": 0}, near_misses=near)
        groups, edits = [], []
        if let:
            groups, near_let, edits = let_groups(gm, ctx, cfg)
            near += near_let
            fresh = {s.weight: s for s in linear_sites(gm)}      # the bias edits may have replaced nodes
            todo = [fresh[s.weight] for s in todo]
        if cfg.lwc and not groups:
            method: BlockMethod = WeightRounding(todo, rounding=False, clip="sigmoid", lr=cfg.lr,
                                                 init_logit=cfg.init_logit)
        else:
            method = _OmniMethod(todo, groups, cfg)
        results = train_blocks(gm, ctx, method, cfg, who=self.name)
        stats = {"linears": len(todo), "let_groups": len(groups), "biases_added": len(edits), **summarize(results)}
        if isinstance(method, _OmniMethod) and len(method.used) < len(groups):
            near += [f"{g.group.name}: no LET (producer and consumers not in one block)" for g in groups
                     if g.key not in method.used]
        plan = Plan(self.name, decisions={"linears": sorted(s.path or s.node.name for s in todo),
                                          "let": sorted(g.group.name for g in groups if g.key in getattr(
                                              method, "used", ())),
                                          "blocks": {r.block: r.kept for r in results},
                                          "edits": [list(e) for e in edits]})
        return PassResult(modified=True, stats=stats, near_misses=near, plan=plan)

    @classmethod
    def apply(cls, gm: GraphModule, plan: Plan) -> None:
        """Add the zero biases LET's shifts needed (a saved model's values are loaded over them); everything else
        LET and LWC learned is in parameter values, which the state dict holds."""
        edits = [tuple(e) for e in plan.decisions.get("edits", ())]
        if edits:
            _apply_edits(gm, edits)


__all__ = ["OmniQuant", "OmniQuantConfig", "float_view", "let_groups", "LetGroup"]
