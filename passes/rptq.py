"""Reorder activation channels into clusters and quantize each cluster with its own static scale (RPTQ).

Matches   every folding group of ``qpass.folding.analyze`` (a norm or a linear, and the linears that read it)
          whose linears are all selected and whose channels a permutation can reorder (``permutation_reason``:
          norm -> q/k/v, norm -> gate/up or fc1, v_proj -> o_proj within each head, fc1 -> relu -> fc2), and
          gated units ``act(gate(x)) * up(x) -> down`` (the rows of gate and up reordered alike)
Changes   per group, from the calibration (min, max) of every producer channel the consumers read:
            labels = k-means on the 2-D (min, max) points into `clusters` clusters (seeded k-means++)
            perm   = channels laid out cluster by cluster (clusters by centre), inside each block a permutation
                     may move (all channels; one attention head), folded with ``folding.fold_permutation``:
                     linear producer rows reordered, a norm gets a channel gather after it (the reorder fused
                     into the norm's output), consumer input columns reordered to match
            each consumer input -> qpass.fake_quantize(x, scale, zero_point, [1, .., 1, 1], fmt): a static
                     per-channel quantizer whose scale and zero point are those of the channel's cluster
                     (min-max of the cluster), i.e. per-cluster scales, contiguous after the reorder
          selected linears without a reorderable group: `unreordered` (per_tensor: one static scale; clusters:
          per-cluster scales without the reorder, which a kernel would need a gather for; float: none)
          weights are left alone: quantize them with a later `quantize` (activations: null) or `gptq`
Requires  calibration data (one run: per-channel min and max of each selected linear input)
Preserves nothing (gathers and quantizers are added); before the quantizers outputs are equal up to rounding
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch.fx import GraphModule, Node

from qpass import folding
from qpass import patterns as P
from qpass.analyses import FoldGroups, Observed
from qpass.errors import RecipeError
from qpass.graph import LinearSite, linear_sites, param_of, select
from qpass.pass_infra import Context, Pass, PassResult
from qpass.plan import Plan, PlanError, build, occurrences
from qpass.primitives.quant import qparams_from_minmax
from qpass.primitives.rptq import cluster_ranges, cluster_order, kmeans
from qpass.primitives.spec import BUILTIN_KINDS, IntFormat, PerChannel, PerTensor, QSpec
from qpass.quantizer import QuantMeta

from .quantize import Quantize

aten = torch.ops.aten


@dataclass(frozen=True)
class RptqConfig:
    name: ClassVar[str] = "rptq"
    field_docs: ClassVar[dict] = {
        "clusters": "clusters per group (the paper's g; capped at the channels a group reads); 1 is per-tensor",
        "seed": "seed of the k-means++ initialisation",
        "activations": "the input quantizer of each cluster: format and symmetry, static (granularity per_channel "
                       "or per_tensor: either way one scale per cluster, recorded as per_channel axis -1)",
        "unreordered": "selected linears whose input cannot be reordered (no folding group, a group with an ignored "
                       "linear, or a product of two computed tensors): per_tensor (one static scale), clusters (per-cluster scales without the "
                       "reorder: a kernel needs a gather) or float (no input quantizer)",
        "targets": "module-path globs of the linears whose inputs to quantize",
        "ignore": "module-path globs of linears to leave alone (a group with one is not reordered)",
    }

    clusters: int = 32
    seed: int = 0
    activations: QSpec = QSpec(IntFormat(4), PerChannel(-1), symmetric=False)
    unreordered: Literal["per_tensor", "clusters", "float"] = "per_tensor"
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ()

    def __post_init__(self):
        if not 1 <= self.clusters <= 1 << 16:
            raise RecipeError("clusters", f"must be an integer in [1, 65536], got {self.clusters}")
        a = self.activations
        if a.dynamic:
            raise RecipeError("activations.dynamic", "RPTQ's cluster scales are static (from calibration): set "
                              "dynamic: false")
        if a.format.kind not in BUILTIN_KINDS:
            raise RecipeError("activations.format", f"int, fp8, fp4 or nf4, got {a.format.name}")
        if not isinstance(a.granularity, (PerChannel, PerTensor)) or getattr(a.granularity, "axis", -1) not in (-1, 0):
            raise RecipeError("activations.granularity", "per_channel (axis -1) or per_tensor: the scales are per "
                              "cluster either way")
        if self.unreordered not in ("per_tensor", "clusters", "float"):
            raise RecipeError("unreordered", f"per_tensor, clusters or float, got {self.unreordered!r}")
        if not self.targets:
            raise RecipeError("targets", "must list at least one module-path glob (e.g. ['*'])")


@dataclass(frozen=True)
class Rptq(Pass):
    """Cluster and reorder linear-input channels (folded into producers and consumers), one scale per cluster."""

    config: RptqConfig = RptqConfig()
    name: ClassVar[str] = "rptq"
    needs_calibration: ClassVar[bool] = True
    preserves: ClassVar = ()

    def run(self, gm: GraphModule, ctx: Context) -> PassResult:
        cfg = self.config
        analysis = ctx.get(FoldGroups(), gm)
        sites = linear_sites(gm)
        keys = _keys(sites)
        key_of = dict(zip((s.node for s in sites), keys))
        chosen = select([k[0] for k in keys], cfg.targets, cfg.ignore, "rptq")
        todo = [s for s in sites if key_of[s.node][0] in chosen]
        stats = {"groups_reordered": 0, "clusters": 0, "linears_clustered": 0, "linears_per_tensor": 0,
                 "linears_float": 0}
        near = []
        if not todo:
            return PassResult(modified=False, stats=stats, near_misses=near)
        inputs = tuple(dict.fromkeys(s.input.name for s in todo))
        mm = ctx.get(Observed(inputs, _MakeMinMax(), who="rptq", desc="rptq: observing linear inputs"), gm)
        groups, done = [], set()
        for g in analysis.groups:
            mine = [c.site.node for c in g.consumers]
            if not all(key_of[n][0] in chosen for n in mine):
                if any(key_of[n][0] in chosen for n in mine):
                    near.append(f"{g.name}: not reordered, part of its group is excluded by targets/ignore")
                continue
            why = folding.permutation_reason(g)
            partner = _glu_partner(gm, g) if why else None
            if why and partner is None:
                near.append(f"{g.name}: not reordered ({why})")
                continue
            groups.append((g, partner))
            done.update(mine)
        qparams, perms = {}, []
        for g, partner in groups:           # decide on the unmodified graph (stats are of its channels)
            lo, hi = _producer_ranges(g, [mm[c.site.input.name] for c in g.consumers])
            consumed = g.consumed.nonzero().flatten()
            labels = torch.zeros(g.producer.channels, dtype=torch.long)
            labels[consumed] = kmeans(torch.stack([lo[consumed], hi[consumed]], 1), cfg.clusters, cfg.seed)
            blocks = [consumed] if partner is not None else folding.permutation_blocks(g)
            perm = cluster_order(lo, hi, labels, blocks)
            k = int(labels[consumed].max()) + 1
            cmin, cmax = cluster_ranges(lo[consumed], hi[consumed], labels[consumed])
            for c in g.consumers:
                qparams[c.site.node] = _cluster_qparams(cmin, cmax, labels[perm][c.channel_map], cfg.activations)
            perms.append({"consumers": [list(key_of[c.site.node]) for c in g.consumers], "perm": perm.tolist(),
                          "gather": g.producer.kind != "linear",
                          **({"glu": list(key_of[partner.node])} if partner is not None else {})})
            stats["groups_reordered"] += 1
            stats["clusters"] += k
            stats["linears_clustered"] += len(g.consumers)
        for s in todo:
            if s.node in done:
                continue
            st = mm[s.input.name]
            if cfg.unreordered == "clusters":
                labels = kmeans(torch.stack([st.min, st.max], 1), cfg.clusters, cfg.seed)
                qparams[s.node] = _cluster_qparams(*cluster_ranges(st.min, st.max, labels), labels, cfg.activations)
                stats["linears_clustered"] += 1
            elif cfg.unreordered == "per_tensor":
                spec = QSpec(cfg.activations.format, PerTensor(), cfg.activations.symmetric)
                qparams[s.node] = (spec, *qparams_from_minmax(st.min.min().float().reshape(1),
                                                              st.max.max().float().reshape(1), spec))
                stats["linears_per_tensor"] += 1
            else:
                stats["linears_float"] += 1
        near += [f"{key_of[s.node][0]}: {'not reordered; ' + cfg.unreordered if cfg.unreordered != 'float' else 'left float'}"
                 f" ({analysis.unfoldable.get(key_of[s.node][0], 'its group is not reordered')})"
                 for s in todo if s.node not in done]
        items = []
        for s in todo:
            if s.node not in qparams:
                continue
            spec, scale, zp = qparams[s.node]
            rank = s.input.meta["val"].dim()
            shape = [1] * (rank - 1) + [scale.numel()]
            items.append((QuantMeta("input", "", key_of[s.node][0], spec), spec.block_size(shape),
                          {"scale": scale.reshape(shape), "zero_point": None if zp is None else zp.reshape(shape)},
                          key_of[s.node][1]))
        plan = build(self.name, items, decisions={"permutations": perms, "clusters": cfg.clusters, "seed": cfg.seed})
        for rec in perms:
            _fold(gm, rec, ctx)
        Quantize.apply(gm, plan)
        return PassResult(modified=bool(items or perms), stats=stats, near_misses=near, plan=plan)

    @classmethod
    def apply(cls, gm: GraphModule, plan: Plan) -> None:
        """Add the channel gathers after the norms the plan reorders (found by their consumers' module paths and
        occurrences), then insert the recorded input quantizers. Reordered weights (consumer columns, a linear
        producer's rows) are values: the saved state dict holds them, so a linear producer needs no edit (nor
        does a decode capture, whose V cache then holds the reordered channels)."""
        for rec in plan.decisions.get("permutations", ()):
            if rec["gather"]:
                _fold(gm, rec)
        Quantize.apply(gm, plan)


def _fold(gm: GraphModule, rec: dict, ctx: Context | None = None) -> None:
    """Fold one recorded permutation at the group of its consumers (analysed again: gathers add nodes); with
    `ctx`, the group's weights are loaded meanwhile (weights on disk)."""
    want = tuple(tuple(k) for k in rec["consumers"])
    sites = linear_sites(gm)
    key_of = dict(zip((s.node for s in sites), _keys(sites)))
    group = next((g for g in folding.analyze(gm).groups
                  if tuple(key_of[c.site.node] for c in g.consumers) == want), None)
    if group is None:
        raise PlanError(f"the rptq plan reorders the inputs of {[k[0] for k in want]}, which this graph does not "
                        "group under one producer", fix="apply plans to a capture of the model they were made on")
    perm = torch.tensor(rec["perm"], dtype=torch.long)
    partner = _glu_partner(gm, group) if "glu" in rec else None
    names = [p.target for p, _ in group.producer.params]
    names += [n.target for c in group.consumers for n in (c.site.weight, c.site.bias) if n is not None]
    names += [n.target for n in (partner.weight, partner.bias) if n is not None] if partner is not None else []
    with ctx.loaded(names) if ctx is not None else contextlib.nullcontext():
        if partner is None:
            folding.fold_permutation(gm, group, perm)
        else:
            _fold_glu(gm, group, partner, perm)


