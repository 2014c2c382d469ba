"""Typed analyses: cached by key in the Context, dropped after a pass unless it declares them preserved."""
import copy
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import qpass
from qpass import patterns as P
from qpass.analyses import (STRUCTURE, ActAbsMax, AttentionSites, FoldGroups, Hessians, LinearSites, Observed,
                            ResidualStream)
from qpass.calibration import CalibrationSet, observe
from qpass.folding import analyze
from qpass.graph import linear_sites
from qpass.plan import Plan
from qpass.pass_infra import Context, Pass, PassResult, Pipeline
from qpass.passes import PASSES, Gptq, GptqConfig, Quantize, QuantizeConfig, SmoothQuant, SmoothQuantConfig
from qpass.primitives.gptq import HessianAccumulator
from tests import toy


def decoder():
    x = toy.seq_input()
    return qpass.capture(toy.TinyDecoderLayer(), (x,)), x


def inputs_of(gm) -> tuple[str, ...]:
    return tuple(dict.fromkeys(s.input.name for s in linear_sites(gm)))


@dataclass(frozen=True)
class Probe(Pass):
    """Asks for a structural and a statistics analysis, then reports `modified`."""

    modified: bool = True
    name: ClassVar[str] = "probe"

    def run(self, gm, ctx):
        ctx.get(LinearSites(), gm)
        ctx.get(ActAbsMax(inputs_of(gm)), gm)
        return PassResult(modified=self.modified, plan=Plan(self.name))   # says it changed values only


@dataclass(frozen=True)
class StructureProbe(Probe):
    name: ClassVar[str] = "structure_probe"
    preserves: ClassVar = (LinearSites,)


def run(passes, gm, x) -> Context:
    ctx = Context(CalibrationSet([(x,)]), progress=False)
    Pipeline(passes).run(gm, ctx)
    return ctx


# ------------------------------------------------------------------------------------------- caching


def test_get_computes_once_per_key():
    gm, x = decoder()
    ctx = Context(CalibrationSet([(x,)]), progress=False)
    a = ctx.get(LinearSites(), gm)
    assert ctx.get(LinearSites(), gm) is a and ctx.computed[LinearSites] == 1
    assert [s.node for s in a] == [s.node for s in linear_sites(gm)] and isinstance(a, tuple)
    names = inputs_of(gm)
    h = ctx.get(Hessians(names), gm)
    am = ctx.get(ActAbsMax(names), gm)
    assert ctx.get(ActAbsMax(tuple(names)), gm) is am                  # equal keys share one result
    assert ctx.computed[Observed] == 2 and ctx.computed[ActAbsMax] == 1
    ctx.get(Observed(names, _Rows()), gm)
    assert ctx.computed[Observed] == 3                                 # another observer: another run


@dataclass(frozen=True)
class _Rows:
    def __call__(self, name, node):
        return HessianAccumulator()


class _Values:
    def __init__(self):
        self.x = None

    def update(self, x):
        self.x = x.detach().clone()


def test_statistics_equal_a_direct_computation():
    gm, x = decoder()
    ctx = Context(CalibrationSet([(x,)]), progress=False)
    names = inputs_of(gm)
    am, h = ctx.get(ActAbsMax(names), gm), ctx.get(Hessians(names), gm)
    for site in linear_sites(gm):
        (v,) = observe(gm, {0: site.input}, lambda k, n: _Values(), CalibrationSet([(x,)]), progress=False).values()
        rows = v.x.reshape(-1, v.x.shape[-1]).double()
        torch.testing.assert_close(am[site.input.name], rows.abs().amax(0))
        torch.testing.assert_close(h[site.input.name].xtx, rows.t() @ rows, rtol=1e-5, atol=1e-5)   # float32 products


def test_structural_analyses_match_their_functions():
    gm = toy.captured("llama")[1]
    ctx = Context()
    assert [s.node for s in ctx.get(AttentionSites(), gm)] == [s.node for s in P.attention_sites(gm)]
    assert ctx.get(FoldGroups(), gm).lines() == analyze(gm).lines()
    assert list(ctx.get(ResidualStream(), gm)) == P.residual_stream(gm)


def test_a_new_graph_starts_an_empty_cache():
    (gm, _), (other, _) = decoder(), decoder()
    ctx = Context()
    ctx.get(LinearSites(), gm)
    ctx.get(LinearSites(), other)
    assert ctx.computed[LinearSites] == 2
    with pytest.raises(TypeError, match="Analysis"):
        ctx.get(("act_observers", 1), gm)
    with pytest.raises(ValueError, match="needs the graph"):
        Context().get(LinearSites())


def test_observed_without_calibration_names_the_caller():
    gm, _ = decoder()
    with pytest.raises(qpass.CalibrationError, match="quantize with static"):
        Context().get(Observed(inputs_of(gm), _Rows(), who="quantize with static activations"), gm)


# -------------------------------------------------------------------------------------- invalidation


def test_a_pass_that_does_not_preserve_an_analysis_causes_a_recompute():
    gm, x = decoder()
    ctx = run([Probe(), Probe()], gm, x)
    assert ctx.computed[LinearSites] == 2 and ctx.computed[ActAbsMax] == 2


def test_a_pass_that_preserves_an_analysis_keeps_it():
    gm, x = decoder()
    ctx = run([StructureProbe(), StructureProbe()], gm, x)
    assert ctx.computed[LinearSites] == 1             # preserved
    assert ctx.computed[ActAbsMax] == 2               # statistics are not


def test_a_pass_that_changes_nothing_invalidates_nothing():
    gm, x = decoder()
    ctx = run([Probe(modified=False), Probe()], gm, x)
    assert ctx.computed[LinearSites] == 1 and ctx.computed[ActAbsMax] == 1


def test_weight_changing_passes_cannot_preserve_statistics():
    with pytest.raises(TypeError, match="cannot preserve ActAbsMax"):
        class Bad(Pass):
            name = "bad"
            preserves = (ActAbsMax,)

            def run(self, gm, ctx): ...

    class ObserveOnly(Pass):          # a pass that changes no weight may keep statistics
        name = "observe_only"
        changes_weights = False
        preserves = (ActAbsMax, LinearSites)

        def run(self, gm, ctx): ...

    with pytest.raises(TypeError, match="Analysis types"):
        class Strings(Pass):
            name = "strings"
            preserves = ("act_observers",)

            def run(self, gm, ctx): ...


def test_every_pass_declares_analysis_types():
    for name, (_, cls) in PASSES.items():
        assert all(isinstance(a, type) for a in cls.preserves), name
        assert not (cls.changes_weights and any(a.reads_weights for a in cls.preserves)), name
    for cls in (SmoothQuant, Gptq):
        assert cls.preserves == STRUCTURE
    assert Quantize.preserves == ()                   # adds quantizer nodes: nothing survives


def test_real_passes_reuse_and_drop_what_they_declare():
    model, gm = toy.captured("llama")
    ids = toy.token_ids()
    cfg = SmoothQuantConfig(alpha=0.5)
    ctx = run([SmoothQuant(cfg), SmoothQuant(cfg)], copy.deepcopy(gm), ids)
    assert ctx.computed[FoldGroups] == 1              # smoothquant rescales weights only: groups stay valid
    assert ctx.computed[Observed] == 2                # the second one observes the smoothed model again
    w4 = QuantizeConfig(weights=qpass.QSpec(qpass.IntFormat(4), qpass.PerChannel(0)))
    ctx = run([Quantize(w4), Gptq(GptqConfig(sequential=False))], copy.deepcopy(gm), ids)
    assert ctx.computed[LinearSites] == 2             # quantize inserted quantizers: the sites changed
