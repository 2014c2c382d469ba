"""Hypothesis strategies shared by the primitives tests: random shapes, block sizes and data."""
import torch
from hypothesis import strategies as st

INT_FORMATS = [f"int{b}" for b in range(2, 9)]
OTHER_FORMATS = ["fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "nf4"]


@st.composite
def shapes_and_blocks(draw, max_rank=4, max_dim=9):
    """(shape, block_size): each dim's block is -1, 1 or a length that may not divide the dim."""
    rank = draw(st.integers(1, max_rank))
    shape = tuple(draw(st.integers(1, max_dim)) for _ in range(rank))
    block = tuple(draw(st.sampled_from([-1, 1, 2, 3, n, n + 2])) for n in shape)
    return shape, block


@st.composite
def data(draw, shape):
    """Random normal data at a random magnitude, sometimes with an outlier, sometimes with exact zeros."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(shape, generator=g) * draw(st.sampled_from([1e-3, 1.0, 50.0]))
    if draw(st.booleans()):
        x.view(-1)[0] = x.abs().max() * 20 + 1
    if draw(st.booleans()):
        x = x * (torch.rand(shape, generator=g) > 0.3)
    return x
