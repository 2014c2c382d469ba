"""OWQ: weak columns in float (qpass.primitives.owq, passes/owq.py), bit accounting, lowering and refusals."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qpass
from qpass import IntFormat, PerChannel, PerGroup, QSpec
from qpass.errors import QuantizationError
from qpass.eval import weight_bytes
from qpass.passes import OwqConfig
from qpass.primitives import formats as F
from qpass.primitives import owq as O
from qpass.primitives.gptq import gptq_quantize, reconstruction_error
from qpass.quantizer import quantizers
from tests import toy

CALIB = [toy.token_ids(seed=s) for s in range(3)]
W3G = {"bits": 3, "granularity": "per_group", "group_size": 16, "symmetric": True}
G16 = QSpec(IntFormat(3), PerGroup(16))


def _layer(d=32, out=24, seed=0):
    x = toy.correlated_input(256, d, outliers=2, seed=seed)
    w = torch.randn(out, d, generator=torch.Generator().manual_seed(seed + 1))
    return w, x, 2.0 * x.double().t() @ x.double() / x.shape[0]


@pytest.mark.parametrize("spec", [G16, QSpec(IntFormat(3), PerChannel(0)), QSpec(IntFormat(4), PerGroup(8),
                                                                                  symmetric=False)])
@pytest.mark.parametrize("act_order", [False, True])
def test_owq_gptq_without_weak_columns_is_gptq_bit_for_bit(spec, act_order):
    w, _, h = _layer()
    ref = gptq_quantize(w, h, spec, act_order=act_order)
    got = O.owq_gptq(w, h, spec, torch.zeros(0, dtype=torch.int64), act_order=act_order)
    assert torch.equal(got.weight, ref.weight) and torch.equal(got.scale, ref.scale)


@settings(max_examples=25, deadline=None)
@given(k=st.integers(0, 8), seed=st.integers(0, 10), act_order=st.booleans(), g=st.sampled_from([8, 16, -1]))
def test_owq_gptq_result_is_exactly_what_the_quantizer_represents(k, seed, act_order, g):
    w, _, h = _layer(seed=seed)
    spec = QSpec(IntFormat(3), PerGroup(g) if g > 0 else PerChannel(0))
    block = spec.block_size(w.shape)
    cols = O.weak_columns(O.column_sensitivity(w, torch.diagonal(h), spec, block), k)
    res = O.owq_gptq(w, h, spec, cols, act_order=act_order)
    fq = F.fake_quantize_ext(res.weight, res.scale, res.zero_point, block, spec.format.name, float_columns=(cols, 1))
    assert torch.equal(fq, res.weight)                                # on the grid, weak columns kept
    assert cols.numel() == k and torch.all(cols[1:] > cols[:-1])      # k distinct columns, ascending
    assert torch.isfinite(res.weight).all()


def test_more_weak_columns_reduce_the_reconstruction_error_and_follow_the_outlier_channels():
    w, x, h = _layer(d=48, out=32)
    xtx = x.double().t() @ x.double()
    block = G16.block_size(w.shape)
    sens = O.column_sensitivity(w, torch.diagonal(h), G16, block)
    assert set(O.weak_columns(sens, 2).tolist()) == {0, 1}            # correlated_input's two large channels
    for method in ("rtn", "gptq"):
        errs = []
        for k in (0, 2, 6, 12, 24):
            cols = O.weak_columns(sens, k)
            if method == "gptq":
                wq = O.owq_gptq(w, h, G16, cols).weight
            else:
                s, z = O.owq_rtn_qparams(w, G16, block, cols)
                wq = F.fake_quantize_ext(w, s, z, block, "int3", float_columns=(cols, 1))
            errs.append(reconstruction_error(w, wq, xtx))
        assert all(a > b for a, b in zip(errs, errs[1:])), (method, errs)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 50), g=st.sampled_from([8, 16, -1]), sym=st.booleans(), k=st.integers(0, 6))
def test_truncation_search_is_never_worse_than_min_max_in_its_norm(seed, g, sym, k):
    w, _, h = _layer(seed=seed)
    spec = QSpec(IntFormat(3), PerGroup(g) if g > 0 else PerChannel(0), symmetric=sym)
    block = spec.block_size(w.shape)
    cols = torch.arange(k, dtype=torch.int64)

    def norm(s, z):
        fq = F.fake_quantize_ext(w, s, z, block, "int3", float_columns=(cols, 1))
        return (fq - w).abs().pow(O.CLIP_NORM).sum(1)

    mm, cl = O.owq_rtn_qparams(w, spec, block, cols), O.owq_rtn_qparams(w, spec, block, cols, clip=True)
    assert (cl[0] <= mm[0] * (1 + 1e-6)).all()                                 # ranges only shrink
    assert (norm(*cl) <= norm(*mm) * (1 + 1e-5) + 1e-9).all()                # per block, so per row
    res = O.owq_gptq(w, h, spec, cols, clip=True)
    fq = F.fake_quantize_ext(res.weight, res.scale, res.zero_point, block, "int3", float_columns=(cols, 1))
    assert torch.equal(fq, res.weight)                                         # on the clipped grid


def test_truncation_search_lowers_the_reconstruction_error():
    w, x, h = _layer(d=64, out=48)
    xtx = x.double().t() @ x.double()
    cols = O.weak_columns(O.column_sensitivity(w, torch.diagonal(h), G16, (1, 16)), 2)
    errs = [reconstruction_error(w, O.owq_gptq(w, h, G16, cols, clip=c).weight, xtx) for c in (False, True)]
    assert errs[1] < errs[0]


@settings(max_examples=50, deadline=None)
@given(out=st.integers(1, 64), inp=st.integers(1, 300), g=st.sampled_from([16, 64, -1]),
       target=st.floats(3.01, 16.0), sym=st.booleans())
def test_columns_for_bits_is_the_most_the_budget_allows(out, inp, g, target, sym):
    spec = QSpec(IntFormat(3), PerGroup(g) if g > 0 else PerChannel(0), symmetric=sym)
    block = spec.block_size((out, inp))
    k = O.columns_for_bits((out, inp), spec, block, target)
    bits = lambda k: (O.base_bits((out, inp), spec, block) + k * (16 * out + 32)) / (out * inp)   # noqa: E731
    assert 0 <= k <= inp
    assert k == 0 or bits(k) <= target + 1e-9
    assert k == inp or bits(k + 1) > target


def _owq(**kw):
    return {"passes": [{"owq": {"weights": W3G, "ignore": ["lm_head"], **kw}}]}


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_owq_fires_counts_float_columns_in_the_bits_and_lowers_to_torch(method):
    model = toy.hf_model("llama")
    qm = qpass.apply(model, _owq(columns=3, method=method), calib_data=CALIB, progress=False)
    stats = qm.report["owq"].stats
    qs = quantizers(qm.graph_module, role="weight")
    assert stats["linears"] == len(qs) == 14 and stats["float_columns"] == 3 * 14
    assert all(q.op == "fake_quantize_ext" and q.side_channels.names == ("float_columns",) for q in qs)
    assert all(qm.graph_module.get_buffer(q.side_channels.float_columns.index.target).numel() == 3 for q in qs)
    # bits: every linear's codes + fp16 group scales + 3 fp16 columns with an int32 index each
    wb, plain = weight_bytes(qm), weight_bytes(qpass.apply(model, {"passes": [{"quantize": {
        "weights": W3G, "ignore": ["lm_head"]}}]}, progress=False))
    cols = sum(3 * (2 * q.x.meta["val"].shape[1 - q.side_channels.float_columns.axis] + 4) for q in qs)
    assert wb["linear_weight_bytes"] == plain["linear_weight_bytes"] + cols
    ids = toy.token_ids(batch=2, t=9, seed=5)
    pm = qpass.lower(qm, "torch")
    torch.testing.assert_close(pm(ids).logits, qm(ids).logits, rtol=0, atol=1e-4)


def test_owq_target_bits_keeps_each_linear_within_the_budget():
    qm = qpass.apply(toy.hf_model("llama"), _owq(target_bits=4.5, method="rtn", weights={**W3G, "group_size": 32}),
                     calib_data=CALIB, progress=False)
    assert qm.report["owq"].stats["with_float_columns"] > 0
    assert weight_bytes(qm)["quantized_bits_per_weight"] <= 4.5


def test_owq_on_the_mm_family_keeps_input_columns():
    """GPT-2's Conv1D weight is stored [in, out]: the float columns are along axis 0 of the quantizer's input."""
    model = toy.hf_model("gpt2")
    qm = qpass.apply(model, _owq(columns=2, method="gptq"), calib_data=CALIB, progress=False)
    qs = quantizers(qm.graph_module, role="weight")
    assert qs and {q.side_channels.float_columns.axis for q in qs} == {0}
    ids = toy.token_ids(batch=1, t=8, seed=1)
    torch.testing.assert_close(qpass.lower(qm, "torch")(ids).logits, qm(ids).logits, rtol=0, atol=1e-4)


def test_onnx_refuses_owq_by_name():
    pytest.importorskip("onnxscript")
    from qpass.backends.onnx_qdq import patterns
    qm = qpass.apply(toy.hf_model("llama"), _owq(columns=1, method="rtn"), calib_data=CALIB, progress=False)
    with pytest.raises(qpass.UnsupportedOpError, match=r"(?s)onnx_qdq cannot lower qpass::fake_quantize_ext "
                       r"\(role weight\): unsupported side channel float_columns.*q_proj.*fix: use the torch"):
        patterns.check_supported(qm.graph_module)


def test_owq_does_nothing_when_its_targets_are_all_ignored_and_errors_clearly():
    model = toy.hf_model("llama")
    qm = qpass.apply(model, _owq(columns=1, method="rtn", ignore=["*"]), calib_data=CALIB, progress=False)
    assert not quantizers(qm.graph_module) and qm.report["owq"].stats["linears"] == 0
    with pytest.raises(qpass.TargetNotFoundError, match="q_prj"):
        qpass.apply(model, _owq(columns=1, targets=["*.q_prj"]), calib_data=CALIB, progress=False)
    bad = [({"columns": 1, "target_bits": 3.5}, "passes\\[0\\].owq.columns: give exactly one"),
           ({}, "passes\\[0\\].owq.columns: give exactly one"),
           ({"target_bits": 3.0}, "target_bits: must be in \\(3, 16\\]"),
           ({"columns": -1}, "columns: must be >= 0"),
           ({"columns": 1, "method": "adaround"}, "method")]
    for cfg, msg in bad:
        with pytest.raises(qpass.RecipeError, match=msg):
            qpass.Recipe.from_dict({"passes": [{"owq": cfg}]})
    with pytest.raises(qpass.RecipeError, match="built-in grid"):
        OwqConfig(weights=QSpec(F.get_format("codebook3"), PerChannel(0)), columns=1)
    with pytest.raises(QuantizationError, match="(?s)already quantized.*fix"):
        qpass.apply(model, {"passes": [{"quantize": {"weights": W3G}}, {"owq": {"columns": 1, "method": "rtn"}}]},
                    calib_data=CALIB, progress=False)
    with pytest.raises(qpass.CalibrationError, match="owq needs calibration data"):
        qpass.apply(model, _owq(columns=1, method="rtn"), progress=False)
