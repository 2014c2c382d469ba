"""mofq (MoFQ): per linear, the int or the float format of the same bit width by the smaller layer error."""
import pytest
import torch
from torch import nn

import qpass
from qpass.errors import CalibrationError, TargetNotFoundError
from qpass.passes.mofq import candidates, fake_quant
from qpass.primitives.spec import IntFormat, PerChannel, PerGroup, QSpec
from qpass.quantizer import quantizers
from tests import toy

CALIB = [toy.token_ids(seed=s, t=16) for s in range(3)]
W4C = {"bits": 4, "granularity": "per_channel", "symmetric": True}
W8C = {"bits": 8, "granularity": "per_channel", "symmetric": True}
A8 = {"bits": 8, "granularity": "per_token", "dynamic": True}


def recipe(**opts):
    return {"passes": [{"mofq": {"weights": W4C, "ignore": ["lm_head"], **opts}}]}


def test_candidates_keep_bits_and_granularity():
    c = candidates(QSpec(IntFormat(4), PerGroup(32), symmetric=False))
    assert c["int"].format.name == "int4" and not c["int"].symmetric
    assert c["float"].format.name == "fp4_e2m1" and c["float"].symmetric and c["float"].granularity == PerGroup(32)
    assert candidates(QSpec(IntFormat(8)))["float"].format.name == "fp8_e4m3"


def test_heavy_tails_favour_float_and_uniform_values_favour_int():
    """The paper's sanity check: the choice flips with the tails (FP's grid is dense near zero)."""
    g = torch.Generator().manual_seed(0)
    uniform = torch.rand(64, 128, generator=g, dtype=torch.float64) * 2 - 1
    heavy = torch.distributions.StudentT(2.0).sample((64, 128)).double()
    c = candidates(QSpec(IntFormat(4), PerChannel(0)))

    def err(w, f):
        return float((fake_quant(w, c[f]) - w).pow(2).mean())
    assert err(uniform, "int") < err(uniform, "float")
    assert err(heavy, "float") < err(heavy, "int")


@pytest.fixture(scope="module")
def w4():
    return qpass.apply(toy.hf_model("llama"), recipe(metric="weight_mse", select="layer"), calib_data=CALIB,
                       progress=False)


def test_weight_mse_choice_is_the_smaller_error_and_the_quantizers_follow_it(w4):
    stats, plan = w4.report["mofq"].stats, w4.plans[0]
    choice = plan.decisions["choice"]
    assert stats["linears"] == len(choice) == 14 and stats["metric"] == "weight_mse"
    wq = {q.path: q for q in quantizers(w4.graph_module, role="weight")}
    assert not quantizers(w4.graph_module, role="input")
    for path, c in choice.items():
        e = c["errors"]
        best = min(e["weights_int"], e["weights_float"])
        assert e[f"weights_{c['weights']}"] == best                     # chosen error = min(int, float)
        assert wq[path].fmt_name == {"int": "int4", "float": "fp4_e2m1"}[c["weights"]]
        assert c["weights"] in stats["choice"][path]


def test_output_mse_with_activations_is_joint_and_minimal():
    qm = qpass.apply(toy.hf_model("llama"), recipe(weights=W8C, activations=A8, select="layer"), calib_data=CALIB,
                     progress=False)
    stats = qm.report["mofq"].stats
    assert stats["metric"] == "output_mse"
    acts = {q.path: q for q in quantizers(qm.graph_module, role="input")}
    for path, c in qm.plans[0].decisions["choice"].items():
        assert c["weights"] == c["activations"] and set(c["errors"]) == {"int/int", "float/float"}
        assert set(c["weight_mse"]) == {"int", "float"}
        assert c["errors"][f"{c['weights']}/{c['activations']}"] == min(c["errors"].values())
        assert acts[path].fmt_name == {"int": "int8", "float": "fp8_e4m3"}[c["activations"]] and acts[path].dynamic
    split = qpass.apply(toy.hf_model("llama"), recipe(weights=W8C, activations=A8, joint=False, select="layer"), calib_data=CALIB,
                        progress=False)
    assert all(len(c["errors"]) == 4 for c in split.plans[0].decisions["choice"].values())


