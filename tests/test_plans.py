"""Plans (qpass.plan): passes decide, record a plan, and apply it; loading applies plans and runs no pass.

Also the conformance test over every entry of PASSES: exact save/load, streams or refuses up front, no-op when
nothing matches, plan JSON round trip.
"""
import json
import os

import pytest
import torch
from torch import nn

import qpass
from qpass.errors import QpassError
from qpass.pass_infra import Pass, Pipeline
from qpass.passes import PASSES
from qpass.plan import Plan, PlanError, QuantizerPlan, apply_plans, plans_from_json, plans_to_json
from qpass.quantizer import quantizers
from tests import toy

CALIB = [toy.token_ids(seed=s) for s in range(3)]
W8 = {"bits": 8, "granularity": "per_channel", "symmetric": True}
A8 = {"bits": 8, "granularity": "per_token", "dynamic": True}
W4G = {"bits": 4, "granularity": "per_group", "group_size": 16, "symmetric": False}
QAT = {"samples": 4, "seq_len": 8, "steps": 1, "batch_size": 2, "lr": 1e-4, "cache_dir": None, "seed": 0}

# One minimal recipe per pass of PASSES (the pass under test is the last one); a new pass must add its row.
CONFORMANCE = {
    "quantize": [{"quantize": {"weights": W8, "activations": {**A8, "granularity": "per_tensor", "dynamic": False},
                               "ignore": ["lm_head"]}}],
    "smoothquant": [{"smoothquant": {"alpha": "search", "weights": W8, "activations": A8, "ignore": ["lm_head"]}},
                    {"quantize": {"weights": W8, "activations": A8, "ignore": ["lm_head"]}}],
    "kv_cache": [{"kv_cache": {"keys": {"bits": 4, "granularity": "per_head", "dynamic": False},
                               "values": {"bits": 4, "granularity": "per_token", "dynamic": True}}}],
    "gptq": [{"quantize": {"weights": W4G, "ignore": ["lm_head"]}}, {"gptq": {}}],
    "awq": [{"awq": {"weights": W4G}}, {"quantize": {"weights": W4G, "ignore": ["lm_head"]}}],
    "qat": [{"quantize": {"weights": W4G, "activations": A8, "ignore": ["lm_head"]}},
            {"qat": {**QAT, "learnable_scales": True}}],
    "lora": [{"quantize": {"weights": W4G, "ignore": ["lm_head"]}}, {"lora": {"rank": 2}},
             {"qat": {**QAT, "trainable": "lora", "held_out": 0}}],
    "lora_merge": [{"quantize": {"weights": W4G, "ignore": ["lm_head"]}}, {"lora": {"rank": 2}},
                   {"qat": {**QAT, "trainable": "lora", "held_out": 0, "lr": 1e-2}}, {"lora_merge": {}}],
    "owq": [{"owq": {"weights": W4G, "columns": 2, "method": "gptq", "ignore": ["lm_head"]}}],
    "llm_int8": [{"llm_int8": {"threshold": 0.5, "ignore": ["lm_head"]}}],       # low: the toy has outliers
    "os_plus": [{"os_plus": {"weights": W8, "activations": A8, "ignore": ["lm_head"]}},     # adds biases
                {"quantize": {"weights": W8, "activations": A8, "ignore": ["lm_head"]}}],
    "rotate": [{"rotate": {"seed": 1, "online": True, "heads": True}},                  # adds hadamard nodes
               {"quantize": {"weights": W8, "activations": A8, "ignore": ["lm_head"]}}],
    "spinquant": [{"rotate": {"seed": 1}}, {"quantize": {"weights": W8, "activations": A8, "ignore": ["lm_head"]}},
                  {"spinquant": {"steps": 2, "batch_size": 2}}],                  # learned rotation baked in
    "quip": [{"quip": {"seed": 1}}, {"quantize": {"weights": W4G, "ignore": ["lm_head"]}}, {"gptq": {}}],
    "quantease": [{"quantize": {"weights": W4G, "ignore": ["lm_head"]}},        # outliers: a side channel
                  {"quantease": {"iterations": 2, "outliers": 0.01}}],
    "spqr": [{"quantize": {"weights": W4G, "ignore": ["lm_head"]}},             # scale_q + outliers side channels
             {"spqr": {"target_bits": 5.5, "search_steps": 3}}],
    "lorc": [{"quantize": {"weights": W4G, "ignore": ["lm_head"]}}, {"lorc": {"rank": 2}}],
    "signround": [{"quantize": {"weights": W4G, "ignore": ["lm_head"]}}, {"signround": {"steps": 3, "batch_size": 2}}],
    "omniquant": [{"quantize": {"weights": W4G, "activations": A8, "ignore": ["lm_head"]}},        # LET: adds biases
                  {"omniquant": {"steps": 3, "batch_size": 2}}],
    "zeroquant": [{"quantize": {"weights": W4G, "activations": A8, "ignore": ["lm_head"]}},
                  {"zeroquant": {"steps": 3, "batch_size": 2, "lr": 1e-3}}],
    "norm_tweak": [{"quantize": {"weights": W4G, "ignore": ["lm_head"]}},
                   {"norm_tweak": {"steps": 3, "batch_size": 2, "samples": 3, "seq_len": 8}}],
    "squeezellm": [{"squeezellm": {"bits": 3, "outliers": 0.01, "sensitive": 0.01, "iters": 5,   # sparse values
                                   "ignore": ["lm_head"]}}],
    "bcq": [{"bcq": {"bits": 3, "group_size": 16, "iterations": 2, "ignore": ["lm_head"]}}],   # per-group codebooks
    "rptq": [{"rptq": {"clusters": 4, "ignore": ["lm_head"]}},                           # adds gathers
             {"quantize": {"weights": W8, "ignore": ["lm_head"]}}],
    "fptq": [{"fptq": {"v0": 0.5, "v1": 1e9, "weights": W4G, "ignore": ["lm_head"]}}, {"gptq": {}}],   # LAE folded
    "mofq": [{"mofq": {"weights": W4G, "activations": {**A8, "granularity": "per_tensor", "dynamic": False},
                       "ignore": ["lm_head"]}}],          # per-layer formats, static scales
    "olive": [{"olive": {"weights": {"bits": 4}, "activations": {"bits": 8, "granularity": "per_tensor"},
                         "ignore": ["lm_head"]}}],                                # registered format olive4/8
}


