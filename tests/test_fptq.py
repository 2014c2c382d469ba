"""fptq (FPTQ): layer-wise activation strategy, logarithmic activation equalization (LAE), fine-grained weights."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qpass
from qpass.analyses import AbsMax
from qpass.calibration import CalibrationSet, observe
from qpass.errors import CalibrationError, TargetNotFoundError
from qpass.folding import analyze, fold_scales, to_channels
from qpass.passes.fptq import lae_scales
from qpass.quantizer import quantizers
from tests import toy

CALIB = [toy.token_ids(seed=s, t=16) for s in range(3)]
W4G = {"bits": 4, "granularity": "per_group", "group_size": 16, "symmetric": True}


def recipe(**opts):
    return {"passes": [{"fptq": {"weights": W4G, "ignore": ["lm_head"], **opts}}]}


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=1e4, allow_nan=False), min_size=1, max_size=16))
def test_lae_maps_each_channel_max_to_log2_of_two_plus_it(ms):
    m = torch.tensor(ms, dtype=torch.float64)
    s = lae_scales(m)
    assert (s > 0).all()
    after = torch.where(m > 0, m / s, torch.zeros_like(m))
    torch.testing.assert_close(after, torch.where(m > 0, torch.log2(2 + m), torch.zeros_like(m)))
    assert torch.equal(s[m == 0], torch.ones_like(s[m == 0]))                  # dead channels keep 1
    assert torch.equal(lae_scales(m, torch.zeros_like(m, dtype=torch.bool)), torch.ones_like(m))   # unread: 1


def _absmax(gm, sites):
    nodes = {s.input.name: s.input for s in sites}
    obs = observe(gm, nodes, lambda *_: AbsMax(), CalibrationSet(CALIB), progress=False)
    return {k: o.value for k, o in obs.items()}


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_lae_folded_keeps_the_function_and_flattens_channel_ranges(family):
    gm = qpass.capture(toy.hf_model(family))
    ids = toy.token_ids(batch=2, t=9, seed=11)
    ref = gm(ids).logits
    groups = analyze(gm).groups
    before = _absmax(gm, [c.site for g in groups for c in g.consumers])
    for g in groups:
        fold_scales(gm, g, lae_scales(to_channels(g, [before[c.site.input.name] for c in g.consumers]), g.consumed))
    torch.testing.assert_close(gm(ids).logits, ref, rtol=1e-4, atol=1e-5)
    after = _absmax(gm, [c.site for g in groups for c in g.consumers])
    for k, m in before.items():
        live = m > 0
        torch.testing.assert_close(after[k][live], torch.log2(2 + m[live]), rtol=1e-2, atol=1e-5)   # upstream folds: fp32 rounding


def test_the_layer_wise_strategy_follows_the_ranges():
    model = toy.hf_model("llama")
    probe = qpass.apply(model, recipe(), calib_data=CALIB, progress=False).report["fptq"].stats["range"]
    vs = sorted(set(probe.values()))
    v0, v1 = vs[len(vs) // 3], vs[2 * len(vs) // 3]
    qm = qpass.apply(toy.hf_model("llama"), recipe(v0=v0, v1=v1), calib_data=CALIB, progress=False)
    stats, plan = qm.report["fptq"].stats, qm.plans[0]
    assert plan.decisions["strategy"] == stats["strategy"]
    folded = {c.site.path for g in analyze(qpass.capture(toy.hf_model("llama"))).groups for c in g.consumers}
    for path, v in probe.items():
        want = "static" if v <= v0 else "per_token" if v > v1 else None
        got = stats["strategy"][path]
        if want is not None and got != "lae":       # a group's range is its widest linear's
            assert got == want, path
        if got == "lae":
            assert path in folded
    assert stats["static"] and stats["per_token"] and stats["lae"] and stats["groups_equalized"]
    acts = {q.path: q for q in quantizers(qm.graph_module, role="input")}
    wts = [q for q in quantizers(qm.graph_module, role="weight")]
    assert len(acts) == len(wts) == stats["linears"]
    for path, s in stats["strategy"].items():
        assert acts[path].dynamic == (s == "per_token"), path
        assert acts[path].fmt_name == "int8"
    assert {q.fmt_name for q in wts} == {"int4"} and all(q.block[-1] == 16 for q in wts)


def test_all_lae_before_quantizers_is_function_preserving_with_int8_weights_close():
    """v0 = 0, v1 = inf: every foldable group is equalized; with 8-bit everything the logits stay close."""
    model = toy.hf_model("llama")
    ids = toy.token_ids(batch=2, t=9, seed=11)
    ref = model(ids).logits
    w8 = {"bits": 8, "granularity": "per_channel", "symmetric": True}
    qm = qpass.apply(model, recipe(v0=0.0, v1=1e9, weights=w8, static=False), calib_data=CALIB, progress=False)
    st_ = qm.report["fptq"].stats
    assert st_["static"] == 0 and st_["lae"] == 14 and st_["per_token"] == 0   # 2 layers x 7 linears, lm_head off
    assert float((qm(ids).logits - ref).abs().max()) < 0.05 * float(ref.abs().max())


def test_gptq_after_fptq_re_rounds_and_lowers_with_parity(tmp_path):
    model = toy.hf_model("llama")
    probe = qpass.apply(model, recipe(), calib_data=CALIB, progress=False).report["fptq"].stats["range"]
    v = sorted(probe.values())
    r = {"passes": [*recipe(v0=v[len(v) // 3], v1=v[2 * len(v) // 3])["passes"], {"gptq": {}}]}
    qm = qpass.apply(toy.hf_model("llama"), r, calib_data=CALIB, progress=False)
    assert qm.report["gptq"].stats["linears"] == 14
    ids = toy.token_ids(batch=2, t=9, seed=11)
    pm = qpass.lower(qm, "torch", kernels="exact")
    torch.testing.assert_close(pm(ids).logits, qm(ids).logits, rtol=1e-5, atol=1e-5)
    pytest.importorskip("onnxruntime")
    from qpass.backends import onnx_qdq

    qpass.lower(qm, "onnx", tmp_path / "m")
    got = onnx_qdq.logits(onnx_qdq.session(str(tmp_path / "m")), ids[:1])
    # per-token activation rounding flips a few codes at half-way points (docs/onnx.md): not bit-exact
    torch.testing.assert_close(got.float(), qm(ids[:1]).logits.float(), rtol=0, atol=5e-3)


class _Direct(nn.Module):
    """Linears that read the graph input: no producer to fold LAE into."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_no_folding_point_falls_back_to_per_token_and_says_why():
    x = torch.randn(2, 3, 8) * 40
    gm = qpass.capture(_Direct(), (x,))
    qm = qpass.apply(gm, recipe(ignore=[], weights={"bits": 4, "granularity": "per_channel"}), calib_data=[(x,)],
                     progress=False)
    row = qm.report["fptq"]
    assert row.stats["lae"] == 0 and row.stats["per_token"] == 2
    assert sum("no folding point" in m for m in row.near_misses) == 2