def test_weight_only_default_is_the_output_error_and_reports_both_metrics():
    """The default metric is the layer output error ||XW^T - XQ(W)^T||^2 on calibration tokens; the report keeps
    each layer's weight MSE too, and counts the layers where it alone would have chosen the other format."""
    qm = qpass.apply(toy.hf_model("llama"), recipe(select="layer"), calib_data=CALIB, progress=False)
    stats = qm.report["mofq"].stats
    assert stats["metric"] == "output_mse" and stats["linears"] == 14 and "candidates" not in stats
    disagree = 0
    for path, c in qm.plans[0].decisions["choice"].items():
        assert set(c["errors"]) == {"int", "float"} and c["activations"] is None
        assert c["errors"][c["weights"]] == min(c["errors"].values())
        assert set(c["weight_mse"]) == {"int", "float"} and "weight MSE" in stats["choice"][path]
        disagree += c["weights"] != min(("int", "float"), key=lambda f: c["weight_mse"][f])
    assert stats["weight_mse_disagrees"] == disagree


def test_static_activations_get_scales_of_their_chosen_format():
    a8s = {"bits": 8, "granularity": "per_tensor", "symmetric": True}
    qm = qpass.apply(toy.hf_model("llama"), recipe(activations=a8s, metric="weight_mse", joint=False),
                     calib_data=CALIB, progress=False)
    for q in quantizers(qm.graph_module, role="input"):
        assert not q.dynamic and q.fmt_name in ("int8", "fp8_e4m3")
        assert float(qm.graph_module.get_buffer(q.scale.target)) > 0


def test_a_mixed_choice_lowers_to_torch_and_onnx_with_parity(w4, tmp_path):
    """int4 layers as MatMulNBits / DequantizeLinear, FP4 layers as Gather from the E2M1 grid: one ONNX graph."""
    ids = toy.token_ids(batch=2, t=9, seed=11)
    pm = qpass.lower(w4, "torch", kernels="exact")
    torch.testing.assert_close(pm(ids).logits, w4(ids).logits, rtol=1e-5, atol=1e-5)
    pytest.importorskip("onnxruntime")
    from qpass.backends import onnx_qdq

    art = qpass.lower(w4, "onnx", tmp_path / "m", fused_accuracy_level=0)
    floats = {p for p, c in w4.plans[0].decisions["choice"].items() if c["weights"] == "float"}
    grid = {r.path for r in art.report.rows if "Gather(grid)" in r.form}
    assert floats and grid == floats                 # the toy model gets some FP4 layers (weight MSE)
    got = onnx_qdq.logits(onnx_qdq.session(str(tmp_path / "m")), ids[:1])
    torch.testing.assert_close(got.float(), w4(ids[:1]).logits.float(), rtol=0, atol=1e-4)


def test_an_all_int_choice_lowers_to_onnx_with_parity(tmp_path):
    """8-bit weights: INT8's uniform grid wins on every toy layer (the paper: INT8 beats FP8 on weights)."""
    pytest.importorskip("onnxruntime")
    from qpass.backends import onnx_qdq

    qm = qpass.apply(toy.hf_model("llama"), recipe(weights=W8C), calib_data=CALIB, progress=False)
    assert qm.report["mofq"].stats["weights_float"] == 0
    qpass.lower(qm, "onnx", tmp_path / "m")
    ids = toy.token_ids(batch=1, t=9, seed=4)
    got = onnx_qdq.logits(onnx_qdq.session(str(tmp_path / "m")), ids)
    torch.testing.assert_close(got.float(), qm(ids).logits.float(), rtol=0, atol=5e-3)   # ORT int8 kernels


