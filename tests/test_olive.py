"""OliVe: the outlier-victim pair formats (qpass.primitives.olive), the olive pass, lowering and refusals."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qpass
from qpass.eval import weight_bytes
from qpass.primitives import formats as F
from qpass.primitives import olive as O
from qpass.quantizer import quantizers
from tests import toy

CALIB = [toy.token_ids(seed=s) for s in range(3)]
RATIOS = tuple(0.25 + 0.05 * i for i in range(26))


def _recipe(w=4, a=None, **kw):
    cfg = {"weights": {"bits": w, "granularity": "per_channel"} if w else None, "ignore": ["lm_head"], **kw}
    if a:
        cfg["activations"] = {"bits": a, "granularity": "per_tensor"}
    return {"passes": [{"olive": cfg}]}


# ------------------------------------------------------------------------------------------ the format


def test_the_formats_are_registered_with_the_papers_abfloat_values():
    f4, f8 = O.get_olive("olive4"), O.get_olive("olive8")
    assert F.get_format("olive4") is f4 and f4.bits == 4 and f4.kind == "olive"
    assert f4.outlier_values().tolist() == [12, 16, 24, 32, 48, 64, 96]    # E2M1, bias 3: (2 + m) << (e + 2)
    v8 = f8.outlier_values()
    assert len(v8) == 127 and v8[0] == 132 and v8[-1] == 2016 and f8.nmax == 127
    assert (f4.nmax, f4.identifier) == (7, 8)


def test_pairs_prune_the_victim_and_keep_the_larger_outlier():
    f = O.get_olive("olive4")
    y = torch.tensor([[0.4, 3.2, 10.0, 0.3, -50.0, 40.0, -7.4, 9.4, 200.0, -1.0, 2.0]])
    codes = f.encode(y, None, None)
    assert codes.dtype == torch.uint8
    out = f.decode(codes, None, None, torch.float32)
    # (0.4, 3.2) normal; (10, .3): 10 -> abfloat 12, victim 0; (-50, 40): -50 kept (-48), 40 pruned;
    # (-7.4, 9.4): 9.4 < 9.5 stays normal (7); (200, -1): saturates at 96; the odd last value is normal
    assert out.tolist() == [[0, 3, 12, 0, -48, 0, -7, 7, 96, 0, 2]]
    assert codes[0, 3] == f.identifier and codes[0, 5] == f.identifier and codes[0, 9] == f.identifier


def test_an_unpaired_last_value_is_clamped_to_the_normal_grid():
    f = O.get_olive("olive4")
    assert f.roundtrip(torch.tensor([1.0, 2.0, 50.0])).tolist() == [1, 2, 7]


values = st.lists(st.floats(-300, 300, allow_nan=False, width=32), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(values, st.sampled_from([4, 5, 8]))
def test_pair_encoding_properties(vals, bits):
    f = O.get_olive(f"olive{bits}")
    y = torch.tensor([vals])
    codes = f.encode(y, None, None)
    out = f.decode(codes, None, None, torch.float32)
    assert torch.equal(out, f.roundtrip(y))                                # codes round trip = fake-quant
    assert torch.equal(f.decode(f.encode(out, None, None), None, None, torch.float32), out)   # idempotent
    mags = f.outlier_values()
    thr = (f.nmax + mags[0]) / 2
    n = y.shape[-1] - y.shape[-1] % 2
    for i in range(0, y.shape[-1]):
        c, v, x = int(codes[0, i]), float(out[0, i]), float(y[0, i])
        j = i ^ 1                                                           # the pair partner
        if c == f.identifier:                                               # a victim: next to a kept outlier
            assert v == 0 and j < n and abs(float(out[0, j])) > f.nmax and abs(float(y[0, j])) > thr
        elif abs(v) > f.nmax:                                               # a kept outlier: nearest abfloat
            assert i < n and int(codes[0, j]) == f.identifier and abs(x) > thr
            assert abs(v - x) == float((mags.copysign(torch.tensor(x)) - x).abs().min())
            if mags[0] <= abs(x) <= mags[-1]:
                assert abs(v - x) <= abs(x) * 2.0 ** -(bits - 2) + 1e-4      # within half an abfloat step
        else:                                                               # normal: round to nearest, clamped
            assert v == float(torch.tensor(x).round().clamp(-f.nmax, f.nmax))
            assert abs(x) <= thr or i >= n                                  # an unpaired last value is clamped
    assert int((codes == f.identifier).sum()) == int((out.abs() > f.nmax).sum())   # one victim per outlier


def test_fake_quantize_ext_and_its_codes_agree_bit_for_bit():
    w = torch.randn(16, 32)
    w[3, 4] = 9.0
    s = O.search_scale(w, (1, -1), "olive4", RATIOS)
    fq = F.fake_quantize_ext(w, s, None, [1, -1], "olive4")
    codes = F.quantize_ext(w, s, None, [1, -1], "olive4")
    assert torch.equal(F.dequantize_ext(codes, s, None, [1, -1], "olive4"), fq)


def test_the_scale_search_is_never_worse_than_the_int_grid_alone():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    w[::5, 7] *= 12                                                          # an outlier column
    s = O.search_scale(w, (1, -1), "olive4", RATIOS)
    err = ((F.fake_quantize_ext(w, s, None, [1, -1], "olive4") - w) ** 2).sum(1)
    absmax = w.abs().amax(1, keepdim=True) / 7
    err_int = ((F.fake_quantize_ext(w, absmax, None, [1, -1], "olive4") - w) ** 2).sum(1)
    assert (err <= err_int).all() and err.sum() < 0.7 * err_int.sum()


# ------------------------------------------------------------------------------------------- the pass


def test_olive_fires_counts_four_bits_per_weight_and_lowers_to_torch():
    model = toy.hf_model("llama")
    qm = qpass.apply(model, _recipe(4, 4), calib_data=CALIB, progress=False)
    stats = qm.report["olive"].stats
    ws, xs = quantizers(qm.graph_module, role="weight"), quantizers(qm.graph_module, role="input")
    assert stats["linears"] == len(ws) == len(xs) == 14 and stats["skipped"] == 1
    assert {q.fmt_name for q in ws + xs} == {"olive4"} and all(q.op == "fake_quantize_ext" for q in ws + xs)
    assert all(qm.graph_module.get_buffer(q.scale.target).numel() == 1 for q in xs)      # static per tensor
    assert 0 <= stats["weight_outlier_rate"] < 0.05
    # bits: exactly the int4 RTN count (4 bits per weight + one fp16 scale per row): the marker is a code
    plain = qpass.apply(model, {"passes": [{"quantize": {"weights": {"bits": 4, "granularity": "per_channel"},
                                                         "ignore": ["lm_head"]}}]}, progress=False)
    assert weight_bytes(qm)["linear_weight_bytes"] == weight_bytes(plain)["linear_weight_bytes"]
    ids = toy.token_ids(batch=2, t=9, seed=5)
    ref = qm(ids).logits
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(qpass.lower(qm, "torch")(ids).logits, ref, rtol=0, atol=1e-4)


def test_olive_on_the_mm_family_lowers_to_torch():
    qm = qpass.apply(toy.hf_model("gpt2"), _recipe(8, 8), calib_data=CALIB, progress=False)
    assert quantizers(qm.graph_module, role="weight")
    ids = toy.token_ids(batch=1, t=8, seed=1)
    torch.testing.assert_close(qpass.lower(qm, "torch")(ids).logits, qm(ids).logits, rtol=0, atol=1e-4)


def test_onnx_refuses_olive_by_name():
    pytest.importorskip("onnxscript")
    from qpass.backends.onnx_qdq import patterns
    qm = qpass.apply(toy.hf_model("llama"), _recipe(4), progress=False)
    with pytest.raises(qpass.UnsupportedOpError, match=r"(?s)onnx_qdq cannot lower qpass::fake_quantize_ext "
                       r"\(role weight\): unsupported format olive4 \(kind olive\).*fix: use the torch"):
        patterns.check_supported(qm.graph_module)


def test_olive_does_nothing_when_its_targets_are_all_ignored_and_errors_clearly():
    model = toy.hf_model("llama")
    qm = qpass.apply(model, _recipe(4, ignore=["*"]), progress=False)
    assert not quantizers(qm.graph_module) and qm.report["olive"].stats["linears"] == 0
    with pytest.raises(qpass.TargetNotFoundError, match="q_prj"):
        qpass.apply(model, _recipe(4, targets=["*.q_prj"]), progress=False)
    bad = [({"weights": {"bits": 3}}, r"olive.weights: .*4..8 bits"),
           ({"weights": {"bits": 4, "granularity": "per_group", "group_size": 15}}, "group_size: must be even"),
           ({"activations": {"bits": 8, "granularity": "per_token", "dynamic": True}}, "static"),
           ({"weights": None}, "nothing to quantize"),
           ({"min_ratio": 2.0, "max_ratio": 1.0}, "min_ratio")]
    for cfg, msg in bad:
        with pytest.raises(qpass.RecipeError, match=msg):
            qpass.Recipe.from_dict({"passes": [{"olive": cfg}]})
    with pytest.raises(qpass.QpassError, match="already quantized"):
        qpass.apply(model, {"passes": [{"quantize": {"weights": {"bits": 8}, "ignore": ["lm_head"]}},
                                       *_recipe(4)["passes"]]}, progress=False)
