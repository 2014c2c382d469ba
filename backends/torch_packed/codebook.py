"""``CodebookLinear``: a learned-codebook weight held as packed b-bit codes plus its tables, decoded by lookup.

A weight quantizer ``fake_quantize_ext(W, scale, None, block, 'codebook<b>', table, [outliers])`` (SqueezeLLM's
per-channel LUTs, BCQ's per-group tables: any ``formats.Codebook``) becomes, in the canonical ``[N, K]``
(out, in) orientation whatever layout the graph consumed:

    qweight        the codes packed at exactly b bits (``packing``: ``dense`` for 1, 2 and 4 bits, ``dense3`` for
                   3 (8 codes in 3 bytes), ``bitplanes`` for 5, 6 and 7, plain uint8 for 8; 3-bit codes saved as
                   bit planes by an earlier qpass are converted when loaded)
    table, scale   the per-block tables ``[Sn, Sk, 2^b]`` and scales ``[Sn, Sk]`` in the dtype the graph holds them
                   (fp16 when the pass stores them so: the squeezellm pass does), never widened. BCQ (``bcq<q>[z]``):
                   the q planes' α's ``bcq_alpha [Sn, Sk, q]`` and offset ``bcq_z [Sn, Sk]`` in fp16, as the bcq
                   pass fits them (:func:`bcq_factors`); the table (``bcq.table``) and the scale (1) are derived
                   when built or loaded, not saved
    outlier_index  the sparse side channel, when present: int32 flat indices into ``[N, K]`` and the values
    outlier_value  in the graph's dtype, added after decoding

    W = (table * scale[..., None]).flat[((n // bn) * Sk + k // bk) * 2^b + code[n, k]] ; W.flat[index] += value

The scale is folded into the (small) table before the lookup: one float32 product per table entry, the very
product the reference computes per element (``formats.dequantize_ext``: ``table[code] * scale``), so the
weight is the fake-quant weight bit for bit. The forward decodes a tile of output rows at a time (unpack, a
gather along K, the tile's sparse values found by binary search in the sorted indices) and multiplies it
(``F.linear``) into its slice of the output: the float weight never exists whole and is not kept. That is
the reference route (kernel ``dequant``). The native route (kernel ``lutavx2``, 1..4-bit codes, table groups of
a multiple of 8 columns, where native.py's library builds) reads the stored codes in place and decodes them by
a table lookup in registers, FMA'd against x, the sparse values added per row in the same pass
(csrc/q4avx2.c ``lut_linear``): exact up to fp32 summation order. Which runs is the same measured per-shape,
per-M-bucket choice PackedLinear makes (kernels.tune; ``plan`` maps an M bucket to a kernel, the reference
where none is set). The state dict holds only codes at b bits, tables, scales and the side channel
(test_squeezellm measures it); the kernel's fp32 tables (scale folded in) and row pointers are derived when it
is bound, never saved. An input quantizer is applied as ``ExtLinear`` does (this is its subclass: same
forward, another ``weight()``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from qpass.primitives import bcq, formats
from qpass.primitives import quant as Q

from . import packing as P
from .ext import ExtLinear
from .kernels import Planned, bucket


TILE_ELEMENTS = 1 << 18      # weight elements decoded at a time (1 MB of fp32: stays in cache)


def _pack(u: Tensor, bits: int) -> Tensor:
    if bits == 8:
        return u.to(torch.uint8).contiguous()
    if bits == 3:
        return P.pack_dense3(u)
    if bits in P.DENSE_BITS:
        return P.pack_dense(u, bits)
    return P.pack_bitplanes(u, bits)


def _unpack(q: Tensor, bits: int, k: int) -> Tensor:
    if bits == 8:
        return q
    if bits == 3:
        return P.unpack_dense3(q, k)
    if bits in P.DENSE_BITS:
        return P.unpack_dense(q, bits, k)
    return P.unpack_bitplanes(q, bits, k)


def packed_shape(bits: int, n: int, k: int) -> tuple[int, ...]:
    """Shape of the packed codes of an [n, k] weight at `bits`."""
    if bits == 8:
        return (n, k)
    if bits == 3:
        return (n, 3 * -(-k // 8))
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


def bcq_factors(table: Tensor, q: int, offset: bool) -> tuple[Tensor, Tensor | None]:
    """BCQ's per-group α's [..., q] and offset z [...] (fp16, as the bcq pass fits them) from its 2^q-entry
    tables [..., 2^q] (``bcq.table``: entry c = z + sum_i α_i (2 bit_i(c) - 1)): α_i = (T[2^i] - T[0]) / 2 and
    z = T[0] + sum α. Exact where the table's sums of fp16 values were exact in fp32 (exponents within 13 bits
    of each other: every fit seen); CodebookLinear rebuilds the table from them with ``bcq.table``."""
    t = table.float()
    alpha = torch.stack([(t[..., 1 << i] - t[..., 0]) / 2 for i in range(q)], -1)
    z = t[..., 0] + alpha.sum(-1) if offset else None
    return alpha.half(), None if z is None else z.half()


@dataclass(frozen=True)
class CodebookFormat:
    """What kernels.tune reads of a CodebookLinear (a PackedLinear's ``wf``): shape, format and layout."""

    fmt: str
    n: int
    k: int
    block: tuple
    table: str
    sparse: bool
    layout: str = "codebook"

    @property
    def kp(self) -> int:
        return self.k

    def describe(self) -> str:
        return f"{self.fmt} block {list(self.block)} table {self.table}{' + sparse' if self.sparse else ''}"


class CodebookLinear(Planned, ExtLinear):
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
        fmt_obj = formats.get_format(fmt)
        self.bcq_offset = getattr(fmt_obj, "offset", None) if isinstance(fmt_obj, bcq.BinaryCoding) else None
        if self.bcq_offset is not None:           # BCQ: the q planes' α's (+ z) stored, table and scale derived
            alpha, z = bcq_factors(codebook, self.bits, self.bcq_offset)
            tensors.update(bcq_alpha=alpha, bcq_z=z)
            self._bcq_dtypes = (codebook.dtype, scale.dtype)
        derived = ("codebook", "scale") if self.bcq_offset is not None else ()
        for key, v in tensors.items():
            self.register_buffer(key, None if v is None else v.detach().clone(), persistent=key not in derived)
        if self.bcq_offset is not None:
            self._bcq_rebuild()
        self.zero = self.float_index = self.float_values = self.scale_scale = self.input_float_index = None
        self.float_axis = self.input_float_axis = -1
        self.scale_block, self.scale_fmt = [], ""
        self.wf = CodebookFormat(fmt, n, k, tuple(block), f"{list(codebook.shape)} "
                                 f"{str(codebook.dtype).removeprefix('torch.')}", outliers is not None)
        self.in_rank = 2
        self._plan: dict[int, str] = {}
        self._runners: dict = {}

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

    # ----------------------------------------------------------------------------------- kernels

    def _load_from_state_dict(self, state_dict, prefix, *args, **kw):
        key = prefix + "qweight"
        if self.bits == 3 and key in state_dict and state_dict[key].dim() == 3:     # bit planes (qpass before dense3)
            state_dict[key] = P.pack_dense3(P.unpack_bitplanes(state_dict[key], 3, self.k))
        super()._load_from_state_dict(state_dict, prefix, *args, **kw)
        if self.bcq_offset is not None:
            self._bcq_rebuild()
        if self._runners:
            self._bind()                 # the native runner holds tables derived from the loaded ones

    def _bcq_rebuild(self) -> None:
        """BCQ: the table (``bcq.table`` of the stored α's and z, as the pass computes it) and the scale (1)."""
        table_dtype, scale_dtype = self._bcq_dtypes
        z = None if self.bcq_z is None else self.bcq_z.float()
        self.codebook = bcq.table(self.bcq_alpha.float(), z).to(table_dtype)
        self.scale = torch.ones(self.bcq_alpha.shape[:-1], dtype=scale_dtype, device=self.bcq_alpha.device)

    @property
    def storage(self) -> str:
        """packing layout of ``qweight``: 'dense' (1, 2, 4 bits), 'dense3', 'bitplanes' or 'uint8' (8 bits)."""
        return "uint8" if self.bits == 8 else "dense3" if self.bits == 3 else \
            "dense" if self.bits in P.DENSE_BITS else "bitplanes"

    def native_applies(self) -> bool:
        """lutavx2 can run it: 1..4-bit codes, table groups of a multiple of 8 columns (or one per row), an
        fp32 / fp16 / bf16 weight, on the CPU."""
        sk = self.codebook.shape[1]
        bk = self.k if self.block[1] == -1 else self.block[1]
        return (self.bits <= 4 and self.codebook.dim() == 3 and (sk == 1 or bk % 8 == 0) and self.qweight.is_contiguous()
                and self.qweight.device.type == "cpu"
                and self.dtype in (torch.float32, torch.float16, torch.bfloat16))

    def lut_tensors(self) -> dict:
        """The arguments of ``native.lut_linear`` for this module (derived, fp32; see the module doc)."""
        t = self._table().to(self.dtype).float()                 # the reference's decoded values exactly
        sn, sk, size = t.shape
        table = torch.zeros(sn, sk, 16 if self.bits == 4 else 8)
        table[..., :size] = t
        kw = {"qweight": self.qweight, "table": table, "bits": self.bits, "layout": self.storage, "k": self.k,
              "bn": self.n if self.block[0] == -1 else self.block[0],
              "bk": self.k if self.block[1] == -1 else self.block[1],
              "bias": None if self.bias is None else self.bias.float().contiguous()}
        if self.outlier_index is not None:
            index = self.outlier_index.to(torch.int32).contiguous()
            kw["rowptr"] = torch.searchsorted(index, torch.arange(self.n + 1, dtype=torch.int64) * self.k)
            kw["index"], kw["value"] = index, self.outlier_value.float().contiguous()
        return kw

    def input_fake_quant(self, x: Tensor) -> Tensor:
        a = self.act
        if a is None:
            return x
        return Q.fake_quantize_dynamic(x, list(a.block), a.fmt, a.symmetric, a.clip_ratio) if a.dynamic else \
            Q.fake_quantize(x, self.input_scale, self.input_zero, list(a.block), a.fmt)

    def forward(self, x: Tensor) -> Tensor:
        if self._runners:
            return self._runners[bucket(x.numel() // self.k)](x)
        return self.reference(x)

    def reference(self, x: Tensor) -> Tensor:
        """The reference route: decode a tile of rows at a time, F.linear (kernel ``dequant``)."""
        a = self.act
        if a is not None:
            x = Q.fake_quantize_dynamic(x, list(a.block), a.fmt, a.symmetric, a.clip_ratio) if a.dynamic else \
                Q.fake_quantize(x, self.input_scale, self.input_zero, list(a.block), a.fmt)
        table, step = self._table(), max(1, TILE_ELEMENTS // max(self.k, 1))
        if step >= self.n:
            return F.linear(x, self._rows(table, 0, self.n), self.bias)
        # NOTE: decoded a tile of rows at a time (cache-sized): the float weight never exists whole
        out = torch.cat([F.linear(x, self._rows(table, r0, min(r0 + step, self.n)))
                         for r0 in range(0, self.n, step)], -1)
        return out if self.bias is None else out + self.bias

    def weight_bytes(self) -> int:
        """Bytes held for the weight: codes, tables, scales (BCQ: the α's and z) and sparse values as stored (the
        derived tables are not counted)."""
        ts = (self.qweight, self.bcq_alpha, self.bcq_z) if self.bcq_offset is not None else \
            (self.qweight, self.codebook, self.scale)
        ts += (self.outlier_index, self.outlier_value)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def extra_repr(self) -> str:
        side = "outliers" if self.outlier_index is not None else "none"
        return (f"{self.name}: {self.fmt} [{self.n}, {self.k}] block {self.block}, table "
                f"{list(self.codebook.shape)} {str(self.codebook.dtype).removeprefix('torch.')}, side {side} "
                f"(b-bit codes; plan {dict(sorted(self.plan.items())) or 'reference'})")
