"""ONNX QDQ backend: what onnxruntime fuses, real integer initializers, parity with the fake-quant graph, the
optimum-style decoder directory and incremental generation."""
import copy
import os

import pytest
import torch

import qpass
from qpass import Recipe
from qpass.quantizer import quantizers
from tests import toy

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
from qpass.backends import onnx_qdq  # noqa: E402  (needs onnx / onnxscript)
from qpass.backends.onnx_qdq import patterns  # noqa: E402

W = {"bits": 8, "granularity": "per_channel", "symmetric": True}
W4G32 = {"bits": 4, "granularity": "per_group", "group_size": 32, "symmetric": True}
A_TOKEN = {"bits": 8, "granularity": "per_token", "dynamic": True}
A_STATIC = {"bits": 8, "granularity": "per_tensor", "symmetric": True}


def recipe(weights, activations=None, **extra):
    q = {"weights": weights, **({"activations": activations} if activations else {}), **extra}
    return Recipe.from_dict({"version": 1, "passes": [{"quantize": q}]})


def mlp_qm(rec):
    """fc1: K=64 (two groups of 32), fc2: K=80 (groups 32, 32 and a partial 16). Inputs [batch, seq, d] like an
    LLM's (with 2-D inputs onnxruntime turns MatMul + bias Add into Gemm before it looks for MatMulNBits)."""
    model = toy.TinyMLP(d=64, hidden=80)
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(0))
    calib = [(torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(s)),) for s in range(2)]
    return qpass.apply(model, rec, calib_data=calib, example_inputs=(x,), progress=False), x


def optimized_ops(path, tmp_path, **config) -> dict[str, int]:
    opt = str(tmp_path / "optimized.onnx")
    onnx_qdq.session(path, optimized_model_path=opt, config=config)
    counts: dict[str, int] = {}
    for n in onnx.load(opt).graph.node:
        key = f"{n.domain + '.' if n.domain else ''}{n.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def run(path, x):
    sess = onnx_qdq.session(path)
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


