"""os_plus (Outlier Suppression+): shift + scale folded into producers and consumers, function-preserving, plans."""
import pytest
import torch
from torch import nn

import qpass
from qpass.calibration import CalibrationSet, observe
from qpass.errors import CalibrationError, TargetNotFoundError
from qpass.folding import analyze
from qpass.passes.os_plus import ChannelStats, outlier_scales, threshold_grid
from qpass.plan import PlanError, apply_plans
from tests import toy

CALIB = [toy.token_ids(seed=s, t=16) for s in range(3)]
W4 = {"bits": 4, "granularity": "per_channel", "symmetric": True}
A4_STATIC = {"bits": 4, "granularity": "per_tensor", "symmetric": True}
A8 = {"bits": 8, "granularity": "per_token", "dynamic": True}
OSP = {"os_plus": {"weights": W4, "activations": A4_STATIC, "ignore": ["lm_head"]}}


def recipe(**opts):
    return {"passes": [{"os_plus": {"weights": W4, "activations": A4_STATIC, "ignore": ["lm_head"], **opts}}]}


@pytest.fixture(scope="module")
def llama():
    model = toy.hf_model("llama")
    return model, qpass.apply(model, recipe(), calib_data=CALIB, progress=False)


@pytest.mark.parametrize("family, biases", [("llama", 16), ("opt", 0)])
def test_fires_and_keeps_outputs(family, biases):
    model = toy.hf_model(family)
    ids = toy.token_ids(batch=2, t=9, seed=11)
    ref = model(ids).logits
    qm = qpass.apply(model, recipe(), calib_data=CALIB, progress=False)
    stats = qm.report["os_plus"].stats
    # llama: per layer norm -> q/k/v (shift), v -> o (shift), norm -> gate/up (shift), up -> down (scale only)
    # opt: per layer ln -> q/k/v, v -> out_proj, ln -> fc1 (shifts), fc1 -> relu -> fc2 (scale only)
    assert stats["groups_shifted"] == 6 and stats["biases_added"] == biases
    assert stats["groups_shifted"] + stats["groups_scaled"] + stats["groups_unchanged"] >= 8
    assert any("no shift" in m for m in qm.report["os_plus"].near_misses)
    torch.testing.assert_close(qm(ids).logits, ref, rtol=1e-4, atol=1e-5)


def test_shifted_channels_are_centred_and_scaled_channels_shrink(llama):
    model, qm = llama
    gm = qm.graph_module
    group = next(g for g in analyze(gm).groups if g.name == "model.layers.0.input_layernorm")
    name = group.consumers[0].site.input.name
    after = observe(gm, {name: group.consumers[0].site.input}, lambda *_: ChannelStats(0), CalibrationSet(CALIB),
                    progress=False)[name]
    assert float((after.max + after.min).abs().max()) < 1e-4 * float(after.max.abs().max())    # (max + min) ~ 0
    before = qpass.capture(toy.hf_model("llama"))
    g0 = next(g for g in analyze(before).groups if g.name == "model.layers.0.input_layernorm")
    n0 = g0.consumers[0].site.input.name
    orig = observe(before, {n0: g0.consumers[0].site.input}, lambda *_: ChannelStats(0), CalibrationSet(CALIB),
                   progress=False)[n0]
    assert float((after.max - after.min).max()) <= float((orig.max - orig.min).max()) * (1 + 1e-5)


