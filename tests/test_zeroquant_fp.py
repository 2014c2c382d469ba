"""ZeroQuant-FP: FP8 activations with FP4 or int4 weights (recipes over the quantize pass), and power-of-two scales
(``QSpec.scale_pow2``: primitives, observers, recipe loader, quantizer IR, plans, both backends)."""
import glob

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qpass
from qpass.primitives import quant
from qpass.primitives.observers import OBSERVERS
from qpass.primitives.spec import FloatFormat, IntFormat, PerChannel, PerGroup, PerTensor, PerToken, QSpec
from qpass.quantizer import quantizers, spec_from_dict, spec_to_dict
from qpass.recipe import qspec_from_dict, qspec_to_dict
from tests import toy
from tests.primitives.strategies import INT_FORMATS, data, shapes_and_blocks

CALIB = [toy.token_ids(seed=s, t=16) for s in range(3)]
ZQFP = sorted(glob.glob("recipes/zqfp*.yaml"))


def is_pow2(t: torch.Tensor) -> bool:
    m, _ = torch.frexp(t)
    return bool((m.abs() == 0.5).all())


# ------------------------------------------------------------------------------------------ primitives


@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=1e-30, max_value=1e30, allow_nan=False, allow_infinity=False))
def test_pow2_ceil_is_the_smallest_power_of_two_at_or_above(v):
    s = torch.tensor([v], dtype=torch.float32)
    p = quant.pow2_ceil(s)
    assert is_pow2(p) and float(p) >= float(s) and float(p) < 2 * float(s)
    assert torch.equal(quant.pow2_ceil(p), p)                                  # powers of two are kept


def test_pow2_ceil_keeps_nan_and_inf():
    out = quant.pow2_ceil(torch.tensor([float("nan"), float("inf"), 0.75, 1.0, 1.0000001]))
    assert out[0].isnan() and out[1].isinf() and out[2:].tolist() == [1.0, 1.0, 2.0]


