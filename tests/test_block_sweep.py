import pytest
import torch

import qpass
from qpass import IntFormat, PerGroup, QSpec, Recipe
from qpass.calibration import CalibrationSet, observe
from qpass.graph import linear_sites, param_of
from qpass.passes import AwqConfig, GptqConfig, QuantizeConfig
from qpass.primitives.gptq import HessianAccumulator
from qpass.block_sweep import Sweep, find_blocks, observe_by_block
from tests import toy

W4G8 = QSpec(IntFormat(4), PerGroup(8))


@pytest.fixture(scope="module")
def graphs():
    return {f: toy.captured(f)[1] for f in ("llama", "opt", "gpt2")}


def calib(n=3, t=9):
    return CalibrationSet([toy.token_ids(batch=1, t=t, seed=s) for s in range(n)])


class Stats(HessianAccumulator):
    def update(self, x):
        super().update(x)
        self.absmax = x.abs().amax(dim=tuple(range(x.dim() - 1)))


@pytest.mark.parametrize("family,prefix", [("llama", "model.layers"), ("opt", "model.decoder.layers"),
                                           ("gpt2", "transformer.h")])
def test_blocks_are_found_from_module_paths(graphs, family, prefix):
    blocks = find_blocks(graphs[family])
    assert [b.path for b in blocks] == [f"{prefix}.0", f"{prefix}.1"]
    sweep = Sweep(graphs[family], calib())
    assert sweep.names == ["stem", f"{prefix}.0", f"{prefix}.1", "tail"]


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_block_by_block_statistics_equal_whole_model_calibration(graphs, family):
    gm, data = graphs[family], calib()
    inputs = {s.input.name: s.input for s in linear_sites(gm)}
    whole = observe(gm, inputs, lambda k, n: Stats(), data, progress=False)
    seq, steps = {}, []
    for step in Sweep(gm, data, progress=False):
        mine = {k: n for k, n in inputs.items() if step.contains(n)}
        steps.append((step.name, len(mine)))
        if mine:
            seq.update(step.observe(mine, lambda k, n: Stats()))
    assert seq.keys() == whole.keys()
    for k in whole:
        assert torch.equal(seq[k].xtx, whole[k].xtx) and torch.equal(seq[k].absmax, whole[k].absmax), k
    assert steps[1][1] == steps[2][1] > 0 and steps[-1] == ("tail", 1)   # one block at a time; lm_head last


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_observe_by_block_equals_observe_on_a_quantized_graph(graphs, family):
    gm = qpass.apply(graphs[family], Recipe([QuantizeConfig(weights=W4G8)])).graph_module   # the graph as it is
    data = calib()
    inputs = {s.input.name: s.input for s in linear_sites(gm)}
    whole = observe(gm, inputs, lambda k, n: Stats(), data, progress=False)
    seq = observe_by_block(gm, inputs, lambda k, n: Stats(), data, progress=False)
    assert list(seq) == list(whole)
    assert all(torch.equal(seq[k].xtx, whole[k].xtx) and torch.equal(seq[k].absmax, whole[k].absmax) for k in whole)


def test_sequential_gptq_with_float_inputs_equals_whole_model_gptq(graphs):
    gm, data = graphs["llama"], [toy.token_ids(batch=1, t=9, seed=s) for s in range(3)]
    q = QuantizeConfig(weights=W4G8, ignore=("lm_head",))
    a = qpass.apply(gm, Recipe([q, GptqConfig(sequential=False)]), calib_data=data, progress=False)
    b = qpass.apply(gm, Recipe([q, GptqConfig(feed="float")]), calib_data=data, progress=False)
    sa, sb = a.graph_module.state_dict(), b.graph_module.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.report["gptq"].stats["errors"] == b.report["gptq"].stats["errors"]


def test_quantized_feed_reaches_the_next_block_only(graphs):
    rtn = qpass.apply(graphs["llama"], Recipe([QuantizeConfig(weights=QSpec(IntFormat(2), PerGroup(8)))]))
    gm, data = rtn.graph_module, calib()
    sites = [s for s in linear_sites(gm) if s.path.endswith("q_proj")]
    got = {}
    for feed in ("float", "quantized"):
        for step in Sweep(gm, data, feed=feed, progress=False):
            mine = {s.path: s.input for s in sites if step.contains(s.node)}
            if mine:
                got.update({(feed, k): v for k, v in step.observe(mine, lambda k, n: Stats()).items()})
    l0, l1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"
    assert torch.equal(got["float", l0].xtx, got["quantized", l0].xtx)         # same embeddings
    assert not torch.allclose(got["float", l1].xtx, got["quantized", l1].xtx)  # block 0 ran quantized


def test_only_boundary_values_are_carried(graphs):
    data = calib(n=4, t=9)
    sweep = Sweep(graphs["llama"], data, progress=False)
    for step in sweep:
        pass
    stem, block0, block1 = sweep.carried_bytes
    hidden = 4 * 9 * 32 * 4             # samples * tokens * hidden * fp32
    assert stem == block0 < 2 * hidden  # hidden states + rotary tables + mask, the same after every block
    assert block1 == hidden             # the tail needs the hidden states only


def test_graph_without_blocks_is_one_segment():
    m, x = toy.TinyMLP(), toy.mlp_input()
    gm = qpass.capture(m, (x,))
    sweep = Sweep(gm, CalibrationSet([(x,)]), progress=False)
    assert sweep.names == ["graph"] and find_blocks(gm) == []
    for step in sweep:
        obs = step.observe({"fc2": linear_sites(gm)[1].input}, lambda k, n: Stats())
    ref = torch.relu(x @ m.fc1.weight.T + m.fc1.bias).double()
    torch.testing.assert_close(obs["fc2"].xtx, ref.T @ ref)


def test_parameters_changed_between_steps_are_seen(graphs):
    gm = qpass.apply(graphs["llama"], Recipe([])).graph_module
    data, seen = calib(), []
    sites = {s.path: s for s in linear_sites(gm)}
    for step in Sweep(gm, data, progress=False):
        if step.name == "model.layers.0":
            param_of(gm, sites["model.layers.0.mlp.down_proj"].weight).data.zero_()   # block 0 adds nothing
        if step.name == "model.layers.1":
            q = sites["model.layers.1.self_attn.q_proj"]
            seen = step.observe({"x": q.input}, lambda k, n: Stats())
    ref = observe(gm, {"x": sites["model.layers.1.self_attn.q_proj"].input}, lambda k, n: Stats(), data,
                  progress=False)
    assert torch.equal(seen["x"].xtx, ref["x"].xtx)


def test_sequential_awq_equals_whole_model_awq(graphs):
    gm, data = graphs["llama"], [toy.token_ids(batch=1, t=9, seed=s) for s in range(3)]
    rec = lambda seq: Recipe([AwqConfig(sequential=seq), QuantizeConfig(weights=W4G8, ignore=("lm_head",))])
    a = qpass.apply(gm, rec(False), calib_data=data, progress=False)
    b = qpass.apply(gm, rec(True), calib_data=data, progress=False)
    sa, sb = a.graph_module.state_dict(), b.graph_module.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and a.report["awq"].stats == b.report["awq"].stats
