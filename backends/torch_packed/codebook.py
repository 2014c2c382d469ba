"""``CodebookLinear``: a learned-codebook weight held as packed b-bit codes plus its tables, decoded by lookup.

A weight quantizer ``fake_quantize_ext(W, scale, None, block, 'codebook<b>', table, [outliers])`` (SqueezeLLM's
per-channel LUTs, BCQ's per-group tables: any ``formats.Codebook``) becomes, in the canonical ``[N, K]``
(out, in) orientation whatever layout the graph consumed:

    qweight        the codes packed at exactly b bits (``packing``: ``dense`` for 1, 2 and 4 bits, ``bitplanes``
                   for 3, 5, 6 and 7, plain uint8 for 8)
    table, scale   the per-block tables ``[Sn, Sk, 2^b]`` and scales ``[Sn, Sk]`` in the dtype the graph holds them
                   (fp16 when the pass stores them so: the squeezellm pass does), never widened
    outlier_index  the sparse side channel, when present: int32 flat indices into ``[N, K]`` and the values
    outlier_value  in the graph's dtype, added after decoding

    W = (table * scale[..., None]).flat[((n // bn) * Sk + k // bk) * 2^b + code[n, k]] ; W.flat[index] += value

The scale is folded into the (small) table before the lookup: one float32 product per table entry, the very
product the reference computes per element (``formats.dequantize_ext``: ``table[code] * scale``), so the
weight is the fake-quant weight bit for bit. The forward decodes a tile of output rows at a time (unpack, a
gather along K, the tile's sparse values found by binary search in the sorted indices) and multiplies it
(``F.linear``) into its slice of the output: the float weight never exists whole and is not kept. This is a
reference-speed route (no native lookup kernel: docs/results_squeezellm.md has the timings). The state dict holds only codes at b bits,
tables, scales and the side channel (test_squeezellm measures it). An input quantizer is applied as
``ExtLinear`` does (this is its subclass: same forward, another ``weight()``).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from qpass.primitives import formats
from qpass.primitives import quant as Q

from . import packing as P
from .ext import ExtLinear


TILE_ELEMENTS = 1 << 18      # weight elements decoded at a time (1 MB of fp32: stays in cache)


def _pack(u: Tensor, bits: int) -> Tensor:
    if bits == 8:
        return u.to(torch.uint8).contiguous()
    if bits in P.DENSE_BITS:
        return P.pack_dense(u, bits)
    return P.pack_bitplanes(u, bits)


def _unpack(q: Tensor, bits: int, k: int) -> Tensor:
    if bits == 8:
        return q
    if bits in P.DENSE_BITS:
        return P.unpack_dense(q, bits, k)
    return P.unpack_bitplanes(q, bits, k)


def packed_shape(bits: int, n: int, k: int) -> tuple[int, ...]:
    """Shape of the packed codes of an [n, k] weight at `bits`."""
    if bits == 8:
        return (n, k)
    if bits in P.DENSE_BITS:
        return (n, -(-k * bits // 8))
    return (bits, n, -(-k // 8))


def canonical(w: Tensor, scale: Tensor, table: Tensor, block, outliers, in_axis: int):
    """(w, scale, table, block, outliers) of a quantizer that sees its weight with the input axis `in_axis`,
    turned to [N, K] (flat outlier indices remapped)."""
    block = list(block)
    if in_axis == 1:
        return w, scale, table, block, outliers
    rows, cols = w.shape                     # the quantizer's view is [K, N]
    if outliers is not None:
        i = outliers[0].long()
        outliers = ((i % cols) * rows + i // cols, outliers[1])
    return w.t(), scale.t(), table.transpose(0, 1), block[::-1], outliers


def block_index(n: int, k: int, block, scale_shape) -> Tensor:
    """[N, K] int64: the flat index of each element's table row ``(n // bn) * Sk + k // bk`` times nothing
    (callers multiply by the table size). Blocks of -1 are whole dimensions."""
    sn, sk = scale_shape
    bn = n if block[0] == -1 else block[0]
    bk = k if block[1] == -1 else block[1]
    rows = torch.arange(n) // max(bn, 1)
    cols = torch.arange(k) // max(bk, 1)
    return (rows.clamp(max=sn - 1)[:, None] * sk + cols.clamp(max=sk - 1)[None, :])


class CodebookLinear(ExtLinear):
    """y = linear(input_fq(x), lookup(codes, table * scale) + outliers, bias); see the module doc."""

    def __init__(self, *, fmt: str, block, codes: Tensor, scale: Tensor, codebook: Tensor,
                 outliers: tuple | None, bias: Tensor | None, dtype: torch.dtype = torch.float32, act=None,
                 act_scale: Tensor | None = None, act_zero: Tensor | None = None, name: str = ""):
        nn.Module.__init__(self)
        n, k = codes.shape
        self.fmt, self.block, self.transpose, self.act, self.name = fmt, list(block), False, act, name
        self.bits, self.n, self.k, self.dtype = formats.get_format(fmt).bits, n, k, dtype
        if outliers is not None and n * k >= 2 ** 31:
            raise ValueError("CodebookLinear stores int32 outlier indices: weights under 2^31 elements")
        if outliers is not None:                  # sorted: a tile of rows finds its values by binary search
            order = outliers[0].long().argsort()
            outliers = (outliers[0][order], outliers[1][order])
        tensors = {"qweight": _pack(codes, self.bits), "scale": scale, "codebook": codebook, "bias": bias,
                   "outlier_index": outliers[0].to(torch.int32) if outliers else None,
                   "outlier_value": outliers[1] if outliers else None,
                   "input_scale": act_scale, "input_zero": act_zero}
        for key, v in tensors.items():
            self.register_buffer(key, None if v is None else v.detach().clone())
        self.zero = self.float_index = self.float_values = self.scale_scale = self.input_float_index = None
        self.float_axis = self.input_float_axis = -1
        self.scale_block, self.scale_fmt = [], ""

    @classmethod
    def from_weight(cls, w: Tensor, *, scale, block, fmt, codebook, outliers=None, in_axis: int = 1,
                    **kw) -> "CodebookLinear":
        """Quantize `w` (laid out as the quantizer sees it; `in_axis` its input axis) as fake_quantize_ext does."""
        codes = formats.quantize_ext(w, scale, None, block, fmt, codebook=codebook)
        kw.setdefault("dtype", w.dtype)
        codes, scale, codebook, block, outliers = canonical(codes, scale, codebook, block, outliers, in_axis)
        return cls(fmt=fmt, block=block, codes=codes.contiguous(), scale=scale.contiguous(),
                   codebook=codebook.contiguous(), outliers=outliers, **kw)

    def codes(self, r0: int = 0, r1: int | None = None) -> Tensor:
        """The [r1 - r0, K] uint8 codes of rows r0:r1 (all rows by default)."""
        r1 = self.n if r1 is None else r1
        q = self.qweight[:, r0:r1] if self.qweight.dim() == 3 else self.qweight[r0:r1]
        return _unpack(q, self.bits, self.k)

    def _table(self) -> Tensor:
        dtype = torch.promote_types(self.dtype, torch.float32)      # formats.dequantize_ext's arithmetic
        return self.codebook.to(dtype) * self.scale.to(dtype).unsqueeze(-1)        # [Sn, Sk, T], tiny

    def _rows(self, table: Tensor, r0: int, r1: int) -> Tensor:
        """Rows r0:r1 of the decoded weight, sparse values added."""
        sn, sk, size = table.shape
        codes = self.codes(r0, r1).long()
        if sn == self.n:               # a table row per output row (per channel / per group): gather along K
            if sk > 1:
                bk = self.k if self.block[1] == -1 else self.block[1]
                codes = codes + ((torch.arange(self.k) // bk).clamp(max=sk - 1) * size).unsqueeze(0)
            w = table[r0:r1].reshape(r1 - r0, sk * size).gather(1, codes).to(self.dtype)
        else:                          # blocks along N too: flat lookup
            idx = block_index(self.n, self.k, self.block, (sn, sk))[r0:r1] * size + codes
            w = table.reshape(-1)[idx].to(self.dtype)
        if self.outlier_index is not None:
            lo, hi = torch.searchsorted(self.outlier_index, torch.tensor([r0 * self.k, r1 * self.k],
                                                                         dtype=self.outlier_index.dtype)).tolist()
            if hi > lo:
                w = w.reshape(-1).index_add(0, self.outlier_index[lo:hi].long() - r0 * self.k,
                                            self.outlier_value[lo:hi].to(w.dtype)).reshape(w.shape)
        return w

    def weight(self) -> Tensor:
        return self._rows(self._table(), 0, self.n)

    def forward(self, x: Tensor) -> Tensor:
        a = self.act
        if a is not None:
            x = Q.fake_quantize_dynamic(x, list(a.block), a.fmt, a.symmetric) if a.dynamic else \
                Q.fake_quantize(x, self.input_scale, self.input_zero, list(a.block), a.fmt)
        table, step = self._table(), max(1, TILE_ELEMENTS // max(self.k, 1))
        if step >= self.n:
            return F.linear(x, self._rows(table, 0, self.n), self.bias)
        # NOTE: decoded a tile of rows at a time (cache-sized): the float weight never exists whole
        out = torch.cat([F.linear(x, self._rows(table, r0, min(r0 + step, self.n)))
                         for r0 in range(0, self.n, step)], -1)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        side = "outliers" if self.outlier_index is not None else "none"
        return (f"{self.name}: {self.fmt} [{self.n}, {self.k}] block {self.block}, table "
                f"{list(self.codebook.shape)} {str(self.codebook.dtype).removeprefix('torch.')}, side {side} "
                "(b-bit codes, table lookup + matmul)")