def test_every_pass_has_a_conformance_recipe():
    assert set(CONFORMANCE) == set(PASSES), "add a minimal recipe for the new pass to CONFORMANCE"
    for name, passes in CONFORMANCE.items():
        assert name in passes[-1] or any(name in p for p in passes)


@pytest.fixture(scope="module")
def model():
    return toy.hf_model("llama")


def _never_run(monkeypatch):
    """Make any pass run (or pipeline) during the with-block fail the test."""
    def boom(*a, **k):
        raise AssertionError("a pass ran while loading")
    for _, cls in PASSES.values():
        monkeypatch.setattr(cls, "run", boom)
    monkeypatch.setattr(Pipeline, "run", boom)


@pytest.mark.parametrize("name", sorted(CONFORMANCE))
def test_conformance_save_load_is_exact_runs_no_pass_and_plans_round_trip(name, model, tmp_path, monkeypatch):
    qm = qpass.apply(model, {"passes": CONFORMANCE[name]}, calib_data=CALIB, progress=False)
    plans = qm.plans
    assert [p.pass_name for p in plans] == [next(iter(c)) for c in CONFORMANCE[name]]
    data = json.loads(json.dumps(plans_to_json(plans)))            # plain JSON
    assert plans_from_json(data, "test") == list(plans)             # round trip (values are not part of equality)
    qm.save(tmp_path / "m")
    ids = toy.token_ids(batch=2, t=9, seed=11)
    with monkeypatch.context() as m:
        _never_run(m)
        loaded = qpass.load(tmp_path / "m")
    assert torch.equal(loaded(ids).logits, qm(ids).logits)
    assert [q.meta for q in quantizers(loaded.graph_module)] == [q.meta for q in quantizers(qm.graph_module)]


@pytest.mark.parametrize("name", sorted(CONFORMANCE))
def test_conformance_streams_or_refuses_up_front(name, tmp_path):
    src = toy.save_hf_dir(tmp_path / "src", "llama")
    recipe = {"passes": CONFORMANCE[name]}
    refusal = [PASSES[next(iter(c))][1](qpass.Recipe.from_dict({"passes": [c]}).passes[0]).streaming_refusal()
               for c in CONFORMANCE[name]]
    if any(refusal):
        with pytest.raises(qpass.RecipeError, match="in memory") as e:
            qpass.apply_from_disk(src, recipe, tmp_path / "out", calib_data=CALIB, progress=False)
        assert not os.path.exists(tmp_path / "out"), e.value
        return
    res = qpass.apply_from_disk(src, recipe, tmp_path / "out", calib_data=CALIB, progress=False)
    in_memory = qpass.apply(toy.hf_model("llama"), recipe, calib_data=CALIB, progress=False)
    ids = toy.token_ids(batch=1, t=6, seed=2)
    assert torch.allclose(qpass.load(res.directory)(ids).logits, in_memory(ids).logits, atol=1e-4)


class _NoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.g = nn.Parameter(torch.ones(8))

    def forward(self, x):
        return torch.relu(x) * self.g


@pytest.mark.parametrize("name", sorted(CONFORMANCE))
def test_conformance_nothing_to_match_is_a_no_op_or_a_clear_error(name):
    """On a graph with no linear and no attention every pass changes nothing (or says why it cannot run)."""
    x = torch.randn(2, 8)
    gm = qpass.capture(_NoLinears(), (x,))
    before = [n.format_node() for n in gm.graph.nodes]
    config = qpass.Recipe.from_dict({"passes": [CONFORMANCE[name][-1] if name in CONFORMANCE[name][-1]
                                                else next(c for c in CONFORMANCE[name] if name in c)]})
    try:
        qm = qpass.apply(gm, config, calib_data=[(x,)], progress=False)
    except QpassError as e:              # e.g. qat: nothing to train; the error says what and how to fix
        assert f"passes[0].{name}" in str(e), e
        return
    assert [n.format_node() for n in qm.graph_module.graph.nodes] == before
    assert not any(p.structural for p in qm.plans)


