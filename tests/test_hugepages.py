"""Packed weights on transparent huge pages (backends/torch_packed/hugepages.py): the copy is bit for bit, the
kernels read the moved weights, small tensors and switched-off machines are left alone, and a placed model saves
and loads like any other."""
import mmap

import pytest
import safetensors.torch
import torch

from qpass.primitives import quant as Q
from qpass.backends import torch_packed as tp
from qpass.backends.torch_packed import hugepages
from qpass.primitives.spec import PerTensor, QSpec, format_from_name

needs_thp = pytest.mark.skipif(not hugepages.available(), reason="no transparent huge pages here")


def linear(n: int, k: int, fmt: str = "int4", seed: int = 0) -> tuple[tp.PackedLinear, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    spec = QSpec(format_from_name(fmt), PerTensor(), symmetric=True)
    block = (1, 128) if fmt == "int4" else (1, -1)
    scale, zp = Q.choose_qparams(w, spec, block_size=block)
    return tp.PackedLinear.from_weight(w, scale, zp, block, fmt, bias=b), torch.randn(3, k, generator=g)


@needs_thp
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.float32])
def test_to_huge_copies_bit_for_bit_into_an_aligned_mapping(dtype):
    t = (torch.randn(1000, 700) * 50).to(dtype)
    h = hugepages.to_huge(t)
    assert h.dtype == t.dtype and h.shape == t.shape and h.is_contiguous() and torch.equal(h, t)
    assert h.data_ptr() % hugepages.HUGE == 0 and h.data_ptr() != t.data_ptr()
    before = t[0, 0].clone()
    h[0, 0] = before + 1                                 # writable, and its own memory: t keeps its value
    assert t[0, 0] == before and h[0, 0] != before


@needs_thp
@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_place_moves_large_packed_weights_and_the_kernels_read_them(fmt):
    big, x = linear(2048, 2048 if fmt == "int4" else 1024, fmt)     # qweight 2 MB: moved
    small, xs = linear(64, 256, fmt)                                  # stays
    root = torch.nn.ModuleDict({"big": big, "small": small})
    tp.kernels.tune([big, small], "auto", repeats=1)
    before, before_small = big(x), small(xs)
    old, old_small = big.qweight.data_ptr(), small.qweight.data_ptr()
    moved = hugepages.place(root)
    assert moved == big.qweight.numel() * big.qweight.element_size()
    assert big.qweight.data_ptr() != old and big.qweight.data_ptr() % hugepages.HUGE == 0
    assert small.qweight.data_ptr() == old_small
    assert torch.equal(big(x), before) and torch.equal(small(xs), before_small)
    assert hugepages.place(root) == moved                 # idempotent in effect: a second copy, same values
    assert torch.equal(big(x), before)


def test_place_does_nothing_where_switched_off(monkeypatch):
    big, x = linear(2048, 2048)
    ptr = big.qweight.data_ptr()
    monkeypatch.setenv(hugepages.ENV, "0")
    assert not hugepages.available() and hugepages.place(big) == 0 and big.qweight.data_ptr() == ptr
    monkeypatch.delenv(hugepages.ENV)
    monkeypatch.delattr(mmap, "MADV_HUGEPAGE", raising=False)
    assert not hugepages.available() and hugepages.place(big) == 0


@needs_thp
def test_placed_tensors_save_and_load_as_any_tensor(tmp_path):
    h = hugepages.to_huge(torch.arange(3 << 20, dtype=torch.int32).to(torch.int8).reshape(3072, 1024))
    safetensors.torch.save_file({"w": h}, tmp_path / "w.safetensors")
    assert torch.equal(safetensors.torch.load_file(tmp_path / "w.safetensors")["w"], h)
    assert torch.equal(h.clone(), h) and torch.equal(h.to(torch.float32).to(torch.int8), h)