def _glu_partner(gm: GraphModule, g: folding.FoldGroup) -> LinearSite | None:
    """The gate linear of a gated unit ``act(gate(x)) * up(x) -> down`` at the group up -> down (None: not one):
    reordering the rows of gate and up alike reorders the product's channels, which down's columns follow.
    Structure only: up and act(gate) are the product's two operands, each used by it alone, no other
    consumer."""
    if g.producer.kind != "linear" or len(g.consumers) != 1:
        return None
    c = g.consumers[0]
    prod, x = g.producer.node, c.site.input
    if not (x.op == "call_function" and x.target is aten.mul.Tensor and prod in x.args[:2] and
            len(prod.users) == 1 and torch.equal(c.channel_map, torch.arange(g.producer.channels))):
        return None
    act = x.args[1] if x.args[0] is prod else x.args[0]
    if not (isinstance(act, Node) and act.op == "call_function" and act.target in P.ACTIVATIONS and
            len(act.users) == 1):
        return None
    site = next((s for s in linear_sites(gm) if s.node is act.args[0]), None)
    if site is None or len(site.node.users) != 1 or site.node.meta["val"].shape[-1] != g.producer.channels:
        return None
    return site


def _fold_glu(gm: GraphModule, g: folding.FoldGroup, gate: LinearSite, perm: torch.Tensor) -> None:
    """Rows of gate and up (and biases) reordered by `perm`, down's input columns to match (values only)."""
    up = next(s for s in linear_sites(gm) if s.node is g.producer.node)
    with torch.no_grad():
        for site in (gate, up):
            for node, axis in ((site.weight, site.out_axis), (site.bias, 0)):
                if node is not None:
                    t = param_of(gm, node)
                    t.copy_(t.index_select(axis, perm.to(t.device)))
        down = g.consumers[0].site
        w = param_of(gm, down.weight)
        w.copy_(w.index_select(down.in_axis, perm.to(w.device)))


