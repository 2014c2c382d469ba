"""LLM.int8(): the dynamic quantizer with float columns (formats, the ext op, ExtLinear) and passes/llm_int8.py."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qpass
from qpass.errors import QuantizationError
from qpass.primitives import formats as F
from qpass.primitives import ops
from qpass.primitives import quant as Q
from qpass.quantizer import Quantizer, quantizers
from tests import toy

CALIB = [toy.token_ids(seed=s) for s in range(3)]
W8A8 = {"passes": [{"quantize": {"weights": {"bits": 8, "granularity": "per_channel", "symmetric": True},
                                 "activations": {"bits": 8, "granularity": "per_token", "dynamic": True}}}]}


def _int8(threshold=6.0, **kw):
    return {"passes": [{"llm_int8": {"threshold": threshold, **kw}}]}


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 6), d=st.integers(2, 24), k=st.integers(0, 3), seed=st.integers(0, 1000),
       big=st.floats(1.0, 1e3))
def test_dynamic_float_columns_reference(rows, d, k, seed, big):
    x = torch.randn(rows, d, generator=torch.Generator().manual_seed(seed))
    cols = torch.arange(min(k, d - 1), dtype=torch.int64)
    x[:, cols] *= big
    out = F.fake_quantize_dynamic_ext(x, [1, -1], "int8", True, float_columns=(cols, -1))
    assert torch.equal(out[:, cols], x[:, cols])                              # float columns: exact
    rest = torch.ones(d, dtype=torch.bool)
    rest[cols] = False
    step = x[:, rest].abs().amax(-1, keepdim=True).clamp(min=Q.SCALE_FLOOR) / 127   # scale from the others only
    assert ((out - x)[:, rest].abs() <= step / 2 + 1e-6 * step).all()
    if k == 0:
        assert torch.equal(out, Q.fake_quantize_dynamic(x, [1, -1], "int8", True))   # no column: plain dynamic
    op = ops.fake_quantize_ext(x, None, None, [1, -1], "int8", None, None, None, cols, -1, None, [], "")
    assert torch.equal(op, out)                                               # the op runs the reference


def test_the_dynamic_ext_op_takes_float_columns_only():
    x = torch.randn(3, 8)
    with pytest.raises(QuantizationError, match="float columns only.*zero_point"):
        ops.fake_quantize_ext(x, None, torch.zeros(3, 1), [1, -1], "int8", None, None, None, None, -1, None, [], "")


def test_decomposition_brings_the_error_back_to_the_no_outlier_level():
    """methods.md §2 (d): one input column x50 (its weight column /50, as outlier dimensions meet small weights
    in LLMs): vector-wise int8 alone breaks, with decomposition the error is back to the no-outlier level."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 128, generator=g), torch.randn(96, 128, generator=g) / 128 ** 0.5

    def rel(xx, cols=None):
        w_ = w.clone()
        w_[:, 7] /= xx[0, 7] / x[0, 7]
        ws, _ = Q.choose_qparams(w_, qpass.QSpec(qpass.IntFormat(8)))
        wq = F.fake_quantize_ext(w_, ws, None, [1, -1], "int8", float_columns=None if cols is None else (cols, 1))
        xq = F.fake_quantize_dynamic_ext(xx, [1, -1], "int8", True, float_columns=None if cols is None else (cols, -1))
        return float((xq @ wq.t() - xx @ w_.t()).norm() / (xx @ w_.t()).norm())

    base = rel(x)
    x_out = x.clone()
    x_out[:, 7] *= 50
    assert rel(x_out) > 5 * base                                             # no decomposition: large error
    assert rel(x_out, torch.tensor([7])) < 1.5 * base                        # decomposition: back to normal


class _HugeFeatures(torch.nn.Module):
    """A decoder layer whose norms put 3 hidden features at ~40x (LLMs' emergent outlier dimensions), with the
    matching weight columns divided by 40: the float function is that of the plain layer."""

    def __init__(self, huge: bool):
        super().__init__()
        self.layer = toy.TinyDecoderLayer(d=32, heads=2, ffn=48, seed=3)
        if huge:
            with torch.no_grad():
                for norm, lins in ((self.layer.input_layernorm, ("q_proj", "k_proj", "v_proj")),
                                   (self.layer.post_attention_layernorm, ("gate_proj", "up_proj"))):
                    norm.weight[:3] *= 40
                    for n in lins:
                        getattr(self.layer, n).weight[:, :3] /= 40

    def forward(self, x):
        return self.layer(x)