def test_it_lowers_error_drops_and_the_plan_reloads_exactly(llama, tmp_path, monkeypatch):
    model, qm = llama
    quant = {"quantize": {"weights": W4, "activations": A4_STATIC, "ignore": ["lm_head"]}}
    rtn = qpass.apply(toy.hf_model("llama"), {"passes": [quant]}, calib_data=CALIB, progress=False)
    osp = qpass.apply(toy.hf_model("llama"), {"passes": [OSP, quant]}, calib_data=CALIB, progress=False)
    ids = toy.token_ids(batch=2, t=12, seed=5)
    ref = toy.hf_model("llama")(ids).logits
    assert float((osp(ids).logits - ref).pow(2).mean()) < float((rtn(ids).logits - ref).pow(2).mean())
    pm = qpass.lower(osp, "torch", kernels="exact")
    torch.testing.assert_close(pm(ids).logits, osp(ids).logits, rtol=1e-5, atol=1e-5)
    prompt = toy.token_ids(1, 5)
    assert torch.equal(pm.generate(prompt, max_new_tokens=4), osp.generate(prompt, max_new_tokens=4))
    osp.save(tmp_path / "m")
    from tests.test_plans import _never_run
    with monkeypatch.context() as m:
        _never_run(m)
        loaded = qpass.load(tmp_path / "m")
        assert torch.equal(loaded(ids).logits, osp(ids).logits)
        assert loaded.decode_graph(max_cache_len=32) is not None      # the edits apply to the decode capture too


def test_onnx_lowers_with_parity(llama, tmp_path):
    pytest.importorskip("onnxruntime")
    from qpass.backends import onnx_qdq

    qm = qpass.apply(toy.hf_model("llama"), "recipes/os_plus_w8a8.yaml", calib_data=CALIB, progress=False)
    qpass.lower(qm, "onnx", tmp_path / "m")
    ids = toy.token_ids(batch=1, t=9, seed=4)
    got = onnx_qdq.logits(onnx_qdq.session(str(tmp_path / "m")), ids)
    # per-token activation rounding flips a few codes at half-way points (docs/onnx.md): not bit-exact
    torch.testing.assert_close(got.float(), qm(ids).logits.float(), rtol=0, atol=5e-3)


def test_w6a6_static_lowers_to_onnx_with_parity(tmp_path):
    """Static int6 inputs: INT8 Q, Clip to [-32, 31], DQ (docs/onnx.md); level 0: exact int6 weight MatMulNBits."""
    pytest.importorskip("onnxruntime")
    from qpass.backends import onnx_qdq

    qm = qpass.apply(toy.hf_model("opt"), "recipes/os_plus_w6a6_static.yaml", calib_data=CALIB, progress=False)
    qpass.lower(qm, "onnx", tmp_path / "m", fused_accuracy_level=0)
    ids = toy.token_ids(batch=1, t=9, seed=4)
    got = onnx_qdq.logits(onnx_qdq.session(str(tmp_path / "m")), ids)
    torch.testing.assert_close(got.float(), qm(ids).logits.float(), rtol=0, atol=1e-5)


def test_plan_applies_to_a_fresh_capture_with_zero_placeholders(llama):
    model, qm = llama
    plan = qm.plans[0]
    assert plan.decisions["edits"] and all(e[0] in ("linear", "norm") for e in plan.decisions["edits"])
    gm = qpass.capture(toy.hf_model("llama"))
    ids = toy.token_ids(batch=1, t=8, seed=4)
    ref = gm(ids).logits
    apply_plans(gm, qm.plans)                       # zero biases: the function is unchanged
    torch.testing.assert_close(gm(ids).logits, ref, rtol=0, atol=0)
    assert gm.state_dict().keys() == qm.graph_module.state_dict().keys()
    gm.load_state_dict(qm.graph_module.state_dict())
    assert torch.equal(gm(ids).logits, qm(ids).logits)
    with pytest.raises(PlanError, match="already has a bias"):
        apply_plans(gm, qm.plans)                   # applied twice
    with pytest.raises(PlanError, match="does not have it"):
        apply_plans(qpass.capture(toy.hf_model("opt")), qm.plans)


def test_shift_only_and_scale_only():
    model = toy.hf_model("llama")
    ids = toy.token_ids(batch=2, t=9, seed=11)
    ref = model(ids).logits
    shift = qpass.apply(model, recipe(scale=False), calib_data=CALIB, progress=False)
    assert shift.report["os_plus"].stats["groups_scaled"] == 0
    assert all(d["t"] is None for d in shift.plans[0].decisions["groups"].values())
    scale = qpass.apply(toy.hf_model("llama"), recipe(shift=False), calib_data=CALIB, progress=False)
    st = scale.report["os_plus"].stats
    assert st["groups_shifted"] == 0 and st["biases_added"] == 0 and st["groups_scaled"] > 0
    torch.testing.assert_close(shift(ids).logits, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scale(ids).logits, ref, rtol=1e-4, atol=1e-5)


