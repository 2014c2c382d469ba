"""Clipping ratios of dynamic quantizers (QuaRot's a_clip_ratio / k_clip_ratio / v_clip_ratio) and the weight clip
search (QuaRot's w_clip): the primitive against an independent reference, 1.0 unchanged, the recipe's checks, plans
and save/load, and parity of the torch and ONNX backends."""
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qpass
from qpass import Recipe
from qpass.errors import QuantizationError, RecipeError
from qpass.plan import plans_from_json, plans_to_json
from qpass.primitives import ops
from qpass.primitives import quant as Q
from qpass.primitives.gptq import clipped_qparams, gptq_quantize
from qpass.primitives.spec import IntFormat, PerChannel, PerToken, QSpec
from qpass.quantizer import quantizers, spec_from_dict, spec_to_dict
from qpass.recipe import qspec_from_dict, qspec_to_dict
from tests import toy

W4 = {"bits": 4, "granularity": "per_channel", "symmetric": True}
A4 = {"bits": 4, "granularity": "per_token", "dynamic": True}
KV4 = {"bits": 4, "granularity": "per_head", "dynamic": True}


def quarot_reference(x: torch.Tensor, bits: int, symmetric: bool, c: float) -> torch.Tensor:
    """QuaRot's ActQuantizer (fake_quant/quant_utils.py), per token, written out in float64 for the test."""
    x = x.double()
    xmin = torch.minimum(x.amin(-1, keepdim=True), torch.zeros(())) * c
    xmax = torch.maximum(x.amax(-1, keepdim=True), torch.zeros(())) * c
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        s = torch.maximum(xmin.abs(), xmax) / qmax
        return torch.clamp(torch.round(x / s), -(qmax + 1), qmax) * s
    qmax = 2**bits - 1
    s = (xmax - xmin) / qmax
    z = torch.round(-xmin / s)
    return (torch.clamp(torch.round(x / s) + z, 0, qmax) - z) * s


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([4, 8]), symmetric=st.booleans(), c=st.floats(0.5, 1.0), seed=st.integers(0, 1000))
def test_clipped_dynamic_quantizer_equals_quarots(bits, symmetric, c, seed):
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(seed)) * 3 + (0 if symmetric else 1)
    got = ops.fake_quantize_dynamic(x, [1, 1, -1], f"int{bits}", symmetric, c)
    ref = quarot_reference(x, bits, symmetric, c).float()
    step = x.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
    # equal up to float32 vs float64 rounding of x / s (a code may differ by one at an exact .5 tie)
    assert bool(((got - ref).abs() <= 1e-5 * step + 1e-6).float().mean() > 0.99)
    assert bool(((got - ref).abs() <= step * 1.001).all())


def test_clip_ratio_one_is_min_max_bit_for_bit_and_keeps_the_four_argument_node():
    x = torch.randn(4, 7, 48, generator=torch.Generator().manual_seed(0)) * 2
    for symmetric in (True, False):
        for block in ([1, 1, -1], [1, 1, 16]):
            minmax = Q.fake_quantize(x, *Q.dynamic_qparams(x, block, "int4", symmetric), block, "int4")
            assert torch.equal(ops.fake_quantize_dynamic(x, block, "int4", symmetric), minmax)
            assert torch.equal(ops.fake_quantize_dynamic(x, block, "int4", symmetric, 1.0), minmax)
    qm = qpass.apply(toy.hf_model("llama"), {"passes": [{"quantize": {"weights": W4, "activations": A4}},
                                                      {"kv_cache": {"keys": KV4, "values": KV4}}]}, progress=False)
    dyn = [q for q in quantizers(qm.graph_module) if q.dynamic]
    assert dyn and all(len(q.node.args) == 4 and q.clip_ratio == 1.0 for q in dyn)


def test_clipping_saturates_the_largest_values_and_shrinks_the_step():
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    s1, _ = Q.dynamic_qparams(x, [1, -1], "int4", True)
    s9, _ = Q.dynamic_qparams(x, [1, -1], "int4", True, 0.9)
    torch.testing.assert_close(s9, 0.9 * s1, rtol=1e-6, atol=0)
    y = Q.fake_quantize_dynamic(x, [1, -1], "int4", True, 0.9)
    assert bool((y.abs().amax(-1) <= 8 * s9.squeeze(-1) + 1e-6).all())    # saturated at the clipped grid
    assert Q.token_scale(x, "int4", 0.9).equal(s9)                       # the fast path's scale, bit for bit
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(QuantizationError, match="clip_ratio"):
            ops.fake_quantize_dynamic(x, [1, -1], "int4", True, bad)