def _keys(sites) -> list[tuple[str, int]]:
    names = [s.path or s.node.name for s in sites]
    return list(zip(names, occurrences(names)))


def _producer_ranges(g: folding.FoldGroup, stats: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) per producer channel over every consumer column reading it (0 where none does)."""
    n = g.producer.channels
    lo = torch.full((n,), float("inf"), dtype=torch.float64)
    hi = torch.full((n,), float("-inf"), dtype=torch.float64)
    for c, st in zip(g.consumers, stats):
        lo.scatter_reduce_(0, c.channel_map, st.min, reduce="amin")
        hi.scatter_reduce_(0, c.channel_map, st.max, reduce="amax")
    used = g.consumed
    return torch.where(used, lo, 0.0), torch.where(used, hi, 0.0)


def _cluster_qparams(cmin: torch.Tensor, cmax: torch.Tensor, column_labels: torch.Tensor, spec: QSpec):
    """(per-channel spec, scale [columns], zero point [columns] or None): each column gets its cluster's."""
    out = QSpec(spec.format, PerChannel(-1), spec.symmetric)
    scale, zp = qparams_from_minmax(cmin.float(), cmax.float(), out)
    return out, scale[column_labels].contiguous(), None if zp is None else zp[column_labels].contiguous()


@dataclass(frozen=True)
class _MakeMinMax:
    def __call__(self, name, node) -> "MinMax":
        return MinMax()


class MinMax:
    """Per-channel (last axis) min and max over calibration, float64."""

    def __init__(self) -> None:
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1]).double()
        mn, mx = x2.amin(0), x2.amax(0)
        self.min = mn if self.min is None else torch.minimum(self.min, mn)
        self.max = mx if self.max is None else torch.maximum(self.max, mx)


__all__ = ["Rptq", "RptqConfig", "MinMax"]
