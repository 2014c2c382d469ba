"""Typed, cached analyses passes request with ``ctx.get(Key(...))`` and declare in ``Pass.preserves``.

Each analysis is a small frozen key; equal keys share one cached result, computed by ``key.compute(gm, ctx)``
on first use. The pipeline drops every cached result whose type the pass that just changed the graph does
not list in ``preserves``.

Structure (no data; valid while no node is added or removed):
  LinearSites()       tuple[LinearSite, ...]: every linear-like node (qpass.graph.linear_sites)
  AttentionSites()    tuple[AttentionSite, ...]: SDPA and eager attention (qpass.patterns.attention_sites)
  FoldGroups()        FoldingAnalysis: where per-channel scales fold (qpass.folding.analyze)
  ResidualStream()    tuple[Node, ...]: the residual adds of the hidden state (qpass.patterns.residual_stream)

Calibration statistics (``reads_weights``: a pass that changes weights never preserves them):
  Observed(nodes, make)  {node name: observer}: ``make(name, node)`` observers on the nodes named, one run of
                         the calibration data for all of them (``ctx.observe``: in memory or from disk)
  ActAbsMax(nodes)       {node name: max |x| per channel (last axis), float64}
  Hessians(nodes)        {node name: HessianAccumulator (X^T X over every calibration token)}

A structural analysis is still valid after a pass that only changes parameter values (SmoothQuant, AWQ,
GPTQ preserve all four); statistics are not, since activations depend on the weights upstream.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch.fx import GraphModule, Node

from . import folding, patterns
from .graph import linear_sites
from .pass_infra import Analysis, Context
from .primitives.gptq import HessianAccumulator


@dataclass(frozen=True)
class LinearSites(Analysis):
    def compute(self, gm: GraphModule, ctx: Context) -> tuple:
        return tuple(linear_sites(gm))


@dataclass(frozen=True)
class AttentionSites(Analysis):
    def compute(self, gm: GraphModule, ctx: Context) -> tuple:
        return tuple(patterns.attention_sites(gm))


@dataclass(frozen=True)
class FoldGroups(Analysis):
    def compute(self, gm: GraphModule, ctx: Context) -> folding.FoldingAnalysis:
        return folding.analyze(gm)


@dataclass(frozen=True)
class ResidualStream(Analysis):
    def compute(self, gm: GraphModule, ctx: Context) -> tuple:
        return tuple(patterns.residual_stream(gm))


STRUCTURE = (LinearSites, AttentionSites, FoldGroups, ResidualStream)   # what a weights-only pass preserves


@dataclass(frozen=True)
class Observed(Analysis):
    """Observers on graph nodes named `nodes`. `make(name, node)` makes each; it is part of the key, so it must
    compare by value (a frozen dataclass with ``__call__``, not a lambda) for equal requests to share a run."""

    nodes: tuple[str, ...]
    make: Callable[[str, Node], Any]
    who: str = field(default="calibration statistics", compare=False)     # named when data is missing
    desc: str = field(default="calibrating", compare=False)
    reads_weights: ClassVar[bool] = True

    def compute(self, gm: GraphModule, ctx: Context) -> dict[str, Any]:
        by_name = {n.name: n for n in gm.graph.nodes}
        missing = [k for k in self.nodes if k not in by_name]
        if missing:
            raise KeyError(f"no node named {missing[0]!r} in the graph")
        return ctx.observe(gm, {k: by_name[k] for k in self.nodes}, self.make, who=self.who, desc=self.desc)


class AbsMax:
    """Running max |x| per channel (last axis), in float64."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        am = x.detach().reshape(-1, x.shape[-1]).abs().amax(0).double()
        self.value = am if self.value is None else torch.maximum(self.value, am)


@dataclass(frozen=True)
class _Make:
    cls: type

    def __call__(self, name: str, node: Node):
        return self.cls()


@dataclass(frozen=True)
class ActAbsMax(Analysis):
    nodes: tuple[str, ...]
    reads_weights: ClassVar[bool] = True

    def compute(self, gm: GraphModule, ctx: Context) -> dict[str, torch.Tensor]:
        obs = ctx.get(Observed(self.nodes, _Make(AbsMax), who="activation absmax", desc="observing absmax"), gm)
        return {k: o.value for k, o in obs.items()}


@dataclass(frozen=True)
class Hessians(Analysis):
    nodes: tuple[str, ...]
    reads_weights: ClassVar[bool] = True

    def compute(self, gm: GraphModule, ctx: Context) -> dict[str, HessianAccumulator]:
        return ctx.get(Observed(self.nodes, _Make(HessianAccumulator), who="Hessians", desc="observing X^T X"), gm)


__all__ = ["Analysis", "LinearSites", "AttentionSites", "FoldGroups", "ResidualStream", "STRUCTURE", "Observed",
           "ActAbsMax", "Hessians", "AbsMax"]