class _Direct(nn.Module):
    """Linears that read the graph input: no producer to fold into."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_nothing_to_fold_is_a_no_op_that_says_why():
    x = torch.randn(2, 3, 8)
    gm = qpass.capture(_Direct(), (x,))
    before = [n.format_node() for n in gm.graph.nodes]
    qm = qpass.apply(gm, recipe(ignore=[]), calib_data=[(x,)], progress=False)
    row = qm.report["os_plus"]
    assert row.stats["groups_shifted"] == row.stats["groups_scaled"] == 0 and row.stats["no_folding_point"] == 2
    assert any("graph input" in m for m in row.near_misses)
    assert [n.format_node() for n in qm.graph_module.graph.nodes] == before


class _NormLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(8), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.norm(x))


def test_do_nothing_is_kept_when_no_candidate_beats_it():
    """Centred channels of one range: shifting is a no-op and no threshold scales anything, so the search keeps
    'do nothing' (ties go to it), and a group with outliers is transformed."""
    from qpass.passes.os_plus import OsPlus, OsPlusConfig

    x = torch.randn(2, 3, 8)
    gm = qpass.capture(_NormLinear(), (x,))
    group = analyze(gm).groups[0]
    flat = ChannelStats(1000)
    flat.update(torch.tensor([[1.0, -1.0] * 4, [-1.0, 1.0] * 4] * 8))
    pass_ = OsPlus(OsPlusConfig(weights=qpass.Recipe.from_dict({"passes": [OSP]}).passes[0].weights))
    assert pass_._search(gm, group, [flat], shift=True) == (None, None, None)
    skewed = ChannelStats(1000)
    rows = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    rows[:, 3] = rows[:, 3] * 30 + 50                     # one shifted outlier channel
    skewed.update(rows)
    z, s, t = pass_._search(gm, group, [skewed], shift=True)
    assert z is not None and abs(float(z[3]) - 50) < 30


@pytest.mark.parametrize("options, path", [
    ({"shift": False, "scale": False}, "passes[0].os_plus.shift"),
    ({"search_steps": 0}, "passes[0].os_plus.search_steps"),
    ({"weights": {"bits": 8, "granularity": "per_token", "dynamic": True}}, "passes[0].os_plus.weights"),
    ({"activations": {"bits": 8, "granularity": "per_channel", "axis": 0}}, "passes[0].os_plus.activations.axis"),
    ({"wieghts": W4}, "passes[0].os_plus.wieghts"),
])
def test_bad_options_name_their_recipe_path(options, path):
    with pytest.raises(qpass.RecipeError, match=path.replace("[", r"\[").replace("]", r"\]")):
        qpass.Recipe.from_dict({"passes": [{"os_plus": options}]})


def test_unknown_targets_and_missing_calibration_are_errors():
    model = toy.hf_model("llama")
    with pytest.raises(TargetNotFoundError, match="q_prj"):
        qpass.apply(model, recipe(targets=["model.layers.*.self_attn.q_prj"]), calib_data=CALIB, progress=False)
    with pytest.raises(CalibrationError, match="os_plus needs calibration data"):
        qpass.apply(toy.hf_model("llama"), recipe(), progress=False)


def test_threshold_grid_and_scales():
    r = torch.tensor([0.5, 4.0, 1.0, 0.0], dtype=torch.float64)
    grid = threshold_grid(r, 4)
    assert grid[0] == 4.0 and abs(grid[-1] - 0.5) < 1e-12 and all(a > b for a, b in zip(grid, grid[1:]))
    used = torch.tensor([True, True, True, False])
    s = outlier_scales(r, 1.0, used)
    assert s.tolist() == [1.0, 4.0, 1.0, 1.0]                  # only channels above t shrink; unread ones keep 1
    assert torch.equal(outlier_scales(r, grid[0], used), torch.ones(4, dtype=torch.float64))
    assert threshold_grid(torch.zeros(3), 5) == []