def test_a_searched_alpha_loads_without_calibration_data_and_without_running_a_pass(model, tmp_path, monkeypatch):
    qm = qpass.apply(model, "recipes/w8a8_smoothquant_search.yaml", calib_data=CALIB, progress=False)
    alphas = qm.plans[0].decisions["alphas"]
    assert alphas and alphas == qm.report["smoothquant"].stats["alphas"]
    qm.save(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "plans.json").read_text())
    assert saved[0]["pass"] == "smoothquant" and saved[0]["decisions"]["alphas"] == alphas
    with monkeypatch.context() as m:
        _never_run(m)
        loaded = qpass.load(tmp_path / "m")
        ids = toy.token_ids(batch=2, t=12, seed=5)
        assert torch.equal(loaded(ids).logits, qm(ids).logits)
        assert loaded.plans == qm.plans
        dec = loaded.decode_graph(max_cache_len=32)        # decode graph: plans applied, no pass
    assert dec is not None


def test_a_plan_applies_to_a_fresh_capture_with_the_same_structure(model):
    qm = qpass.apply(model, "recipes/w8a8_kv4.yaml", calib_data=CALIB, progress=False)
    gm = qpass.capture(toy.hf_model("llama"))
    apply_plans(gm, qm.plans)
    assert [(q.role, q.path, q.block, q.fmt_name, q.dynamic) for q in quantizers(gm)] == \
        [(q.role, q.path, q.block, q.fmt_name, q.dynamic) for q in quantizers(qm.graph_module)]
    want = {k: v.shape for k, v in qm.graph_module.state_dict().items()}
    assert {k: v.shape for k, v in gm.state_dict().items()} == want
    gm.load_state_dict(qm.graph_module.state_dict())
    ids = toy.token_ids(batch=1, t=8, seed=4)
    assert torch.equal(gm(ids).logits, qm(ids).logits)


def test_shared_static_scales_stay_one_tensor(model):
    qm = qpass.apply(model, "recipes/w8a8_static.yaml", calib_data=CALIB, progress=False)
    plan = qm.plans[-1]
    shared = [t for q in plan.quantizers for t in q.tensors.values() if t.same_as is not None]
    assert shared, "q/k/v read one input: their static input scales are one tensor"
    gm = qpass.capture(toy.hf_model("llama"))
    apply_plans(gm, qm.plans)
    sd = gm.state_dict()
    names = [f"model_layers_0_self_attn_{p}_proj_input_scale" for p in "qkv"]
    assert all(n in sd for n in names)
    assert sd[names[0]].data_ptr() == sd[names[1]].data_ptr() == sd[names[2]].data_ptr()


def test_a_plan_that_does_not_fit_the_graph_is_a_clear_error(model):
    qm = qpass.apply(model, "recipes/w8a16.yaml", progress=False)
    other = qpass.capture(toy.hf_model("opt"))
    with pytest.raises(PlanError, match=r"(?s)plans\[0\] \(quantize\).*model\.layers\.0\.self_attn\.q_proj.*fix"):
        apply_plans(other, qm.plans)
    with pytest.raises(PlanError, match="version"):
        Plan.from_dict({"pass": "quantize", "version": 99})
    with pytest.raises(PlanError, match="does not parse"):
        Plan.from_dict({"pass": "quantize", "version": 1, "quantizers": [{"meta": {}}]})
    with pytest.raises(qpass.ArtifactError, match="names the pass 'nope'"):
        apply_plans(other, [Plan("nope")])


def test_a_pass_that_changes_the_graph_without_a_plan_is_refused():
    from dataclasses import dataclass
    from typing import ClassVar

    from qpass.pass_infra import Context, PassResult

    @dataclass(frozen=True)
    class Sloppy(Pass):
        name: ClassVar[str] = "sloppy"

        def run(self, gm, ctx):
            return PassResult(modified=True)

    gm = qpass.capture(_NoLinears(), (torch.randn(2, 8),))
    with pytest.raises(PlanError, match="recorded no plan"):
        Pipeline([Sloppy()]).run(gm, Context(None, progress=False))


def test_plan_json_is_written_sealed_and_an_edit_is_refused(model, tmp_path):
    qm = qpass.apply(model, "recipes/w8a16.yaml", progress=False)
    qm.save(tmp_path / "m")
    path = tmp_path / "m" / "plans.json"
    meta = json.loads((tmp_path / "m" / "qpass.json").read_text())
    assert "plans.json" in meta["files"]
    data = json.loads(path.read_text())
    assert isinstance(QuantizerPlan.from_dict(data[0]["quantizers"][0]), QuantizerPlan)
    data[0]["quantizers"][0]["meta"]["spec"]["format"] = "int4"
    path.write_text(json.dumps(data))
    with pytest.raises(qpass.ArtifactError, match="plans.json"):
        qpass.load(tmp_path / "m")
