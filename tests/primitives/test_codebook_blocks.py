"""The per-block codebook numerics of qpass.primitives.formats (nearest as a running minimum; encode, decode and
fake-quant per block without expanding the tables) against a tiny copy of the reference they replaced: the
table expanded to the tensor's shape, ``argmin`` of the distances, ``gather``. Bit for bit."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qpass.primitives import bcq as B  # noqa: F401 - registers the bcq formats
from qpass.primitives import formats as F
from qpass.primitives import quant as Q


def _ref_expand(table, block, shape):
    return torch.stack([Q.expand_to(table[..., i], block, shape) for i in range(table.shape[-1])], -1)


def _ref_nearest(y, table):
    return (y.unsqueeze(-1) - table).abs().argmin(-1)


def _ref_fake_quantize(x, scale, block, table, outliers=None, float_columns=None):
    """The implementation before the per-block one (formats.py at e3c45da), for codebook formats."""
    y, _, s = Q._code_units(x, scale, None, block, torch.float32)
    codes = _ref_nearest(y, _ref_expand(table.float(), block, x.shape)).to(torch.uint8)
    t = _ref_expand(table.float(), block, codes.shape)
    v = torch.gather(t.expand(*codes.shape, t.shape[-1]), -1, codes.long().unsqueeze(-1)).squeeze(-1)
    out = v * s
    cols = None
    if float_columns is not None:
        idx, axis = float_columns
        cols = (idx, axis, x.index_select(axis, idx))
    return codes, F.apply_side(out, outliers, cols)


CASES = [((6, 20), (1, 8)), ((20, 6), (8, 1)), ((5, 7), (1, -1)), ((4, 33), (1, 16)), ((3, 4, 10), (1, 2, 4)),
         ((7, 9), (3, 4)), ((1, 1), (1, 1)), ((8, 12), (-1, 5))]


def _inputs(shape, block, bits, seed, *, ties=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    scale = torch.rand(Q.scale_shape(shape, block), generator=g) + 0.25
    table = torch.randn(*scale.shape, 2 ** bits, generator=g)
    if ties:      # duplicate entries, and x on entries and exactly half-way between two of them
        table = (table * 4).round() / 4
        table[..., 1] = table[..., 0]
        y = ((torch.randn(shape, generator=g) * 8).round() / 8)
        x = y * Q.expand_to(scale, block, shape)
    return x, scale, table.half().float()


@pytest.mark.parametrize("shape,block", CASES)
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("ties", [False, True])
def test_per_block_codebook_matches_the_reference(shape, block, bits, ties):
    x, scale, table = _inputs(shape, block, bits, 3 * bits + len(shape), ties=ties)
    fmt = f"codebook{bits}"
    ref_codes, ref = _ref_fake_quantize(x, scale, block, table)
    codes = F.quantize_ext(x, scale, None, block, fmt, codebook=table)
    assert torch.equal(codes, ref_codes)
    assert torch.equal(F.dequantize_ext(codes, scale, None, block, fmt, codebook=table), ref)
    assert torch.equal(F.fake_quantize_ext(x, scale, None, block, fmt, codebook=table), ref)


def test_side_channels_and_bcq_match_the_reference():
    x, scale, table = _inputs((12, 40), (1, 16), 3, 7)
    idx, val, cols = torch.tensor([0, 17, 100]), torch.tensor([0.5, -1.0, 2.0]), torch.tensor([2, 39])
    _, ref = _ref_fake_quantize(x, scale, (1, 16), table, outliers=(idx, val), float_columns=(cols, 1))
    got = F.fake_quantize_ext(x, scale, None, (1, 16), "codebook3", codebook=table, outliers=(idx, val),
                              float_columns=(cols, 1))
    assert torch.equal(got, ref)
    ones = torch.ones_like(scale)
    _, ref = _ref_fake_quantize(x, ones, (1, 16), table)
    assert torch.equal(F.fake_quantize_ext(x, ones, None, (1, 16), "bcq3z", codebook=table), ref)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 40), st.integers(1, 9), st.integers(0, 10 ** 6), st.booleans())
def test_nearest_is_argmin(rows, cols, t, seed, coarse):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(rows, cols, generator=g)
    table = torch.randn(rows, 1, t, generator=g)
    if coarse:                                   # many exact ties
        y, table = (y * 2).round() / 2, (table * 2).round() / 2
    assert torch.equal(F.nearest(y, table), _ref_nearest(y, table))
    assert torch.equal(F.nearest(y.double(), table.double()), _ref_nearest(y.double(), table.double()))


def test_nearest_non_finite():
    table = torch.tensor([[0.5, -1.0, 2.0, 0.5]])
    y = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.75, 0.5, 1.25])
    assert torch.equal(F.nearest(y.unsqueeze(0), table.unsqueeze(1)), _ref_nearest(y.unsqueeze(0), table.unsqueeze(1)))
    for bad in (float("nan"), float("inf")):
        tb = table.clone()
        tb[0, 2] = bad
        assert torch.equal(F.nearest(y.unsqueeze(0), tb.unsqueeze(1)), _ref_nearest(y.unsqueeze(0), tb.unsqueeze(1)))