@pytest.mark.parametrize("value,match", [(0, r"\(0, 1\]"), (1.2, r"\(0, 1\]"), ("0.9", "number"), (True, "number")])
def test_recipe_refuses_a_clip_ratio_out_of_range_with_its_path(value, match):
    with pytest.raises(RecipeError, match=r"passes\[0\]\.quantize\.activations\.clip_ratio.*" + match):
        Recipe.from_dict({"version": 1, "passes": [{"quantize": {"weights": W4,
                                                                  "activations": {**A4, "clip_ratio": value}}}]})


def test_recipe_refuses_clip_ratio_on_static_or_float_quantizers_and_weight_clip_without_int_weights():
    with pytest.raises(RecipeError, match=r"weights\.clip_ratio.*dynamic"):
        Recipe.from_dict({"version": 1, "passes": [{"quantize": {"weights": {**W4, "clip_ratio": 0.9}}}]})
    with pytest.raises(RecipeError, match=r"keys\.clip_ratio.*int"):
        Recipe.from_dict({"version": 1, "passes": [{"kv_cache": {"keys": {"format": "fp8_e4m3", "granularity":
                                                                          "per_head", "dynamic": True,
                                                                          "clip_ratio": 0.9}}}]})
    with pytest.raises(RecipeError, match="weight_clip"):
        Recipe.from_dict({"version": 1, "passes": [{"quantize": {"weights": None, "activations": A4,
                                                                  "weight_clip": True}}]})
    with pytest.raises(ValueError, match="clip_ratio"):
        QSpec(IntFormat(8), PerChannel(0), clip_ratio=0.9)               # static: the dataclass refuses it too


def test_specs_plans_and_saved_models_keep_the_clip_ratio(tmp_path):
    spec = QSpec(IntFormat(4), PerToken(), dynamic=True, clip_ratio=0.9)
    assert qspec_from_dict(qspec_to_dict(spec), "x") == spec and spec_from_dict(spec_to_dict(spec)) == spec
    assert "clip_ratio" not in qspec_to_dict(QSpec(IntFormat(4), PerToken(), dynamic=True))   # 1.0: as before
    kv = {"bits": 4, "granularity": "per_token", "clip_ratio": 0.95}    # the shorthand: one spec for K and V
    rec = {"version": 1, "passes": [{"quantize": {"weights": W4, "weight_clip": True,
                                                  "activations": {**A4, "clip_ratio": 0.9}, "ignore": ["lm_head"]}},
                                    {"kv_cache": kv}]}
    qm = qpass.apply(toy.hf_model("llama"), rec, progress=False)
    assert {(q.role, q.clip_ratio) for q in quantizers(qm.graph_module) if q.dynamic} == \
        {("input", 0.9), ("key", 0.95), ("value", 0.95)}
    data = json.loads(json.dumps(plans_to_json(qm.plans)))
    assert plans_from_json(data, "test") == list(qm.plans)
    assert {q["meta"]["spec"].get("clip_ratio") for p in data for q in p["quantizers"]} >= {0.9, 0.95}
    qm.save(tmp_path / "m")
    loaded = qpass.load(tmp_path / "m")
    ids = toy.token_ids(batch=2, t=9, seed=2)
    assert torch.equal(loaded(ids).logits, qm(ids).logits)
    assert {q.clip_ratio for q in quantizers(loaded.graph_module) if q.dynamic} == {0.9, 0.95}