@settings(max_examples=80, deadline=None)
@given(st.data(), shapes_and_blocks(), st.sampled_from(INT_FORMATS + ["fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "nf4"]),
       st.booleans())
def test_pow2_scales_never_clip_more_than_min_max(d, shape_block, fmt, symmetric):
    shape, block = shape_block
    x = d.draw(data(shape))
    f = quant.parse_format(fmt)
    symmetric = symmetric or f.kind != "int"
    plain, pow2 = QSpec(f, PerTensor(), symmetric=symmetric), QSpec(f, PerTensor(), symmetric=symmetric,
                                                                     scale_pow2=True)
    s0, _ = quant.choose_qparams(x, plain, block_size=block)
    s1, z1 = quant.choose_qparams(x, pow2, block_size=block)
    assert is_pow2(s1) and (s1 >= s0).all() and (s1 < 2 * s0).all()
    dq = quant.fake_quantize(x, s1, z1, block, fmt)
    lo, hi = quant.qrange(fmt, z1 is None)
    top = quant.expand_to(s1, block, x.shape) * max(abs(lo), abs(hi))
    assert ((x.abs() <= top * (1 + 1e-6)) | (z1 is not None)).all()           # symmetric: nothing is clipped
    step = quant.expand_to(s1, block, x.shape)
    if f.kind == "int":
        assert ((x - dq).abs() <= step * (0.5 + 1e-5) + 1e-6 * x.abs()).all()


def test_fp4_weights_with_pow2_scales_are_exact_in_fp8_e4m3():
    """The paper's point: with power-of-two scales, dequantized FP4 weights cast to FP8 E4M3 losslessly."""
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * 0.05
    w[3, 7] = 1.5
    spec = QSpec(FloatFormat("fp4_e2m1"), PerGroup(128), scale_pow2=True)
    scale, _ = quant.choose_qparams(w, spec)
    dq = quant.fake_quantize(w, scale, None, spec.block_size(w.shape), "fp4_e2m1")
    assert torch.equal(dq.to(torch.float8_e4m3fn).float(), dq)
    plain, _ = quant.choose_qparams(w, QSpec(FloatFormat("fp4_e2m1"), PerGroup(128)))
    dq_plain = quant.fake_quantize(w, plain, None, spec.block_size(w.shape), "fp4_e2m1")
    assert not torch.equal(dq_plain.to(torch.float8_e4m3fn).float(), dq_plain)  # without the constraint: lossy


@pytest.mark.parametrize("kind", sorted(OBSERVERS))
def test_static_activation_observers_give_pow2_scales(kind):
    spec = QSpec(FloatFormat("fp8_e4m3"), PerTensor(), scale_pow2=True)
    obs = OBSERVERS[kind](spec)
    for s in range(3):
        obs.update(torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(s)) * 3)
    scale, zp = obs.qparams()
    assert zp is None and is_pow2(scale)


# ---------------------------------------------------------------------------------- spec, recipe, IR


def test_spec_and_recipe_refuse_pow2_where_scales_are_not_static():
    with pytest.raises(ValueError, match="scale_pow2 applies to static scales"):
        QSpec(IntFormat(8), PerToken(), dynamic=True, scale_pow2=True)
    with pytest.raises(ValueError, match="scale_pow2"):
        QSpec(IntFormat(4), PerChannel(0), full_range=True, scale_pow2=True)
    with pytest.raises(qpass.RecipeError, match=r"passes\[0\]\.quantize\.activations\.scale_pow2"):
        qpass.Recipe.from_dict({"passes": [{"quantize": {"activations": {
            "format": "fp8_e4m3", "granularity": "per_token", "dynamic": True, "scale_pow2": True}}}]})
    with pytest.raises(qpass.RecipeError, match="scale_pow2"):
        qspec_from_dict({"bits": 4, "scale_pow2": "yes"}, "w")


def test_pow2_round_trips_through_yaml_dicts_and_quant_meta():
    spec = qspec_from_dict({"format": "fp4_e2m1", "granularity": "per_group", "group_size": 32, "scale_pow2": True},
                           "w")
    assert spec.scale_pow2 and qspec_from_dict(qspec_to_dict(spec), "w") == spec
    assert spec_from_dict(spec_to_dict(spec)) == spec
    plain = QSpec(IntFormat(4), PerGroup(32))
    assert "scale_pow2" not in spec_to_dict(plain) and "scale_pow2" not in qspec_to_dict(plain)


# --------------------------------------------------------------------------------------------- recipes


@pytest.fixture(scope="module")
def applied():
    model = toy.hf_model("llama")
    return {path: qpass.apply(model, path, calib_data=CALIB, progress=False) for path in ZQFP}


def test_recipes_insert_fp8_activations_and_fp4_or_int4_weights(applied):
    assert len(ZQFP) >= 5
    for path, qm in applied.items():
        w = [q for q in quantizers(qm.graph_module) if q.role == "weight"]
        a = [q for q in quantizers(qm.graph_module) if q.role == "input"]
        assert w and a and len(w) == len(a), path
        assert {q.fmt_name for q in w} <= {"fp4_e2m1", "int4"}, path
        assert {q.fmt_name for q in a} <= {"fp8_e4m3", "fp8_e5m2", "int8"}, path
        if qpass.Recipe.from_yaml(path).passes[0].weights.scale_pow2:
            assert all(is_pow2(qm.graph_module.get_buffer(q.scale.target)) for q in w), path


def test_fp8_beats_int8_per_tensor_on_activations_with_outlier_channels():
    """Why FP8 activations: one per-tensor scale over channels of very different ranges (LLM activations) wastes
    int8's uniform grid on the small channels; FP8's exponent keeps their relative precision. (On the random toy
    model there are no outliers and int8 can win; the bundled models' numbers are in the results doc.)"""
    x = torch.randn(512, 64, generator=torch.Generator().manual_seed(0))
    x[:, :2] *= 60                                                     # two outlier channels
    err = {}
    for fmt in ("fp8_e4m3", "int8"):
        spec = QSpec(quant.parse_format(fmt), PerTensor())
        scale, zp = quant.choose_qparams(x, spec)
        err[fmt] = float((quant.fake_quantize(x, scale, zp, (-1, -1), fmt) - x).pow(2).mean())
    assert err["fp8_e4m3"] < err["int8"]


def test_torch_lowers_every_recipe_with_parity(applied):
    ids = toy.token_ids(batch=2, t=9, seed=11)
    for path, qm in applied.items():
        pm = qpass.lower(qm, "torch", kernels="exact")
        torch.testing.assert_close(pm(ids).logits, qm(ids).logits, rtol=1e-5, atol=1e-5, msg=path)


@pytest.mark.parametrize("path", ["recipes/zqfp_w4a8_fp.yaml", "recipes/zqfp_w4a8_fp_static.yaml"])
def test_fp4_weights_with_fp8_activations_lower_to_onnx_with_parity(applied, path, tmp_path):
    """FP4 weights (Gather from the E2M1 grid, times the group scale) with FP8 inputs (float8 Q/DQ), dynamic per
    token or static: onnxruntime's logits equal the fake-quant model's to float rounding."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from qpass.backends import onnx_qdq

    qm = applied[path]
    art = qpass.lower(qm, "onnx", tmp_path / "m")
    assert all(r.form.startswith("fp4_e2m1 per_group: Gather(grid)") for r in art.report.rows), art.report.rows
    ids = toy.token_ids(batch=1, t=9, seed=4)
    got = onnx_qdq.logits(onnx_qdq.session(str(tmp_path / "m")), ids)
    torch.testing.assert_close(got.float(), qm(ids).logits.float(), rtol=0, atol=1e-4)


def test_pow2_int4_weights_lower_to_onnx_with_parity(tmp_path):
    """An integer format with power-of-two scales needs nothing new from a backend (the scale is a tensor)."""
    pytest.importorskip("onnxruntime")
    from qpass.backends import onnx_qdq

    w = {"bits": 4, "granularity": "per_group", "group_size": 16, "symmetric": True, "scale_pow2": True}
    qm = qpass.apply(toy.hf_model("llama"), {"passes": [{"quantize": {
        "weights": w, "activations": {"bits": 8, "granularity": "per_token", "dynamic": True},
        "ignore": ["lm_head"]}}]}, progress=False)
    qpass.lower(qm, "onnx", tmp_path / "m")
    ids = toy.token_ids(batch=1, t=9, seed=4)
    got = onnx_qdq.logits(onnx_qdq.session(str(tmp_path / "m")), ids)
    # MatMulNBits (W4A8) quantizes the activations in its own blocks: within the tolerance docs/onnx.md reports
    torch.testing.assert_close(got.float(), qm(ids).logits.float(), rtol=0, atol=5e-3)


def test_a_pow2_model_saves_and_loads_exactly(applied, tmp_path):
    qm = applied["recipes/zqfp_w4a8_fp_pow2.yaml"]
    qm.save(tmp_path / "m")
    loaded = qpass.load(tmp_path / "m")
    ids = toy.token_ids(batch=2, t=7, seed=2)
    assert torch.equal(loaded(ids).logits, qm(ids).logits)
    assert [q.meta.spec for q in quantizers(loaded.graph_module)] == [q.meta.spec for q in quantizers(qm.graph_module)]


STATIC, PER_TOKEN = {"granularity": "per_tensor"}, {"granularity": "per_token", "dynamic": True}


@pytest.mark.parametrize("arch, fmt, act", [("llama", "fp8_e4m3", STATIC), ("llama", "fp8_e5m2", PER_TOKEN),
                                            ("opt", "fp8_e4m3", PER_TOKEN)],
                         ids=["llama-e4m3-static", "llama-e5m2-per_token", "opt-e4m3-per_token"])
def test_fp8_activations_lower_to_onnx_float8_qdq_with_parity(arch, fmt, act, tmp_path):
    """FP8 inputs of int-weight linears: float8 QuantizeLinear/DequantizeLinear (saturating, round to nearest
    even, as torch's float8 cast), static per-tensor or per-token scales (max|x| / fp8 max); onnxruntime's logits
    equal the fake-quant model's to float rounding. The torch backend keeps the FP8 input in its packed linear."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import onnx

    from qpass.backends import onnx_qdq

    w = {"bits": 4, "granularity": "per_group", "group_size": 32, "symmetric": True}
    qm = qpass.apply(toy.hf_model(arch), {"passes": [{"quantize": {
        "weights": w, "activations": {"format": fmt, **act}, "ignore": ["lm_head"]}}]}, calib_data=CALIB,
        progress=False)
    ids = toy.token_ids(batch=1, t=9, seed=4)
    pm = qpass.lower(qm, "torch", kernels="exact")
    torch.testing.assert_close(pm(ids).logits, qm(ids).logits, rtol=1e-5, atol=1e-5)
    qpass.lower(qm, "onnx", tmp_path / "m")
    model = onnx.load(str(tmp_path / "m" / "model.onnx"), load_external_data=False)
    want = {"fp8_e4m3": onnx.TensorProto.FLOAT8E4M3FN, "fp8_e5m2": onnx.TensorProto.FLOAT8E5M2}[fmt]
    q8 = [n for n in model.graph.node if n.op_type == "QuantizeLinear"
          and any(a.name == "output_dtype" and a.i == want for a in n.attribute)]
    assert q8, "no float8 QuantizeLinear in the exported graph"
    got = onnx_qdq.logits(onnx_qdq.session(str(tmp_path / "m")), ids)
    # E5M2 has 2 mantissa bits: a float-rounding difference upstream (onnxruntime's norms) can move one value
    # across a rounding boundary, a step of up to 1/8 of it; E4M3 stays within float rounding here
    tol = 2e-2 if fmt == "fp8_e5m2" else 1e-4
    torch.testing.assert_close(got.float(), qm(ids).logits.float(), rtol=0, atol=tol)


def test_onnx_refuses_fp4_activations_by_name(tmp_path):
    """Opset 21 has no 4-bit float type: FP4 inputs are refused at lowering, naming the format and the node."""
    pytest.importorskip("onnxruntime")
    qm = qpass.apply(toy.hf_model("llama"), {"passes": [{"quantize": {
        "weights": {"bits": 4, "granularity": "per_channel", "symmetric": True},
        "activations": {"format": "fp4_e2m1", "granularity": "per_tensor"}, "ignore": ["lm_head"]}}]},
        calib_data=CALIB, progress=False)
    with pytest.raises(qpass.UnsupportedOpError, match=r"(?s)fp4_e2m1.*model\.layers\.0"):
        qpass.lower(qm, "onnx", tmp_path / "m")
