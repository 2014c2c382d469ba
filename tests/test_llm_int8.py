"""LLM.int8(): the dynamic quantizer with float columns, fixed (static) or found per call by a threshold (formats,
the ext op, the quantizer IR, PackedLinear / ExtLinear, onnx_qdq's int8_outlier_matmul) and passes/llm_int8.py."""
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


def _static(threshold=6.0, **kw):
    return _int8(threshold, outliers="static", **kw)


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


def test_static_a_few_huge_input_features_keep_float_quality_where_w8a8_breaks():
    x = toy.seq_input(batch=4, t=12, d=32, seed=2)
    plain, huge = _HugeFeatures(False), _HugeFeatures(True)
    torch.testing.assert_close(huge(x), plain(x), rtol=1e-4, atol=1e-5)       # the same float function
    w8a8_plain, _ = _err(plain, W8A8, x)
    w8a8_huge, _ = _err(huge, W8A8, x)
    int8_huge, qm = _err(huge, _static(), x)
    stats = qm.report["llm_int8"].stats
    assert stats["linears"] == 7 and stats["with_outliers"] == 5 and stats["outlier_features"] == 15
    assert w8a8_huge > 5 * w8a8_plain                                        # W8A8 breaks on the outliers
    assert int8_huge < 1.5 * w8a8_plain                                      # LLM.int8() does not
    pm = qpass.lower(qm, "torch", kernels="exact")           # and lowers with parity (exact kernels: no bf16)
    from qpass.backends.torch_packed.ext import ExtLinear
    ext = [m for m in pm.graph_module.modules() if isinstance(m, ExtLinear)]
    assert len(ext) == 5 and all(m.input_float_index.numel() == 3 for m in ext)
    torch.testing.assert_close(pm(x), qm(x), rtol=0, atol=1e-5)


def test_static_without_outliers_it_is_w8a8_exactly():
    model = toy.hf_model("llama")
    ids = toy.token_ids(batch=2, t=9, seed=4)
    qm = qpass.apply(model, _static(threshold=1e6, ignore=["lm_head"]), calib_data=CALIB, progress=False)
    ref = qpass.apply(model, {"passes": [{"quantize": {**W8A8["passes"][0]["quantize"], "ignore": ["lm_head"]}}]},
                      progress=False)
    assert qm.report["llm_int8"].stats["with_outliers"] == 0
    assert [(q.op, q.role, q.block) for q in quantizers(qm.graph_module)] == \
        [(q.op, q.role, q.block) for q in quantizers(ref.graph_module)]
    assert torch.equal(qm(ids).logits, ref(ids).logits)


def test_static_outliers_on_the_bundled_toy_lower_to_torch_and_are_refused_by_onnx_by_name():
    model = toy.hf_model("llama")
    qm = qpass.apply(model, _static(threshold=0.5, ignore=["lm_head"]), calib_data=CALIB, progress=False)
    ins = [q for q in quantizers(qm.graph_module, role="input") if q.side_channels]
    assert ins and all(q.dynamic and q.symmetric and q.scale is None and q.op == "fake_quantize_ext" for q in ins)
    assert all(q.meta.side == ("float_columns",) for q in ins)
    ids = toy.token_ids(batch=2, t=9, seed=6)
    pm = qpass.lower(qm, "torch", kernels="exact")
    torch.testing.assert_close(pm(ids).logits, qm(ids).logits, rtol=0, atol=1e-4)
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
        qpass.apply(model, _static(), progress=False)
    assert Quantizer.of(next(iter(qm.graph_module.graph.nodes))) is None


# ------------------------------------------------------------------------------ dynamic (per call): the default


def _reference_decomposition(x, w, b, t):
    """The paper's decomposition written out by column selection (independent of qpass): O = the columns of x
    [M, K] with max |x| >= t; int8 per-row weights over every column; int8 per-token inputs over the columns
    not in O; y = Q(x[:, ~O]) Q(W)[:, ~O]^T + x[:, O] Q(W)[:, O]^T + b."""
    o = x.abs().amax(0) >= t
    sw = (w.abs().amax(1, keepdim=True) / 127).clamp(min=Q.SCALE_FLOOR)
    wq = (w / sw).round().clamp(-128, 127) * sw
    xr = x[:, ~o]
    sx = (xr.abs().amax(1, keepdim=True) / 127).clamp(min=Q.SCALE_FLOOR)
    xq = (xr / sx).round().clamp(-128, 127) * sx
    return xq @ wq[:, ~o].t() + x[:, o] @ wq[:, o].t() + b, o