def test_int4_groups_are_int4_initializers_and_fuse_into_matmulnbits(tmp_path):
    qm, x = mlp_qm(recipe(W4G32))
    art = qpass.lower(qm, "onnx", tmp_path / "m", external_data=True,      # as for models over 2 GB
                      fused_accuracy_level=0)                            # exact (the default 4 is int8 inside)
    assert os.path.isfile(os.path.join(art.path, "model.onnx_data"))
    model = onnx.load(art.model_path)
    inits = {i.name: i for i in model.graph.initializer}
    int4 = [i for i in inits.values() if i.data_type == onnx.TensorProto.INT4]
    assert len(int4) == 2 and not [i for i in inits.values() if i.data_type == onnx.TensorProto.FLOAT and
                                    len(i.dims) == 2 and min(i.dims) > 3]       # no float weight left
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert [a.i for n in dq for a in n.attribute if a.name == "block_size"] == [32, 32]
    assert optimized_ops(art.path, tmp_path)["com.microsoft.MatMulNBits"] == 2
    torch.testing.assert_close(run(art.path, x), qm(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("weights", [W4G32, W], ids=["int4_g32", "int8"])
def test_two_dim_inputs_with_bias_and_relu_still_fuse_into_matmulnbits(tmp_path, weights):
    """OPT flattens tokens to [tokens, d] before fc1 (bias, then ReLU): onnxruntime must not turn the MatMul into
    a (Fused)Gemm that keeps dequantizing the weight at run time."""
    model = toy.TinyMLP(d=64, hidden=80)
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    qm = qpass.apply(model, recipe(weights), example_inputs=(x,), progress=False)
    art = qpass.lower(qm, "onnx", tmp_path / "m", fused_accuracy_level=0)   # exact
    ops = optimized_ops(art.path, tmp_path)
    assert ops.get("com.microsoft.MatMulNBits") == 2 and "DequantizeLinear" not in ops, ops
    assert not {"Gemm", "com.microsoft.FusedGemm"} & set(ops), ops
    torch.testing.assert_close(run(art.path, x), qm(x), atol=1e-5, rtol=1e-5)


def test_full_range_int4_negative_scales_lower_exactly_to_matmulnbits(tmp_path):
    qm, x = mlp_qm(recipe({**W4G32, "full_range": True}))
    scales = [v for k, v in qm.graph_module.state_dict().items() if k.endswith("weight_scale")]
    assert scales and all(bool((s < 0).any()) and bool((s > 0).any()) for s in scales)
    art = qpass.lower(qm, "onnx", tmp_path / "m", fused_accuracy_level=0)   # exact
    assert optimized_ops(art.path, tmp_path)["com.microsoft.MatMulNBits"] == 2
    torch.testing.assert_close(run(art.path, x), qm(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activations", [A_TOKEN, A_STATIC], ids=["per_token", "static"])
def test_w8a8_fuses_into_integer_matmuls(tmp_path, activations):
    qm, x = mlp_qm(recipe(W, activations))
    art = qpass.lower(qm, "onnx", tmp_path / "m")
    ops = optimized_ops(art.path, tmp_path)
    assert ops.get("com.microsoft.MatMulIntegerToFloat", 0) + ops.get("com.microsoft.DynamicQuantizeMatMul", 0) == 2
    assert "MatMul" not in ops
    torch.testing.assert_close(run(art.path, x), qm(x), atol=1e-4, rtol=1e-4)


def test_w4a8_is_matmulnbits_with_int8_activations(tmp_path):
    qm, x = mlp_qm(recipe(W4G32, A_TOKEN))
    art = qpass.lower(qm, "onnx", tmp_path / "m")
    nbits = [n for n in onnx.load(art.model_path).graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 2 and {a.name: a.i for a in nbits[0].attribute}["accuracy_level"] == 4
    ref = qm(x).detach()
    assert float((run(art.path, x) - ref).abs().max()) < 0.02 * float(ref.abs().max())
    exact = copy.deepcopy(qm.graph_module)            # the exact, unfused alternative, checked before export
    report = patterns.rewrite(exact, onnx_qdq.LowerOptions(w4a8="qdq"))
    assert all("Q/DQ input" in r.form for r in report.rows)
    torch.testing.assert_close(exact(x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("weights", [
    {"format": "nf4", "granularity": "per_group", "group_size": 32},
    {"format": "fp4_e2m1", "granularity": "per_group", "group_size": 32},
    {"format": "fp8_e4m3", "granularity": "per_channel"},
    {"format": "fp8_e5m2", "granularity": "per_tensor"},
], ids=["nf4_g32", "fp4_g32", "fp8e4m3_channel", "fp8e5m2_tensor"])
def test_float_format_weights_are_grid_gather_matmul_with_parity(weights, tmp_path):
    """fp4 / nf4 / fp8 weights: uint8 codes [K, N] decoded by Gather from the format's value grid, times the scale
    of each element's block (fc2's last group is partial), MatMul; onnxruntime equals the fake-quant graph.
    Over 8192 weights a linear: torch.onnx's exporter folds constant subgraphs of smaller inputs into floats."""
    model = toy.TinyMLP(d=96, hidden=112)
    x = torch.randn(2, 3, 96, generator=torch.Generator().manual_seed(0))
    qm = qpass.apply(model, recipe(weights), example_inputs=(x,), progress=False)
    art = qpass.lower(qm, "onnx", tmp_path / "m")
    assert [r.form for r in art.report.rows] == [f"{weights['format']} {weights['granularity']}: "
                                                 "Gather(grid) * scale + MatMul"] * 2
    model = onnx.load(art.model_path)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Gather") == 4 and ops.count("MatMul") == 2 and "DequantizeLinear" not in ops
    codes = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.UINT8 and len(i.dims) == 2]
    assert sorted(tuple(i.dims) for i in codes) == [(96, 112), (112, 96)]           # [K, N], one byte a weight
    torch.testing.assert_close(run(art.path, x), qm(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activations", [
    {"bits": 6, "granularity": "per_tensor", "symmetric": True},
    {"bits": 3, "granularity": "per_tensor", "symmetric": True},
    {"bits": 5, "granularity": "per_channel", "axis": -1, "symmetric": False},
    {"bits": 6, "granularity": "per_channel", "axis": -1, "symmetric": True},
    {"bits": 6, "granularity": "per_token", "dynamic": True, "symmetric": False},
    {"bits": 3, "granularity": "per_token", "dynamic": True},
    {"bits": 8, "granularity": "per_token", "dynamic": True, "symmetric": False},
], ids=["a6_static", "a3_static", "a5_per_channel_asym", "a6_per_channel", "a6_token_asym", "a3_token",
        "a8_token_asym"])
def test_activations_below_8_bits_clip_codes_to_their_own_range(activations, tmp_path):
    """int2..int7 (not 4) codes are Q/DQ through INT8 / UINT8, whose Q saturates at +-127 / 255: an integer Clip to
    the format's range must follow the Q. Inputs 4x the calibration range make the static codes saturate. 8-bit
    codes with a zero point per channel / token dequantize as (q - zp) * scale (onnxruntime's MatMulIntegerToFloat,
    which it would fuse the DequantizeLinear into, refuses a per-row zero point)."""
    qm, x = mlp_qm(recipe(W, activations))
    art = qpass.lower(qm, "onnx", tmp_path / "m", fused_accuracy_level=0)
    nodes = onnx.load(art.model_path).graph.node
    made_by = {o: n.op_type for n in nodes for o in n.output}
    clips = [n for n in nodes if n.op_type == "Clip" and made_by.get(n.input[0]) == "QuantizeLinear"]
    assert len(clips) == (2 if activations["bits"] < 8 else 0)              # one per linear input, on the codes
    assert "Clip" in optimized_ops(art.path, tmp_path)                      # onnxruntime keeps it
    big = 4 * x
    if not activations.get("dynamic"):
        gm = qm.graph_module
        q = quantizers(gm, role="input")[0]                                     # fc1's input: x itself
        s = getattr(gm, q.scale.target)
        codes = (big / s).round() + (0 if q.zero_point is None else getattr(gm, q.zero_point.target))
        assert float(codes.max()) > 2 ** (activations["bits"] - activations["symmetric"]) - 1   # saturates
    torch.testing.assert_close(run(art.path, big), qm(big), atol=1e-5, rtol=1e-5)


def test_non_integer_formats_are_refused_with_the_node(tmp_path):
    """FP4 activations: opset 21 has no 4-bit float type (weights lower through Gather; inputs would need a
    data-dependent rounding to the grid)."""
    qm, _ = mlp_qm(recipe(W4G32, {"format": "fp4_e2m1", "granularity": "per_tensor"}))
    with pytest.raises(qpass.UnsupportedOpError, match=r"(?s)fp4_e2m1.*fc1.*fix: use the torch backend"):
        qpass.lower(qm, "onnx", tmp_path / "m")
    assert not os.path.exists(tmp_path / "m")


# -------------------------------------------------------------------------------- optimum-style quantizer
# (the decoder directory itself, its optimum I/O names and incremental generation: tests/test_lower_cli.py,
# which lowers the toy Llama once through tools/lower.py)


def test_optimum_style_quantizer_runs_qpass_then_lowers(tmp_path, monkeypatch):
    src = toy.save_hf_dir(tmp_path / "llama")
    calls = {}
    monkeypatch.setattr(qpass, "lower", lambda qm, backend, out, **kw: calls.update(backend=backend, out=out, **kw))
    q = onnx_qdq.QpassOnnxQuantizer.from_pretrained(src)
    rec = recipe(W, A_STATIC, ignore=["lm_head"])
    saved = q.quantize(save_dir=tmp_path / "out", recipe=rec, calib_data=["the cat sat on the mat"],
                       progress_bar=False, w4a8="qdq")
    assert saved == tmp_path / "out" and calls == {"backend": "onnx", "out": tmp_path / "out", "w4a8": "qdq",
                                                   "tokenizer_dir": src}
    assert q.quantized.report["quantize"].stats["inputs_quantized"] == 14      # calibrated from the text
    with pytest.raises(qpass.ArtifactError, match="file_prefix"):
        q.quantize(save_dir=tmp_path / "x", file_prefix="decoder_model", recipe=rec)
