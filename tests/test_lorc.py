"""LoRC (passes/lorc.py): low-rank compensation of the weight quantization error, lowering and byte counts."""
import pytest
import torch

import qpass
from qpass.errors import QuantizationError
from qpass.eval import weight_bytes
from qpass.graph import META_ORIGIN, linear_sites, op_counts, param_of
from qpass.passes.lorc import META_LORC
from qpass.primitives import quant as Q
from tests import toy

CALIB = [toy.token_ids(seed=s) for s in range(3)]
W3G = {"bits": 3, "granularity": "per_group", "group_size": 16, "symmetric": True}
W4G = {"bits": 4, "granularity": "per_group", "group_size": 16, "symmetric": True}
A8 = {"bits": 8, "granularity": "per_token", "dynamic": True}
IDS = toy.token_ids(batch=2, t=9, seed=5)


@pytest.fixture(scope="module")
def model():
    return toy.hf_model("llama")


def _quantize(weights=W3G, **kw):
    return {"quantize": {"weights": weights, "ignore": ["lm_head"], **kw}}


def _err(qm, model):
    return float((qm(IDS).logits - model(IDS).logits).detach().pow(2).mean())


def test_branches_are_the_truncated_svd_of_the_error_eckart_young(model):
    base = qpass.apply(model, {"passes": [_quantize()]}, progress=False)
    left, errs = [], []
    for rank in (1, 4, 16):
        qm = qpass.apply(model, {"passes": [_quantize(), {"lorc": {"rank": rank}}]}, progress=False)
        gm, stats = qm.graph_module, qm.report["lorc"].stats
        registry = gm.meta[META_LORC]
        assert stats["branches"] == len(registry) == 14 and stats["float_weight_from"] == {"graph": 14, "model": 0}
        site = next(s for s in linear_sites(gm) if s.path == "model.layers.0.mlp.down_proj")
        r_name, l_name = registry[site.path]
        lr = gm.get_parameter(l_name).detach().double() @ gm.get_parameter(r_name).detach().double()
        q = base.graph_module
        w = param_of(q, next(s for s in linear_sites(q) if s.path == site.path).weight).double()
        fq = next(s for s in linear_sites(q) if s.path == site.path).weight_use
        w_hat = Q.fake_quantize(w, q.get_buffer(fq.args[1].target).double(), None, fq.args[3], fq.args[4])
        sv = torch.linalg.svdvals(w - w_hat)
        tail = float(sv[min(rank, sv.numel()):].pow(2).sum())
        assert abs(float((w - w_hat - lr).pow(2).sum()) - tail) <= 1e-4 * float(sv.pow(2).sum())
        assert stats["error_left"][site.path] == pytest.approx(tail / float(sv.pow(2).sum()), rel=1e-6, abs=1e-9)
        left.append(stats["mean_error_left"])
        errs.append(_err(qm, model))
    assert left[0] > left[1] > left[2] and errs[0] > errs[2] and errs[2] < _err(base, model)
    full = qpass.apply(model, {"passes": [_quantize(), {"lorc": {"rank": 64}}]}, progress=False)   # full rank: exact
    assert full.report["lorc"].stats["mean_error_left"] < 1e-12
    torch.testing.assert_close(full(IDS).logits, model(IDS).logits, rtol=0, atol=1e-4)


def test_lorc_fires_adds_two_skinny_linears_per_linear_and_counts_its_bytes(model):
    base = qpass.apply(model, {"passes": [_quantize()]}, progress=False)
    qm = qpass.apply(model, {"passes": [_quantize(), {"lorc": {"rank": 4}}]}, progress=False)
    before, after = op_counts(base.graph_module), op_counts(qm.graph_module)
    assert after["aten.linear.default"] - before["aten.linear.default"] == 28
    assert after["aten.add.Tensor"] - before["aten.add.Tensor"] == 14
    assert [s.path for s in linear_sites(qm.graph_module)] == [s.path for s in linear_sites(base.graph_module)]
    assert {n.meta.get(META_ORIGIN) for n in qm.graph_module.graph.nodes
            if n.op == "call_function" and n.target is torch.ops.aten.linear.default} == {None, "lorc"}
    stats = qm.report["lorc"].stats
    assert stats["added_params"] == 4 * sum(sum(param_of(qm.graph_module, s.weight).shape)
                                            for s in linear_sites(qm.graph_module) if s.path != "lm_head")
    wb, plain = weight_bytes(qm), weight_bytes(base)
    assert wb["linear_weight_bytes"] == plain["linear_weight_bytes"] + stats["added_bytes_fp32"]
    assert wb["quantized_bits_per_weight"] > plain["quantized_bits_per_weight"]


def test_after_gptq_the_error_is_taken_against_the_float_model_and_helps(model):
    gptq = qpass.apply(model, {"passes": [_quantize(), {"gptq": {}}]}, calib_data=CALIB, progress=False)
    qm = qpass.apply(model, {"passes": [_quantize(), {"gptq": {}}, {"lorc": {"rank": 4}}]}, calib_data=CALIB,
                     progress=False)
    assert qm.report["lorc"].stats["float_weight_from"] == {"graph": 0, "model": 14}
    assert _err(qm, model) < 0.7 * _err(gptq, model)
    with pytest.raises(QuantizationError, match=r"(?s)re-rounded in place.*fix: run lorc in the same qpass.apply"):
        qpass.apply(gptq, {"passes": [{"lorc": {}}]}, progress=False)        # continuing: no float model


@pytest.mark.parametrize("activations", [None, A8], ids=["w4a16", "w4a8"])
def test_lorc_lowers_to_both_backends_with_parity(model, activations, tmp_path):
    pytest.importorskip("onnxruntime")
    from qpass.backends import onnx_qdq

    quant = _quantize(W4G, **({"activations": activations} if activations else {}))
    qm = qpass.apply(model, {"passes": [quant, {"lorc": {"rank": 4}}]}, progress=False)
    ref = qm(IDS).logits.detach()
    torch.testing.assert_close(qpass.lower(qm, "torch")(IDS).logits, ref, rtol=0, atol=1e-4)
    art = qpass.lower(qm, "onnx", tmp_path / "onnx", fused_accuracy_level=0)
    got = onnx_qdq.logits(art.path, IDS)
    if activations is None:
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    else:   # MatMulNBits with int8 activations (approximate, as without LoRC: tests/test_onnx_qdq.py)
        assert float((got - ref).abs().max()) < 0.02 * float(ref.abs().max())


def test_nothing_to_do_is_a_no_op_and_mistakes_are_clear_errors(model):
    qm = qpass.apply(model, {"passes": [_quantize(), {"lorc": {"ignore": ["*"]}}]}, progress=False)
    assert qm.report["lorc"].stats["branches"] == 0 and not qm.graph_module.meta.get(META_LORC)
    with pytest.raises(QuantizationError, match="(?s)no quantized weights.*fix: place lorc after"):
        qpass.apply(model, {"passes": [{"lorc": {}}]}, progress=False)
    with pytest.raises(qpass.RecipeError, match="already has a LoRC branch"):
        qpass.apply(model, {"passes": [_quantize(), {"lorc": {}}, {"lorc": {}}]}, progress=False)
    with pytest.raises(qpass.TargetNotFoundError, match="q_prj"):
        qpass.apply(model, {"passes": [_quantize(), {"lorc": {"targets": ["*.q_prj"]}}]}, progress=False)
    for cfg, msg in [({"rank": 0}, "rank: must be"), ({"targets": []}, "targets")]:
        with pytest.raises(qpass.RecipeError, match=msg):
            qpass.Recipe.from_dict({"passes": [{"lorc": cfg}]})