@settings(max_examples=60, deadline=None)
@given(shape=st.sampled_from([(1, 5), (4, 16), (2, 3, 24)]), k=st.integers(0, 3), seed=st.integers(0, 1000),
       big=st.floats(1.0, 1e3), t=st.sampled_from([0.5, 6.0]))
def test_threshold_columns_reference(shape, k, seed, big, t):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    x[..., :k] *= big
    out = F.fake_quantize_dynamic_ext(x, [1] * (x.dim() - 1) + [-1], "int8", True, threshold=(t, -1))
    flat = x.reshape(-1, shape[-1])
    o = flat.abs().amax(0) >= t                                               # this call's columns
    assert torch.equal(F.threshold_columns(x, t, -1), o)
    assert torch.equal(out[..., o], x[..., o])                                # float columns: exact
    fixed = F.fake_quantize_dynamic_ext(x, [1] * (x.dim() - 1) + [-1], "int8", True,
                                        float_columns=(torch.nonzero(o).flatten(), -1))
    assert torch.equal(out, fixed)                                            # = the fixed set it found
    op = ops.fake_quantize_ext(x, None, None, [1] * (x.dim() - 1) + [-1], "int8", None, None, None, None, -1, None,
                               [], "", None, t)
    assert torch.equal(op, out)                                               # the op runs the reference


def test_threshold_columns_op_errors():
    x = torch.randn(3, 8)
    with pytest.raises(QuantizationError, match="fixed float columns or a float threshold, not both"):
        ops.fake_quantize_ext(x, None, None, [1, -1], "int8", None, None, None, torch.tensor([0]), -1, None, [], "",
                              None, 6.0)
    with pytest.raises(QuantizationError, match="needs a dynamic quantizer"):
        ops.fake_quantize_ext(x, torch.ones(3, 1), None, [1, -1], "int8", None, None, None, None, -1, None, [], "",
                              None, 6.0)
    with pytest.raises(QuantizationError, match="float_threshold must be > 0"):
        ops.fake_quantize_ext(x, None, None, [1, -1], "int8", None, None, None, None, -1, None, [], "", None, 0.0)


def _linear_model(seed=0, d=32, n=24):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(d, n)).eval()


def test_dynamic_fires_and_matches_the_reference_decomposition_fake_quant_and_torch():
    model = _linear_model()
    x = torch.randn(12, 32, generator=torch.Generator().manual_seed(1))
    x[3, 5], x[7, 9] = 40.0, -9.0                                             # two columns cross 6 in this call
    qm = qpass.apply(model, _int8(), example_inputs=(x,), progress=False)    # no calibration data needed
    qs = quantizers(qm.graph_module)
    assert [(q.op, q.role, q.side_channels.names) for q in qs] == \
        [("fake_quantize", "weight", ()), ("fake_quantize_ext", "input", ("threshold_columns",))]
    assert qs[1].side_channels.threshold_columns.threshold == 6.0 and qs[1].dynamic and qs[1].symmetric
    assert qm.report["llm_int8"].stats == {"linears": 1, "outliers": "dynamic", "threshold": 6.0}
    fc = model[0]
    with torch.no_grad():
        ref, o = _reference_decomposition(x, fc.weight, fc.bias, 6.0)
        assert o.sum() == 2
        torch.testing.assert_close(qm(x), ref, rtol=0, atol=1e-5)
        y2 = x.clone()
        y2[:, 5] /= 40                                                        # another call, another set
        torch.testing.assert_close(qm(y2), _reference_decomposition(y2, fc.weight, fc.bias, 6.0)[0], rtol=0, atol=1e-5)
        from qpass.backends.torch_packed.linear import PackedLinear
        for kernel in ("dequant", "int_mm"):                                 # int8 GEMM + the float columns
            pm = qpass.lower(qm, "torch", kernels={1: kernel, 8: kernel, 128: kernel})
            mod = next(m for m in pm.graph_module.modules() if isinstance(m, PackedLinear))
            assert mod.act.threshold == 6.0 and mod.wf.layout == "int8" and mod.plan[128] == kernel
            for inp in (x, y2, x[:1]):
                torch.testing.assert_close(pm(inp), qm(inp), rtol=0, atol=1e-5)