def test_weight_clip_search_never_loses_to_min_max_and_gptq_takes_it():
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(3))
    w[:, 5] *= 6                                                         # an outlier column: clipping pays
    spec = QSpec(IntFormat(4), PerChannel(0))
    s0, _ = Q.choose_qparams(w, spec, block_size=(1, -1))
    s1, _ = clipped_qparams(w, spec, (1, -1))
    err = lambda s: (Q.fake_quantize(w, s, None, [1, -1], "int4") - w).abs().pow(2.4).sum(1)   # noqa: E731
    assert bool((s1 <= s0).all()) and bool((err(s1) <= err(s0)).all()) and bool((s1 < s0).any())
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(4))
    h = 2 * x.t() @ x
    res = gptq_quantize(w, h, spec, clip=True)
    assert torch.equal(Q.fake_quantize(res.weight, res.scale, None, [1, -1], "int4"), res.weight)
    assert not torch.equal(res.scale, gptq_quantize(w, h, spec).scale)
    rec = {"version": 1, "passes": [{"quantize": {"weights": W4, "weight_clip": True, "ignore": ["lm_head"]}}]}
    base = {"version": 1, "passes": [{"quantize": {"weights": W4, "ignore": ["lm_head"]}}]}
    model = toy.hf_model("llama")
    def scales(qm):
        return [qm.graph_module.get_buffer(q.scale.target) for q in quantizers(qm.graph_module, "weight")]
    clipped, plain = scales(qpass.apply(model, rec, progress=False)), scales(qpass.apply(model, base, progress=False))
    assert all(bool((a <= b).all()) for a, b in zip(clipped, plain)) and any(not a.equal(b)
                                                                          for a, b in zip(clipped, plain))


def _w4a4kv4_clipped():
    rec = {"version": 1, "passes": [{"rotate": {"seed": 1, "online": True, "heads": True}},
                                    {"quantize": {"weights": W4, "activations": {**A4, "clip_ratio": 0.9},
                                                  "ignore": ["lm_head"]}},
                                    {"kv_cache": {"keys": {**KV4, "clip_ratio": 0.95},
                                                  "values": {**KV4, "clip_ratio": 0.95}}}]}
    return qpass.apply(toy.hf_model("llama"), rec, progress=False)


@pytest.mark.parametrize("kernels", ["exact", "auto"])
def test_torch_backend_keeps_the_clip_ratio_with_parity(kernels):
    from qpass.backends.torch_packed import PackedKVCache, PackedLinear

    qm = _w4a4kv4_clipped()
    pm = qpass.lower(qm, "torch", kernels=kernels)
    ids = toy.token_ids(batch=2, t=12, seed=5)
    torch.testing.assert_close(pm(ids).logits, qm(ids).logits, rtol=1e-5, atol=1e-5)
    lin = [m for m in pm.graph_module.modules() if isinstance(m, PackedLinear) and m.act is not None]
    assert lin and {m.act.clip_ratio for m in lin} == {0.9} and not any(m.act.fast for m in lin)
    prompt = toy.token_ids(1, 5)
    assert torch.equal(pm.generate(prompt, max_new_tokens=4), qm.generate(prompt, max_new_tokens=4))
    kv = [m for m in pm.decode_graph(16).modules() if isinstance(m, PackedKVCache)]
    assert kv and {m.clip_ratio for m in kv} == {0.95} and not any(m._native_bits for m in kv)
    k = torch.randn(1, 2, 3, 8, generator=torch.Generator().manual_seed(0))
    cache = PackedKVCache((1, 2, 6, 8), "int4", [1, 1, 1, -1], True, clip_ratio=0.95)
    got = cache(k, torch.arange(3))[:, :, :3]
    assert torch.equal(got, Q.fake_quantize_dynamic(k, [1, 1, 1, -1], "int4", True, 0.95))


def test_onnx_lowers_the_clip_ratio_as_one_mul_with_parity(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx

    from qpass.backends import onnx_qdq

    qm = _w4a4kv4_clipped()
    qpass.lower(qm, "onnx", tmp_path / "m")
    ids = toy.token_ids(batch=1, t=9, seed=4)
    ref = qm(ids).logits.float()
    got = onnx_qdq.logits(onnx_qdq.session(str(tmp_path / "m")), ids).float()
    torch.testing.assert_close(got, ref, rtol=0, atol=5e-3)
    model = onnx.load(str(tmp_path / "m" / "model.onnx"), load_external_data=False)
    consts = {n.output[0]: onnx.numpy_helper.to_array(a.t) for n in model.graph.node if n.op_type == "Constant"
              for a in n.attribute if a.name == "value"}
    consts.update({i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer})
    ratios = sorted({round(float(consts[i]), 4) for n in model.graph.node if n.op_type == "Mul" for i in n.input
                     if i in consts and consts[i].size == 1 and round(float(consts[i]), 4) in (0.9, 0.95)})
    assert ratios == [0.9, 0.95]