def _err(model, recipe, x):
    qm = qpass.apply(model, recipe, calib_data=[(x,)], example_inputs=(x,), progress=False)
    return float((qm(x) - model(x)).norm() / model(x).norm()), qm


def test_a_few_huge_input_features_keep_float_quality_where_w8a8_breaks():
    x = toy.seq_input(batch=4, t=12, d=32, seed=2)
    plain, huge = _HugeFeatures(False), _HugeFeatures(True)
    torch.testing.assert_close(huge(x), plain(x), rtol=1e-4, atol=1e-5)       # the same float function
    w8a8_plain, _ = _err(plain, W8A8, x)
    w8a8_huge, _ = _err(huge, W8A8, x)
    int8_huge, qm = _err(huge, _int8(), x)
    stats = qm.report["llm_int8"].stats
    assert stats["linears"] == 7 and stats["with_outliers"] == 5 and stats["outlier_features"] == 15
    assert w8a8_huge > 5 * w8a8_plain                                        # W8A8 breaks on the outliers
    assert int8_huge < 1.5 * w8a8_plain                                      # LLM.int8() does not
    pm = qpass.lower(qm, "torch")                                            # and lowers with parity
    from qpass.backends.torch_packed.ext import ExtLinear
    ext = [m for m in pm.graph_module.modules() if isinstance(m, ExtLinear)]
    assert len(ext) == 5 and all(m.input_float_index.numel() == 3 for m in ext)
    torch.testing.assert_close(pm(x), qm(x), rtol=0, atol=1e-5)


def test_without_outliers_it_is_w8a8_exactly():
    model = toy.hf_model("llama")
    ids = toy.token_ids(batch=2, t=9, seed=4)
    qm = qpass.apply(model, _int8(threshold=1e6, ignore=["lm_head"]), calib_data=CALIB, progress=False)
    ref = qpass.apply(model, {"passes": [{"quantize": {**W8A8["passes"][0]["quantize"], "ignore": ["lm_head"]}}]},
                      progress=False)
    assert qm.report["llm_int8"].stats["with_outliers"] == 0
    assert [(q.op, q.role, q.block) for q in quantizers(qm.graph_module)] == \
        [(q.op, q.role, q.block) for q in quantizers(ref.graph_module)]
    assert torch.equal(qm(ids).logits, ref(ids).logits)


def test_outliers_on_the_bundled_toy_lower_to_torch_and_are_refused_by_onnx_by_name():
    model = toy.hf_model("llama")
    qm = qpass.apply(model, _int8(threshold=0.5, ignore=["lm_head"]), calib_data=CALIB, progress=False)
    ins = [q for q in quantizers(qm.graph_module, role="input") if q.side_channels]
    assert ins and all(q.dynamic and q.symmetric and q.scale is None and q.op == "fake_quantize_ext" for q in ins)
    assert all(q.meta.side == ("float_columns",) for q in ins)
    ids = toy.token_ids(batch=2, t=9, seed=6)
    torch.testing.assert_close(qpass.lower(qm, "torch")(ids).logits, qm(ids).logits, rtol=0, atol=1e-4)
    pytest.importorskip("onnxscript")
    from qpass.backends.onnx_qdq import patterns
    with pytest.raises(qpass.UnsupportedOpError, match=r"(?s)onnx_qdq cannot lower qpass::fake_quantize_ext "
                       r"\(role (weight|input)\): unsupported side channel float_columns.*fix: use the torch"):
        patterns.check_supported(qm.graph_module)


def test_llm_int8_no_op_and_clear_errors():
    model = toy.hf_model("llama")
    qm = qpass.apply(model, _int8(ignore=["*"]), calib_data=CALIB, progress=False)
    assert not quantizers(qm.graph_module)
    with pytest.raises(qpass.RecipeError, match=r"passes\[0\].llm_int8.threshold: must be > 0"):
        qpass.Recipe.from_dict(_int8(threshold=0))
    with pytest.raises(qpass.TargetNotFoundError, match="mlp.up"):
        qpass.apply(model, _int8(targets=["*.mlp.up"]), calib_data=CALIB, progress=False)
    with pytest.raises(QuantizationError, match="(?s)already quantized.*fix"):
        qpass.apply(model, {"passes": [*W8A8["passes"], {"llm_int8": {}}]}, calib_data=CALIB, progress=False)
    with pytest.raises(qpass.CalibrationError, match="activation absmax needs calibration data"):
        qpass.apply(model, _int8(), progress=False)
    assert Quantizer.of(next(iter(qm.graph_module.graph.nodes))) is None