class _Mlp(torch.nn.Module):
    """fc2(relu(fc1(x))); `huge`: fc1's first 3 input columns divided by 40, so inputs with those features x40
    compute the plain function (outlier features meet small weights, as in LLMs)."""

    def __init__(self, huge: bool):
        super().__init__()
        torch.manual_seed(5)
        self.fc1, self.fc2 = torch.nn.Linear(32, 48), torch.nn.Linear(48, 32)
        if huge:
            with torch.no_grad():
                self.fc1.weight[:, :3] /= 40

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_features_huge_only_in_the_eval_input_dynamic_keeps_float_quality_static_does_not():
    """The issue's case: calibration inputs have no feature near the threshold; at run time 3 features are x40.
    Static decides the set on calibration (empty: every feature on the int8 grid, W8A8's error); dynamic finds
    them in the call: its error is that of its int8 weights alone (W8A16: float activations), i.e. the int8
    activations cost nothing more. (The outlier columns' weights are int8, as in bitsandbytes: on this toy,
    whose outlier columns meet weights 40x smaller than the rest, that error is W8A16's, above the plain model's.)"""
    g = torch.Generator().manual_seed(2)
    calib, x = torch.randn(4, 12, 32, generator=g), torch.randn(4, 12, 32, generator=g)
    assert calib.abs().max() < 6
    x_huge = x.clone()
    x_huge[..., :3] *= 40
    plain, huge = _Mlp(False), _Mlp(True)
    with torch.no_grad():
        torch.testing.assert_close(huge(x_huge), plain(x), rtol=1e-4, atol=1e-5)   # the same float function

    def err(model, recipe, inp):
        qm = qpass.apply(model, recipe, calib_data=[(calib,)], example_inputs=(calib,), progress=False)
        with torch.no_grad():
            return float((qm(inp) - model(inp)).norm() / model(inp).norm()), qm
    w8a16, _ = err(huge, {"passes": [{"quantize": {"weights": W8A8["passes"][0]["quantize"]["weights"]}}]}, x_huge)
    w8a8, _ = err(huge, W8A8, x_huge)
    static, qs = err(huge, _static(), x_huge)
    dynamic, qd = err(huge, _int8(), x_huge)
    assert qs.report["llm_int8"].stats["with_outliers"] == 0                 # calibration saw no outlier
    assert dynamic < 1.1 * w8a16                                             # float-activation quality
    assert w8a8 > 3 * dynamic and static > 3 * dynamic                       # both break on the run-time outliers
    assert err(plain, _int8(), x)[0] == err(plain, W8A8, x)[0]               # no outlier in the call: W8A8
    with torch.no_grad():
        torch.testing.assert_close(qpass.lower(qd, "torch", kernels="exact")(x_huge), qd(x_huge), rtol=0, atol=1e-5)


def test_dynamic_without_outliers_is_w8a8_exactly_and_needs_no_calibration():
    model = toy.hf_model("llama")
    ids = toy.token_ids(batch=2, t=9, seed=4)
    qm = qpass.apply(model, _int8(threshold=1e6, ignore=["lm_head"]), progress=False)
    ref = qpass.apply(model, {"passes": [{"quantize": {**W8A8["passes"][0]["quantize"], "ignore": ["lm_head"]}}]},
                      progress=False)
    ws, rs = quantizers(qm.graph_module, role="weight"), quantizers(ref.graph_module, role="weight")
    assert [(q.op, q.block) for q in ws] == [(q.op, q.block) for q in rs]   # the same weight quantizers
    for a, b in zip(ws, rs):
        assert torch.equal(qm.graph_module.get_buffer(a.scale.target), ref.graph_module.get_buffer(b.scale.target))
    assert torch.equal(qm(ids).logits, ref(ids).logits)
    assert qpass.passes.LlmInt8(qpass.passes.LlmInt8Config()).needs_calibration is False
    assert qpass.passes.LlmInt8(qpass.passes.LlmInt8Config(outliers="static")).needs_calibration is True