class _One(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(x)


def test_weight_only_weight_mse_needs_no_calibration():
    x = torch.randn(2, 3, 8)
    qm = qpass.apply(qpass.capture(_One(), (x,)), recipe(ignore=[], metric="weight_mse"), progress=False)
    assert qm.report["mofq"].stats["linears"] == 1
    assert "candidates" not in qm.report["mofq"].stats      # select: model needs data: the per-layer choice, said so
    assert any("select: model" in m and "per-layer choice" in m for m in qm.report["mofq"].near_misses)


def _kl(fp, q, samples) -> float:
    total, n = 0.0, 0
    for (ids,) in samples:
        with torch.no_grad():
            p, lq = (torch.log_softmax(m(ids).logits.float(), -1) for m in (fp, q))
        kl = (p.exp() * (p - lq)).sum(-1)
        total, n = total + float(kl.sum()), n + kl.numel()
    return total / n


def test_select_model_keeps_the_candidate_of_lowest_model_kl_and_its_scores_are_the_models(tmp_path):
    """Default select: model: the per-layer choice, all-int and all-float are scored by the model's output KL on
    the calibration samples, the lowest is kept; each score is the KL of that model (all-int is the quantize
    pass's int4 model, computed here independently), and the graph carries the winner's formats."""
    fp = toy.hf_model("llama")
    qm = qpass.apply(fp, recipe(), calib_data=CALIB, progress=False)
    stats, dec = qm.report["mofq"].stats, qm.plans[0].decisions
    scores, sel = stats["candidates"], stats["selected"]
    assert "layer" in scores and set(scores) <= {"layer", "int", "float"} and len(scores) >= 2
    assert scores[sel] == min(scores.values()) and dec["selected"] == sel and dec["candidates"] == scores
    samples = [(c.unsqueeze(0) if c.dim() == 1 else c,) for c in CALIB]
    assert _kl(fp, qm, samples) == pytest.approx(scores[sel], rel=1e-4, abs=1e-9)
    if "int" in scores:
        rtn = qpass.apply(fp, {"passes": [{"quantize": {"weights": W4C, "ignore": ["lm_head"]}}]}, progress=False)
        assert _kl(fp, rtn, samples) == pytest.approx(scores["int"], rel=1e-4, abs=1e-9)
    wq = {q.path: q.fmt_name for q in quantizers(qm.graph_module, role="weight")}
    for path, c in dec["choice"].items():
        assert wq[path] == {"int": "int4", "float": "fp4_e2m1"}[c["weights"]]
        if sel != "layer":
            assert c["weights"] == sel
    qm.save(tmp_path / "m")                                    # the chosen formats load through the plan
    ids = toy.token_ids(batch=1, t=9, seed=4)
    assert torch.equal(qpass.load(tmp_path / "m")(ids).logits, qm(ids).logits)


@pytest.mark.parametrize("options, path", [
    ({"weights": {"bits": 6}}, "passes[0].mofq.weights.bits"),
    ({"weights": {"format": "nf4"}}, "passes[0].mofq.weights.bits"),
    ({"activations": {"bits": 3, "granularity": "per_token", "dynamic": True}}, "passes[0].mofq.activations.bits"),
    ({"metric": "kl"}, "passes[0].mofq.metric"),
    ({"tokens": 0}, "passes[0].mofq.tokens"),
    ({"select": "best"}, "passes[0].mofq.select"),
])
def test_bad_options_name_their_recipe_path(options, path):
    with pytest.raises(qpass.RecipeError, match=path.replace("[", r"\[").replace("]", r"\]")):
        qpass.Recipe.from_dict({"passes": [{"mofq": options}]})


def test_unknown_targets_and_missing_calibration_are_errors():
    with pytest.raises(TargetNotFoundError, match="q_prj"):
        qpass.apply(toy.hf_model("llama"), recipe(targets=["model.layers.*.self_attn.q_prj"]), progress=False)
    with pytest.raises(CalibrationError, match="mofq needs calibration data"):
        qpass.apply(toy.hf_model("llama"), recipe(), progress=False)      # output_mse, the default


@pytest.mark.parametrize("path", ["recipes/mofq_w4a16.yaml", "recipes/mofq_w8a8.yaml", "recipes/mofq_w4a8.yaml",
                                  "recipes/mofq_cmp_w4a16_weight_mse.yaml", "recipes/mofq_cmp_w4a4_static.yaml",
                                  "recipes/mofq_cmp_w4a8_static.yaml"])
def test_presets_load(path):
    assert type(qpass.Recipe.from_yaml(path).passes[0]).name == "mofq"
