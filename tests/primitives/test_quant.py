"""Round-trip properties of quantize / dequantize / fake_quantize for every format and granularity."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qpass.primitives import quant
from qpass.primitives.spec import (FloatFormat, IntFormat, LutFormat, PerChannel, PerGroup, PerHead, PerTensor,
                                   PerToken, QSpec, format_from_name)

from .strategies import INT_FORMATS, OTHER_FORMATS, data, shapes_and_blocks


def _spec(fmt, symmetric=True):
    return QSpec(format_from_name(fmt), PerTensor(), symmetric=symmetric)


def _roundtrip(x, fmt, symmetric, block):
    spec = _spec(fmt, symmetric)
    scale, zp = quant.choose_qparams(x, spec, block_size=block)
    codes = quant.quantize(x, scale, zp, block, fmt)
    dq = quant.dequantize(codes, scale, zp, block, fmt, out_dtype=x.dtype)
    return scale, zp, codes, dq


def _grid(fmt):
    """Every representable value of a non-int format, in code units (brute force)."""
    if fmt in quant.FP8_DTYPES:
        v = torch.arange(256, dtype=torch.uint8).view(quant.FP8_DTYPES[fmt]).float()
        return v[torch.isfinite(v)]
    if fmt == "fp4_e2m1":
        return torch.tensor(quant.FP4_E2M1_VALUES + tuple(-v for v in quant.FP4_E2M1_VALUES))
    return torch.tensor(quant.NF4_VALUES)


def _check_int(x, fmt, symmetric, block):
    scale, zp, codes, dq = _roundtrip(x, fmt, symmetric, block)
    assert scale.dtype == torch.float32 and scale.shape == quant.scale_shape(x.shape, block)
    assert codes.dtype == (torch.int8 if symmetric else torch.uint8)
    lo, hi = IntFormat(int(fmt[3:])).qrange(symmetric)
    assert int(codes.min()) >= lo and int(codes.max()) <= hi
    if not symmetric:
        assert zp.dtype == torch.int32 and int(zp.min()) >= 0 and int(zp.max()) <= hi
    s = quant.expand_to(scale, block, x.shape)
    assert ((x - dq).abs() <= s * 0.5001 + 1e-6 * x.abs()).all()
    assert torch.equal(quant.fake_quantize(x, scale, zp, block, fmt), dq)


def _check_nearest(x, fmt, block):
    scale, _, codes, dq = _roundtrip(x, fmt, True, block)
    assert codes.dtype == quant.codes_dtype(fmt, True)
    if codes.dtype == torch.uint8:
        assert int(codes.max()) <= 15
    s = quant.expand_to(scale, block, x.shape)
    best = (x[..., None] - _grid(fmt) * s[..., None]).abs().min(-1).values
    assert ((x - dq).abs() <= best + 1e-6 * (x.abs() + s)).all()
    assert torch.equal(quant.fake_quantize(x, scale, None, block, fmt), dq)


@settings(max_examples=80, deadline=None)
@given(st.data(), shapes_and_blocks(), st.sampled_from(INT_FORMATS), st.booleans())
def test_int_roundtrip_within_half_step(d, shape_block, fmt, symmetric):
    shape, block = shape_block
    _check_int(d.draw(data(shape)), fmt, symmetric, block)


@settings(max_examples=60, deadline=None)
@given(st.data(), shapes_and_blocks(), st.sampled_from(INT_FORMATS))
def test_full_range_uses_every_code_and_maps_the_extreme_exactly(d, shape_block, fmt):
    shape, block = shape_block
    x = d.draw(data(shape))
    bits = int(fmt[3:])
    spec = QSpec(IntFormat(bits), PerTensor(), full_range=True)
    scale, zp = quant.choose_qparams(x, spec, block_size=block)
    assert zp is None
    codes = quant.quantize(x, scale, None, block, fmt)
    dq = quant.dequantize(codes, scale, None, block, fmt, out_dtype=x.dtype)
    s = quant.expand_to(scale, block, x.shape).expand(x.shape)
    extreme = s * -(2 ** (bits - 1))                                             # the signed largest |x|
    assert int(codes.min()) >= -(2 ** (bits - 1)) and int(codes.max()) <= 2 ** (bits - 1) - 1
    big = x.abs() >= extreme.abs() * (1 - 1e-6)                                  # the extreme itself
    assert (codes[big & (extreme.abs() > 1e-9)] == -(2 ** (bits - 1))).all()
    # every value is within half a step, except the other side's values beyond (2^(b-1) - 1) steps, which clip
    other = (x.sign() != extreme.sign()) & (x.abs() > s.abs() * (2 ** (bits - 1) - 0.5))
    err = (x - dq).abs()
    assert (err[~other] <= s.abs()[~other] * 0.5001 + 1e-6 * x.abs()[~other]).all()
    assert (err[other] <= s.abs()[other] * 1.0001 + 1e-6 * x.abs()[other]).all()
    # one more level than the restricted grid: the step is max|x| / 2^(b-1), not max|x| / (2^(b-1) - 1)
    ref, _ = quant.choose_qparams(x, QSpec(IntFormat(bits), PerTensor()), block_size=block)
    assert torch.allclose(scale.abs(), ref * (2 ** (bits - 1) - 1) / 2 ** (bits - 1), rtol=1e-5, atol=1e-12)


def test_full_range_beats_the_restricted_grid_on_gaussian_weights():
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    err = {}
    for full in (False, True):
        spec = QSpec(IntFormat(4), PerGroup(128), full_range=full)
        s, _ = quant.choose_qparams(w, spec)
        err[full] = float((quant.fake_quantize(w, s, None, spec.block_size(w.shape), "int4") - w).pow(2).mean())
    assert err[True] < 0.9 * err[False]


def test_full_range_is_refused_where_it_has_no_meaning():
    for kw in ({"symmetric": False}, {"dynamic": True, "granularity": PerToken()}):
        with pytest.raises(ValueError, match="full_range"):
            QSpec(IntFormat(4), **{"granularity": PerTensor(), **kw}, full_range=True)
    with pytest.raises(ValueError, match="full_range"):
        QSpec(FloatFormat("fp8_e4m3"), PerTensor(), full_range=True)


@settings(max_examples=60, deadline=None)
@given(st.data(), shapes_and_blocks(max_rank=3, max_dim=7), st.sampled_from(OTHER_FORMATS))
def test_float_and_lut_formats_round_to_nearest(d, shape_block, fmt):
    shape, block = shape_block
    _check_nearest(d.draw(data(shape)), fmt, block)


GRANULARITIES = [
    ((5, 7), PerGroup(3)),
    ((4, 704), PerGroup(128)),  # partial last group of 64
    ((3, 5, 7), PerToken()),
    ((3, 5, 7), PerChannel(0)),
    ((3, 5, 7), PerChannel(1)),
    ((3, 5, 7), PerChannel(-1)),
    ((2, 3, 5, 4), PerHead()),
    ((2, 3, 5, 4), PerHead(per_token=True)),
    ((6, 5), PerTensor()),
]


@pytest.mark.parametrize("shape,gran", GRANULARITIES, ids=lambda v: str(v))
@pytest.mark.parametrize("fmt,symmetric", [("int4", True), ("int8", False), ("int3", False), ("fp8_e4m3", True),
                                           ("fp8_e5m2", True), ("fp4_e2m1", True), ("nf4", True)])
def test_named_granularities(shape, gran, fmt, symmetric):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    spec = QSpec(format_from_name(fmt), gran, symmetric=symmetric)
    block, name = quant.spec_args(spec, shape)
    assert name == fmt
    if fmt.startswith("int"):
        _check_int(x, fmt, symmetric, block)
    else:
        _check_nearest(x, fmt, block)
    scale, _ = quant.choose_qparams(x, spec)
    assert scale.shape == quant.scale_shape(shape, block)


def test_scale_shapes():
    assert quant.scale_shape((4, 704), (1, 128)) == (4, 6)
    assert quant.scale_shape((2, 9, 16), (-1, -1, 1)) == (1, 1, 16)
    assert quant.scale_shape((2, 3, 5, 4), PerHead().block_size((2, 3, 5, 4))) == (1, 3, 1, 1)
    assert quant.scale_shape((5, 7), (1, 10)) == (5, 1)


def test_per_group_scale_is_each_groups_absmax():
    x = torch.arange(1.0, 8.0).repeat(2, 1)  # [[1..7], [1..7]], groups of 3: {1,2,3} {4,5,6} {7}
    scale, _ = quant.choose_qparams(x, QSpec(IntFormat(8), PerGroup(3)))
    torch.testing.assert_close(scale, torch.tensor([[3.0, 6.0, 7.0]] * 2) / 127)


def test_fp4_codes_and_ties_to_even():
    scale = torch.ones(1)
    y = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.5, -0.1, 7.0, -100.0, float("inf")])
    codes = quant.quantize(y, scale, None, (-1,), "fp4_e2m1")
    assert codes.tolist() == [0, 2, 2, 4, 4, 6, 6, 9, 0, 7, 15, 7]
    dq = quant.dequantize(codes, scale, None, (-1,), "fp4_e2m1")
    assert dq.tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.5, 0.0, 6.0, -6.0, 6.0]


def test_nf4_table_values_map_to_their_index():
    table = torch.tensor(quant.NF4_VALUES)
    codes = quant.quantize(table * 3.0, torch.tensor([3.0]), None, (-1,), "nf4")
    assert codes.tolist() == list(range(16))
    scale, _ = quant.choose_qparams(table * 3.0, QSpec(LutFormat(), PerTensor()))
    assert scale.item() == 3.0


def test_fp8_saturates_instead_of_overflowing():
    x = torch.tensor([1000.0, -1e6, float("inf"), 1.0])
    codes = quant.quantize(x, torch.ones(1), None, (-1,), "fp8_e4m3")
    assert codes.dtype == torch.float8_e4m3fn
    assert codes.float().tolist() == [448.0, -448.0, 448.0, 1.0]
    assert FloatFormat("fp8_e5m2").max == 57344.0


def test_int_saturates_with_a_given_scale():
    x = torch.tensor([10.0, -10.0, float("inf"), float("-inf"), 0.26])
    codes = quant.quantize(x, torch.tensor([0.5]), None, (-1,), "int4")
    assert codes.tolist() == [7, -8, 7, -8, 1]
    codes = quant.quantize(x, torch.tensor([0.5]), torch.tensor([3], dtype=torch.int32), (-1,), "int4")
    assert codes.tolist() == [15, 0, 15, 0, 4]


@pytest.mark.parametrize("fmt,symmetric", [("int8", True), ("int4", False), ("fp8_e4m3", True), ("nf4", True)])
def test_low_precision_inputs_compute_in_float32(fmt, symmetric):
    x = torch.randn(4, 33, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    block = (1, 8)
    scale, zp = quant.choose_qparams(x, _spec(fmt, symmetric), block_size=block)
    fq = quant.fake_quantize(x, scale, zp, block, fmt)
    assert fq.dtype == torch.bfloat16
    codes = quant.quantize(x, scale, zp, block, fmt)
    assert torch.equal(fq, quant.dequantize(codes, scale, zp, block, fmt, out_dtype=torch.bfloat16))


def test_float_zero_point_is_accepted():
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    scale, zp = quant.choose_qparams(x, QSpec(IntFormat(4), PerToken(), symmetric=False))
    a = quant.fake_quantize(x, scale, zp, (1, -1), "int4")
    assert torch.equal(a, quant.fake_quantize(x, scale, zp.float(), (1, -1), "int4"))


@pytest.mark.parametrize("fmt,symmetric", [("int8", True), ("int4", False), ("fp8_e5m2", True), ("fp4_e2m1", True)])
def test_dynamic_equals_static_with_own_qparams(fmt, symmetric):
    x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(3))
    for block in [(1, 1, -1), (1, 1, 5), (-1, -1, -1)]:
        scale, zp = quant.choose_qparams(x, _spec(fmt, symmetric), block_size=block)
        want = quant.fake_quantize(x, scale, zp, block, fmt)
        assert torch.equal(quant.fake_quantize_dynamic(x, block, fmt, symmetric), want)


@settings(max_examples=60, deadline=None)
@given(st.data(), st.sampled_from(INT_FORMATS), st.integers(1, 3), st.integers(1, 40))
def test_per_token_fast_path_equals_the_general_path(d, fmt, rank, last):
    """fake_quantize_dynamic's per-token symmetric fast path is the general block path bit for bit,
    including tokens holding inf / NaN (all NaN) and all-zero tokens."""
    shape = (*([3] * (rank - 1)), last)
    x = d.draw(data(shape))
    if d.draw(st.booleans()):
        flat = x.reshape(-1, last)
        flat[0, d.draw(st.integers(0, last - 1))] = d.draw(st.sampled_from([float("inf"), float("-inf"), float("nan")]))
        if flat.shape[0] > 1:
            flat[-1] = 0.0
    block = (*([1] * (rank - 1)), -1)
    scale, _ = quant.dynamic_qparams(x, block, fmt, True)
    general = quant.fake_quantize(x, scale, None, block, fmt)
    assert torch.equal(quant.fake_quantize_dynamic(x, block, fmt, True).nan_to_num(7.0), general.nan_to_num(7.0))