@pytest.mark.parametrize("outliers", ["dynamic", "static"])
def test_save_load_round_trips_both_modes(outliers, tmp_path):
    model = toy.hf_model("llama")
    qm = qpass.apply(model, _int8(threshold=2.0, outliers=outliers, ignore=["lm_head"]), calib_data=CALIB,
                     progress=False)
    qm.save(tmp_path / "fq")
    back = qpass.load(tmp_path / "fq")
    ids = toy.token_ids(batch=2, t=9, seed=8)
    assert torch.equal(back(ids).logits, qm(ids).logits)
    assert [q.side_channels.names for q in quantizers(back.graph_module)] == \
        [q.side_channels.names for q in quantizers(qm.graph_module)]
    if outliers == "dynamic":                                                # the lowered model too
        from qpass.backends import torch_packed as tp
        pm = qpass.lower(qm, "torch", kernels="exact")
        pm.save(tmp_path / "pm")
        pback = tp.load(tmp_path / "pm")
        assert {m.act.threshold for m in pback.graph_module.modules() if isinstance(m, tp.PackedLinear)} == {2.0}
        assert torch.equal(pback(ids).logits, pm(ids).logits)
        torch.testing.assert_close(pm(ids).logits, qm(ids).logits, rtol=0, atol=1e-4)


def test_outliers_option_errors():
    with pytest.raises(qpass.RecipeError, match=r"passes\[0\].llm_int8.outliers: must be 'dynamic'.*got 'always'"):
        qpass.Recipe.from_dict(_int8(outliers="always"))
    from qpass.quantizer import QuantMeta, SideChannels, ThresholdColumns, insert_quantizer
    model = _linear_model()
    x = torch.randn(4, 32)
    qm = qpass.apply(model, _int8(), example_inputs=(x,), progress=False)
    gm = qm.graph_module
    q = quantizers(gm, role="input")[0]
    with pytest.raises(ValueError, match="threshold columns .* need a dynamic quantizer"):
        insert_quantizer(gm, q.node, q.x, QuantMeta("input", "", "", qpass.QSpec(qpass.IntFormat(8))), block=[1, -1],
                         scale=torch.ones(1, 1), side=SideChannels(threshold_columns=ThresholdColumns(6.0)),
                         origin="test")


def test_dynamic_lowers_to_onnx_with_standard_ops_and_parity(tmp_path):
    """Threshold 3 on the toy: per call, some linears have no outlier feature (an empty Gather), others 1-3,
    and the sets differ between the two inputs (seed 6: none in layer 0's q/k/v, seed 7: one)."""
    threshold = 3.0
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import onnx

    from qpass.backends import onnx_qdq
    qm = qpass.apply(toy.hf_model("llama"), _int8(threshold=threshold, ignore=["lm_head"]), progress=False)
    art = qpass.lower(qm, "onnx", tmp_path / "onnx")
    ops_ = [n.op_type for n in onnx.load(art.model_path).graph.node]
    assert ops_.count("MatMulInteger") == 14 and "NonZero" in ops_ and "GreaterOrEqual" in ops_
    for seed in (6, 7):                                                       # each call finds its own set
        ids = toy.token_ids(batch=2, t=9, seed=seed)
        torch.testing.assert_close(onnx_qdq.logits(art.path, ids), qm(ids).logits, rtol=1e-4, atol=1e-5)


def test_onnx_refuses_threshold_columns_in_front_of_another_weight_by_name():
    pytest.importorskip("onnxscript")
    from qpass.backends.onnx_qdq import patterns
    qm = qpass.apply(_linear_model(), _int8(), example_inputs=(torch.randn(4, 32),), progress=False)
    gm = qm.graph_module
    w = quantizers(gm, role="weight")[0].node
    w.args = (*w.args[:4], "int4")                                           # a 4-bit weight behind the input
    with pytest.raises(qpass.UnsupportedOpError, match=r"(?s)per-call float features.*plain int8 weight "
                       r"quantizer only.*int4.*fix: .*torch backend"):
        patterns.rewrite(gm)
