import json
import os

import pytest
import torch

import qpass
from qpass import Recipe
from qpass.passes import QuantizeConfig
from tests import toy


def rel_err(out, ref):
    return float((out - ref).abs().mean() / ref.abs().mean())


@pytest.mark.parametrize("family", toy.FAMILIES)
def test_w8a8_stays_close_and_w16_is_exact(family):
    model = toy.hf_model(family)
    ids = toy.token_ids(batch=3, t=9)
    with torch.no_grad():
        ref = model(ids).logits
    fp = qpass.apply(model, "recipes/w16.yaml")
    assert (fp(ids).logits - ref).abs().max() <= 1e-5
    qm = qpass.apply(model, "recipes/w8a8.yaml")
    err = rel_err(qm(ids).logits, ref)
    print(f"{family}: W8A8 mean|Δlogits|/mean|logits| = {err:.4f}")
    assert 0 < err < 0.02


def test_original_model_is_not_modified():
    model = toy.hf_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qpass.apply(model, "recipes/w4a16_g128.yaml")
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_quantized_model_is_called_like_the_model():
    qm = qpass.apply(toy.hf_model("qwen2"), "recipes/w8a8.yaml")
    for b, t in [(1, 1), (4, 13)]:
        out = qm(toy.token_ids(b, t))
        assert out.logits.shape == (b, t, 96)
    assert torch.equal(qm(input_ids=toy.token_ids()).logits, qm(toy.token_ids()).logits)
    text = str(qm.report)
    assert "quantize" in text and "linears=14" in text and "skipped lm_head" in text


@pytest.mark.parametrize("recipe", ["recipes/w8a8.yaml", "recipes/w4a16_g128.yaml", "recipes/w8a8_static.yaml"])
def test_save_load_round_trips_exactly(tmp_path, recipe):
    model = toy.hf_model("llama")
    qm = qpass.apply(model, recipe, calib_data=[toy.token_ids(seed=s) for s in range(2)], progress=False)
    qm.save(tmp_path / "m")
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "model.safetensors", "plans.json", "qpass.json", "recipe.yaml"]
    meta = json.loads((tmp_path / "m" / "qpass.json").read_text())
    assert meta["qpass_version"] == qpass.__version__ and meta["torch_version"] == torch.__version__
    back = qpass.load(tmp_path / "m")
    assert back.recipe == qm.recipe
    ids = toy.token_ids(batch=2, t=10, seed=9)
    assert torch.equal(back(ids).logits, qm(ids).logits)


def test_save_load_of_a_plain_module_needs_the_module(tmp_path):
    m, x = toy.TinyDecoderLayer(), toy.seq_input()
    qm = qpass.apply(m, {"passes": [{"quantize": {"activations": {"granularity": "per_token", "dynamic": True}}}]},
                     example_inputs=(x,))
    qm.save(tmp_path / "m")
    with pytest.raises(qpass.ArtifactError, match="model="):
        qpass.load(tmp_path / "m")
    back = qpass.load(tmp_path / "m", model=toy.TinyDecoderLayer(seed=5))   # other weights: overwritten
    assert torch.equal(back(x), qm(x))


def test_artefact_errors(tmp_path):
    qm = qpass.apply(toy.TinyMLP(), Recipe([]), example_inputs=(toy.mlp_input(),))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(qpass.ArtifactError, match="not empty"):
        qm.save(tmp_path / "full")
    assert os.listdir(tmp_path / "full") == ["x"]
    with pytest.raises(qpass.ArtifactError, match="missing"):
        qpass.load(tmp_path / "full")
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".qpass-save-")]


def test_verify_reports_each_pass_difference():
    model = toy.hf_model("llama")
    rec = Recipe([QuantizeConfig(weights=None), QuantizeConfig()], verify=True)
    qm = qpass.apply(model, rec, calib_data=[toy.token_ids()])
    first, second = qm.report.rows
    assert first.verify["max_abs_diff"] == 0.0        # weights=None: nothing changes
    assert second.verify["max_abs_diff"] > 0.0


def test_failing_pass_raises_pass_error_naming_the_pipeline(monkeypatch):
    from qpass.passes import quantize as qmod

    def boom(self, gm, ctx):
        raise RuntimeError("kaboom")

    rec = Recipe([QuantizeConfig(weights=None), QuantizeConfig()])
    calls = {"n": 0}
    orig = qmod.Quantize.run

    def second_fails(self, gm, ctx):
        calls["n"] += 1
        return orig(self, gm, ctx) if calls["n"] == 1 else boom(self, gm, ctx)

    monkeypatch.setattr(qmod.Quantize, "run", second_fails)
    with pytest.raises(qpass.PassError, match=r"quantize failed after \['quantize'\]: RuntimeError: kaboom"):
        qpass.apply(toy.hf_model("llama"), rec)


def test_bad_calibration_data_is_a_clear_error():
    with pytest.raises(qpass.CalibrationError, match="wrap it in a list"):
        qpass.apply(toy.hf_model("llama"), "recipes/w8a8.yaml", calib_data=toy.token_ids())
    with pytest.raises(qpass.CalibrationError, match="without 'input_ids'"):
        qpass.apply(toy.hf_model("llama"), "recipes/w8a8.yaml", calib_data=[{"ids": toy.token_ids()}])


def test_quantized_graph_exports_again_with_dynamic_shapes():
    qm = qpass.apply(toy.hf_model("llama"), "recipes/w4a16_g128.yaml")
    qm = qpass.apply(qm, {"passes": [{"quantize": {"weights": None, "activations": {
        "granularity": "per_token", "dynamic": True}, "ignore": ["lm_head"]}}]})
    batch, seq = torch.export.Dim("batch", min=1, max=8), torch.export.Dim("seq", min=1, max=32)
    ep = torch.export.export(qm.graph_module, (toy.token_ids(),), dynamic_shapes=({0: batch, 1: seq},),
                             strict=False)
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"qpass.fake_quantize.default", "qpass.fake_quantize_dynamic.default"} <= ops
    ids = toy.token_ids(batch=3, t=11)
    assert torch.equal(ep.module()(ids).logits, qm(ids).logits)
