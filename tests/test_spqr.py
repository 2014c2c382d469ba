"""SpQR: GPTQ with tiny groups, quantized statistics and float outliers (qpass.primitives.spqr, passes/spqr.py)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qpass
from qpass.errors import QuantizationError
from qpass.eval import weight_bytes
from qpass.primitives import formats as F
from qpass.primitives.gptq import reconstruction_error
from qpass.primitives.spqr import loo_error_reduction, minmax_qparams, second_level, spqr_quantize
from qpass.quantizer import quantizers
from tests import toy

CALIB = [toy.token_ids(seed=s) for s in range(3)]
W3 = {"bits": 3, "granularity": "per_group", "group_size": 16, "symmetric": False}


def _layer(d=48, out=40, seed=0):
    x = toy.correlated_input(256, d, outliers=2, seed=seed)
    w = torch.randn(out, d, generator=torch.Generator().manual_seed(seed + 1)) * 0.1
    xtx = x.double().t() @ x.double()
    return w, xtx, 2.0 * xtx / x.shape[0]


def _graph_weight(r, bits=3, g=16, rows=16):
    """What the graph's fake_quantize_ext computes from the stored tensors."""
    return F.fake_quantize_ext(r.weight, r.scale, r.zero_point, [1, g], f"int{bits}",
                               outliers=(r.outlier_index, r.outlier_value),
                               scale_q=(r.scale_scale, [rows, 1], "int3", r.scale_zero))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 30), bits=st.sampled_from([2, 3, 4]), g=st.sampled_from([8, 16]),
       act_order=st.booleans(), tau=st.sampled_from([None, 0.05, 0.2, 1.0]))
def test_outlier_criterion_and_exact_representation(seed, bits, g, act_order, tau):
    """The paper's sanity checks: the graph holds exactly the result; every outlier passed the criterion and is
    stored in fp16; adding the outliers back lowers ||WX - W_hat X||^2."""
    w, xtx, h = _layer(seed=seed)
    r = spqr_quantize(w, h, bits=bits, group_size=g, tau=math.inf if tau is None else tau, act_order=act_order)
    assert torch.equal(_graph_weight(r, bits, g), r.dense())                      # bit for bit
    assert torch.equal(F.fake_quantize_ext(r.weight, r.scale, r.zero_point, [1, g], f"int{bits}",
                                           scale_q=(r.scale_scale, [16, 1], "int3", r.scale_zero)), r.weight)
    assert bool((r.weight.reshape(-1)[r.outlier_index] == 0).all())              # an outlier's code is the zero
    assert r.outlier_value.dtype == torch.float16 and r.scale_scale.dtype == torch.float16
    if tau is None:
        assert r.outliers == 0 and math.isinf(r.threshold)
    elif r.outliers:
        dense_wo = r.weight.double()
        assert reconstruction_error(w, r.dense(), xtx) < reconstruction_error(w, dense_wo, xtx)


def test_outliers_lower_the_error_and_a_lower_threshold_keeps_more():
    w, xtx, h = _layer(d=64, out=48)
    w[5, 9] = 2.0                                  # one huge weight: an outlier by any threshold
    runs = [spqr_quantize(w, h, bits=3, tau=t) for t in (math.inf, 1.0, 0.2, 0.05)]
    counts = [r.outliers for r in runs]
    errs = [reconstruction_error(w, r.dense(), xtx) for r in runs]
    assert counts[0] == 0 and 0 < counts[1] <= counts[2] <= counts[3]
    assert errs[3] < errs[2] < errs[1] < errs[0]
    assert 5 * 64 + 9 in runs[1].outlier_index.tolist()
    capped = spqr_quantize(w, h, bits=3, tau=0.05, max_outliers=7)
    assert capped.outliers == 7