@pytest.mark.parametrize("options, path", [
    ({"v0": 200.0}, "passes[0].fptq.v0"),
    ({"activation_bits": 9}, "passes[0].fptq.activation_bits"),
    ({"weights": {"bits": 4, "granularity": "per_token", "dynamic": True}}, "passes[0].fptq.weights"),
    ({"v2": 3}, "passes[0].fptq.v2"),
])
def test_bad_options_name_their_recipe_path(options, path):
    with pytest.raises(qpass.RecipeError, match=path.replace("[", r"\[").replace("]", r"\]")):
        qpass.Recipe.from_dict({"passes": [{"fptq": options}]})


def test_unknown_targets_and_missing_calibration_are_errors():
    with pytest.raises(TargetNotFoundError, match="q_prj"):
        qpass.apply(toy.hf_model("llama"), recipe(targets=["model.layers.*.self_attn.q_prj"]), calib_data=CALIB,
                    progress=False)
    with pytest.raises(CalibrationError, match="fptq needs calibration data"):
        qpass.apply(toy.hf_model("llama"), recipe(), progress=False)


def test_preset_loads():
    r = qpass.Recipe.from_yaml("recipes/fptq_w4a8.yaml")
    assert [type(p).name for p in r.passes] == ["fptq", "gptq"]
    assert r.passes[0].v0 == 15 and r.passes[0].v1 == 150 and r.passes[0].weights.bits == 4
