"""Documented edge cases: all-zero and constant blocks, inf/NaN, empty tensors, bad arguments."""
import pytest
import torch

from qpass.errors import QuantizationError
from qpass.primitives import quant
from qpass.primitives.spec import IntFormat, PerGroup, PerTensor, PerToken, QSpec, format_from_name

ALL = [("int8", True), ("int4", False), ("int2", True), ("fp8_e4m3", True), ("fp8_e5m2", True),
       ("fp4_e2m1", True), ("nf4", True)]


def _spec(fmt, symmetric, gran=PerTensor()):
    return QSpec(format_from_name(fmt), gran, symmetric=symmetric)


@pytest.mark.parametrize("fmt,symmetric", ALL)
def test_all_zero_block_gives_floor_scale_zero_codes_exact_zero(fmt, symmetric):
    x = torch.zeros(2, 6)
    x[1] = torch.randn(6)  # row 0 is all zero, row 1 is not
    scale, zp = quant.choose_qparams(x, _spec(fmt, symmetric, PerToken()))
    assert scale[0, 0].item() == pytest.approx(quant.SCALE_FLOOR)
    codes = quant.quantize(x, scale, zp, (1, -1), fmt)
    zero_code = {"nf4": 7}.get(fmt, 0) if zp is None else zp[0, 0].item()
    assert codes[0].float().eq(zero_code).all()
    dq = quant.dequantize(codes, scale, zp, (1, -1), fmt)
    assert dq[0].eq(0).all() and not dq.isnan().any()
    assert quant.fake_quantize_dynamic(x, (1, -1), fmt, symmetric)[0].eq(0).all()


@pytest.mark.parametrize("c", [0.3, -0.3, 7.5, -1e-4])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_constant_block_maps_to_extreme_code(c, bits):
    x = torch.full((3, 5), c)
    sym = QSpec(IntFormat(bits), PerTensor())
    scale, _ = quant.choose_qparams(x, sym)
    codes = quant.quantize(x, scale, None, (-1, -1), f"int{bits}")
    qmax = 2 ** (bits - 1) - 1
    assert codes.eq(qmax if c > 0 else -qmax).all()
    torch.testing.assert_close(quant.dequantize(codes, scale, None, (-1, -1), f"int{bits}"), x, rtol=1e-6, atol=0)
    asym = QSpec(IntFormat(bits), PerTensor(), symmetric=False)
    scale, zp = quant.choose_qparams(x, asym)
    codes = quant.quantize(x, scale, zp, (-1, -1), f"int{bits}")
    assert codes.eq(2**bits - 1 if c > 0 else 0).all() and zp.item() == (0 if c > 0 else 2**bits - 1)
    torch.testing.assert_close(quant.dequantize(codes, scale, zp, (-1, -1), f"int{bits}"), x, rtol=1e-6, atol=0)


@pytest.mark.parametrize("fmt,top_code", [("fp8_e4m3", 448.0), ("fp4_e2m1", 7), ("nf4", 15)])
def test_constant_block_non_int_formats(fmt, top_code):
    x = torch.full((4,), 2.5)
    scale, _ = quant.choose_qparams(x, _spec(fmt, True))
    codes = quant.quantize(x, scale, None, (-1,), fmt)
    assert codes.float().eq(top_code).all()
    torch.testing.assert_close(quant.dequantize(codes, scale, None, (-1,), fmt), x, rtol=1e-6, atol=0)


def test_zero_is_exact_in_asymmetric():
    x = torch.tensor([-0.37, 0.0, 1.91, 0.0, 0.5])
    scale, zp = quant.choose_qparams(x, QSpec(IntFormat(4), PerTensor(), symmetric=False))
    assert quant.fake_quantize(x, scale, zp, (-1,), "int4")[1].item() == 0.0


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_choose_qparams_rejects_non_finite(bad):
    x = torch.randn(2, 3)
    x[0, 1] = bad
    x[1, 2] = bad
    with pytest.raises(QuantizationError, match=r"(?s)2 of 6 values are non-finite.*calibration data"):
        quant.choose_qparams(x, QSpec(IntFormat(8), PerToken()))
    with pytest.raises(QuantizationError, match="1 of 2 values are non-finite"):
        quant.qparams_from_minmax(torch.tensor([-1.0, bad]), torch.tensor([1.0, 2.0]), QSpec(IntFormat(8)))


@pytest.mark.parametrize("fmt,symmetric", ALL)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_dynamic_non_finite_poisons_only_its_block(fmt, symmetric, bad):
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0))
    clean = quant.fake_quantize_dynamic(x, (1, 1, -1), fmt, symmetric)
    x[1, 2, 5] = bad
    out = quant.fake_quantize_dynamic(x, (1, 1, -1), fmt, symmetric)
    assert out[1, 2].isnan().all()
    keep = torch.ones(2, 3, dtype=torch.bool)
    keep[1, 2] = False
    assert torch.equal(out[keep], clean[keep])


def test_empty_tensors():
    x = torch.zeros(0, 8)
    scale, zp = quant.choose_qparams(x, QSpec(IntFormat(8), PerToken(), symmetric=False))
    assert scale.shape == (0, 1) and zp.shape == (0, 1)
    assert quant.quantize(x, scale, zp, (1, -1), "int8").shape == (0, 8)
    assert quant.fake_quantize_dynamic(x, (1, -1), "int8", True).shape == (0, 8)
    with pytest.raises(QuantizationError, match="empty tensor"):
        quant.choose_qparams(x, QSpec(IntFormat(8), PerTensor()))


def test_bad_arguments_raise_quantization_error():
    x = torch.randn(4, 6)
    scale = torch.ones(4, 1)
    with pytest.raises(QuantizationError, match=r"scale has shape \(4, 1\).*needs \(4, 2\)"):
        quant.quantize(x, scale, None, (1, 3), "int8")
    with pytest.raises(QuantizationError, match="block size"):
        quant.quantize(x, scale, None, (1,), "int8")
    with pytest.raises(QuantizationError, match="block size"):
        quant.quantize(x, scale, None, (1, 0), "int8")
    with pytest.raises(QuantizationError, match="2..8 bits"):
        quant.quantize(x, scale, None, (1, -1), "int9")
    with pytest.raises(QuantizationError, match="unknown format"):
        quant.quantize(x, scale, None, (1, -1), "fp6")
    with pytest.raises(QuantizationError, match="symmetric only"):
        quant.quantize(x, scale, torch.zeros(4, 1), (1, -1), "fp8_e4m3")
    with pytest.raises(QuantizationError, match="symmetric only"):
        quant.fake_quantize_dynamic(x, (1, -1), "nf4", False)
    with pytest.raises(ValueError):
        QSpec(format_from_name("nf4"), PerGroup(64), symmetric=False)