def test_leave_one_out_reduction_flags_the_weight_that_widens_the_range():
    g = torch.tensor([[0.1, -0.1, 0.05, 3.0], [0.1, -0.1, 0.05, 0.0]])
    red = loo_error_reduction(g, torch.ones(4), bits=3)
    assert int(red[0].argmax()) == 3 and red[0, 3] > 10 * red[1].abs().max()


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 1000), out=st.integers(1, 40), bits=st.sampled_from([2, 3, 4]))
def test_second_level_scales_are_positive_and_within_a_step(seed, out, bits):
    s = torch.rand(out, generator=torch.Generator().manual_seed(seed)) * 0.1 + 1e-4
    eff, s2, z2 = second_level(s, bits, 16)
    assert bool((eff > 0).all()) and eff.shape == s.shape and s2.dtype == torch.float16 and z2.dtype == torch.int16
    step = s2.float().repeat_interleave(16)[:out]
    assert bool(((eff - s).abs() <= step * (1 + 1e-3)).all())


def test_minmax_qparams_match_the_quantize_pass():
    from qpass.primitives.quant import choose_qparams
    from qpass.primitives.spec import IntFormat, PerGroup, QSpec
    x = torch.randn(8, 16)
    s, z = minmax_qparams(x, 3)
    s_ref, z_ref = choose_qparams(x, QSpec(IntFormat(3), PerGroup(16), symmetric=False))
    assert torch.equal(s, s_ref[:, 0]) and torch.equal(z.int(), z_ref[:, 0])


def _recipe(weights=W3, **kw):
    return {"passes": [{"quantize": {"weights": weights, "ignore": ["lm_head"]}}, {"spqr": kw}]}


def test_spqr_fires_counts_its_bits_and_lowers_to_torch_exactly():
    model = toy.hf_model("llama")
    qm = qpass.apply(model, _recipe(outlier_threshold=0.2), calib_data=CALIB, progress=False)
    stats = qm.report["spqr"].stats
    qs = quantizers(qm.graph_module, role="weight")
    assert stats["linears"] == len(qs) == 14 and stats["outliers"] > 0
    assert all(q.op == "fake_quantize_ext" and q.side_channels.names == ("outliers", "scale_q") for q in qs)
    gm = qm.graph_module
    total = sum(gm.get_buffer(q.side_channels.outliers.index.target).numel() for q in qs)
    assert total == stats["outliers"] == sum(r["outliers"] for r in qm.plans[-1].decisions["linears"])
    # bits: codes 3 + scale codes 3/16 + zeros 3/16 + (fp16 + int16) per 16x16 statistics + 48 per outlier
    numel = sum(gm.get_parameter(q.x.target).numel() for q in qs)
    groups = sum(gm.get_buffer(q.scale.target).numel() for q in qs)
    second = sum(gm.get_buffer(q.side_channels.scale_q.scale.target).numel() for q in qs)
    want = (3 * numel + 6 * groups + 32 * second + 48 * total) / numel
    assert weight_bytes(qm)["quantized_bits_per_weight"] == pytest.approx(want)
    ids = toy.token_ids(batch=2, t=9, seed=5)
    lowered = qpass.lower(qm, "torch")
    torch.testing.assert_close(lowered(ids).logits, qm(ids).logits, rtol=0, atol=1e-5)
    ext = [m for m in lowered.graph_module.modules() if type(m).__name__ == "ExtLinear"]
    assert len(ext) == 14
    for m in ext:    # real bytes: 3-bit planes for codes, zeros and scale codes; int32 indices; fp16 values
        assert m.codes.dtype == torch.uint8 and m.codes.shape[0] == 3 and m.scale.shape[0] == 3
        assert m.zero.shape[0] == 3 and m.outlier_index.dtype == torch.int32
        assert m.outlier_value.dtype == torch.float16 and m.scale_scale.dtype == torch.float16


def test_target_bits_is_met_and_no_outliers_is_gptq_with_quantized_statistics(tmp_path):
    model = toy.hf_model("llama")
    qm = qpass.apply(model, _recipe(target_bits=4.0, search_steps=4), calib_data=CALIB, progress=False)
    assert weight_bytes(qm)["quantized_bits_per_weight"] <= 4.0 and qm.report["spqr"].stats["outliers"] > 0
    off = qpass.apply(model, _recipe(outlier_threshold=None), calib_data=CALIB, progress=False)
    qs = quantizers(off.graph_module, role="weight")
    assert off.report["spqr"].stats["outliers"] == 0 and all(q.side_channels.names == ("scale_q",) for q in qs)
    assert weight_bytes(off)["quantized_bits_per_weight"] < weight_bytes(qm)["quantized_bits_per_weight"]
    off.save(tmp_path / "off")                         # no outlier channel: the plan rebuilds none
    ids = toy.token_ids(batch=1, t=6, seed=2)
    assert torch.equal(qpass.load(tmp_path / "off")(ids).logits, off(ids).logits)


def test_onnx_lowers_both_side_channels_with_parity(tmp_path):
    """Standard ops only: scales from their codes (Cast, Sub, Mul), DequantizeLinear, ScatterND add, MatMul."""
    pytest.importorskip("onnxruntime")
    import onnx

    from qpass.backends import onnx_qdq
    qm = qpass.apply(toy.hf_model("llama"), _recipe(outlier_threshold=0.2), calib_data=CALIB, progress=False)
    art = qpass.lower(qm, "onnx", tmp_path / "onnx", fused_accuracy_level=0)
    ids = toy.token_ids(batch=2, t=9, seed=5)
    torch.testing.assert_close(onnx_qdq.logits(art.path, ids), qm(ids).logits, rtol=1e-4, atol=1e-5)
    ops = [n.op_type for n in onnx.load(art.model_path).graph.node]
    assert ops.count("ScatterND") == ops.count("DequantizeLinear") == 14
    inits = onnx.load(art.model_path).graph.initializer
    assert sum(i.data_type == onnx.TensorProto.UINT4 for i in inits) >= 14     # 3-bit codes in 4-bit containers


def test_mm_family_layout():
    """GPT-2's Conv1D weight is stored [in, out]: statistics and outlier indices land in the quantizer's layout."""
    qm = qpass.apply(toy.hf_model("gpt2"), _recipe(outlier_threshold=0.1), calib_data=CALIB, progress=False)
    assert qm.report["spqr"].stats["linears"] == 8
    ids = toy.token_ids(batch=2, t=9, seed=5)
    torch.testing.assert_close(qpass.lower(qm, "torch")(ids).logits, qm(ids).logits, rtol=0, atol=1e-5)
    errs = qm.report["spqr"].stats["errors"].values()
    assert all(e["ratio_vs_gptq"] < 1.5 for e in errs)      # the layout is right: not far off GPTQ's error


def test_nothing_to_do_is_a_no_op_and_mistakes_are_clear_errors():
    model = toy.hf_model("llama")
    qm = qpass.apply(model, _recipe(ignore=["*"]), calib_data=CALIB, progress=False)
    assert qm.report["spqr"].stats["linears"] == 0
    sym = qpass.apply(model, _recipe({**W3, "symmetric": True}), calib_data=CALIB, progress=False)
    assert sym.report["spqr"].stats["linears"] == 0
    assert any("symmetric: false" in m for m in sym.report["spqr"].near_misses)
    with pytest.raises(QuantizationError, match="(?s)no quantized weights.*fix: place '- quantize"):
        qpass.apply(model, {"passes": [{"spqr": {}}]}, calib_data=CALIB, progress=False)
    with pytest.raises(QuantizationError, match="(?s)target_bits 3.1 is below.*fix: raise target_bits"):
        qpass.apply(model, _recipe(target_bits=3.1), calib_data=CALIB, progress=False)
    with pytest.raises(qpass.CalibrationError, match="spqr needs calibration data"):
        qpass.apply(model, _recipe(), progress=False)
    for cfg, msg in [({"scale_bits": 1}, "scale_bits: must be"), ({"outlier_threshold": -1}, "outlier_threshold"),
                     ({"target_bits": 0.5}, "target_bits"), ({"scale_group": 0}, "scale_group"),
                     ({"max_outliers": 2}, "max_outliers"), ({"targets": []}, "targets")]:
        with pytest.raises(qpass.RecipeError, match=msg):
            qpass.Recipe.from_dict({"passes": [{"spqr": cfg}]})
