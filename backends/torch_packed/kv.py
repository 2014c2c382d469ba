"""A static K or V cache stored low-bit: codes (+ per-block scales, zero points) instead of floats.

Replaces, in a decode graph, ``index_copy_(cache, 2, pos, kv_quantizer(k))`` (the cache write the
``kv_cache`` pass quantized): ``forward(k, pos)`` quantizes the new rows exactly as the quantizer does
(dynamic scales per token / head / group, or the static ones), writes codes and scales at ``pos`` and
returns the whole cache dequantized [batch, heads, max_len, head_dim] for attention. What attention sees
is bit for bit the fake-quant graph's cache at every written position; unwritten positions are masked.

Codes: 8-bit formats one byte each (int8 / uint8 / float8 bits), 1-, 2- and 4-bit formats packed along
head_dim (two int4 codes per byte), other widths one byte per code. Scales float32, one per block; asymmetric
int formats (dynamic or static) also a zero point per block, one byte (uint8) for dynamic scales.

The common formats, dynamic symmetric int4 / int8 with a scale per token and head (block [1, 1, 1, -1]) or per
token over all heads (block [1, -1, 1, -1], LLM-QAT's per-token KV), with fp32 rows: where the native library is there (native.available(), decided at the first call), a step is two
native calls (``native.kv_store``, ``native.kv_load``) instead of ~25 torch ops. They store the same bytes
(codes and scales) as the torch path and return the same values, bit for bit.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from qpass.primitives import quant as Q

from . import native
from . import packing as P
from .linear import storage_codes


class PackedKVCache(nn.Module):
    def __init__(self, shape, fmt: str, block, symmetric: bool, *, scale: Tensor | None = None,
                 zero_point: Tensor | None = None, name: str = "", dtype: torch.dtype = torch.float32,
                 clip_ratio: float = 1.0):
        super().__init__()
        self.shape, self.fmt, self.block, self.symmetric = tuple(shape), fmt, list(block), symmetric
        self.clip_ratio = float(clip_ratio)          # dynamic scales: each block's min/max times this
        self.dtype = dtype                           # of the float cache this replaces (what attention reads)
        self.dynamic, self.name = scale is None, name
        f = Q.parse_format(fmt)
        self.bits, self.kind = f.bits, f.kind
        d = self.shape[-1]
        width = -(-d * self.bits // 8) if self.bits in P.DENSE_BITS else d
        # the native store / load (see the module doc): its bits where the format is the common one, else None;
        # _native: whether they are used, decided at the first call (None: not yet; reset by .to() and the like)
        # NOTE: the native kv_store computes absmax / qmax: a clip ratio takes the torch path
        common = (self.dynamic and symmetric and f.kind == "int" and self.block in ([1, 1, 1, -1], [1, -1, 1, -1])
                  and self.clip_ratio == 1.0
                  and (self.bits == 8 or (self.bits == 4 and d % 2 == 0)))
        self._native_bits = self.bits if common else None
        self._native: bool | None = None
        self.register_buffer("codes", torch.zeros(*self.shape[:-1], width, dtype=torch.uint8))
        sshape = Q.scale_shape(self.shape, self.block)
        if self.dynamic:
            self.register_buffer("scale", torch.zeros(sshape))
            # asymmetric int: one zero point per block, an integer code in [0, 2^b - 1] (QuaRot's KV quantizer)
            self.register_buffer("zero", None if symmetric or f.kind != "int" else
                                 torch.zeros(sshape, dtype=torch.uint8))
        else:
            self.register_buffer("scale", scale.detach().float().clone())
            self.register_buffer("zero", zero_point.detach().clone() if zero_point is not None else None)

    def _encode(self, q: Tensor) -> Tensor:
        u = storage_codes(q, self.fmt, self.symmetric) if not (self.kind == "int" and self.bits == 8) else q
        u = u.view(torch.uint8)
        if self.bits in P.DENSE_BITS:
            lead = u.shape[:-1]
            u = P.pack_dense(u.reshape(-1, u.shape[-1]), self.bits).reshape(*lead, -1)
        return u

    def _decode(self, n: int | None = None) -> Tensor:
        u = self.codes if n is None else self.codes[:, :, :n]
        if self.bits in P.DENSE_BITS:
            u = P.unpack_dense(u.reshape(-1, u.shape[-1]), self.bits, self.shape[-1]).reshape(*u.shape[:-1], -1)
        if self.kind == "float" and self.bits == 8:
            return u.view(Q.FP8_DTYPES[self.fmt])
        if self.kind == "int":
            if self.bits == 8:
                return u.view(torch.int8) if self.symmetric else u
            if self.symmetric:
                return (u.to(torch.int16) - (1 << (self.bits - 1))).to(torch.int8)
        return u

    def forward(self, k: Tensor, pos: Tensor, n_keys: int | None = None) -> Tensor:
        """Write `k` at `pos`; return the cache dequantized (its first `n_keys` slots only, when given)."""
        use = self._native
        if use is None:
            use = self._native = self._native_ready()
        if use and k.dtype is torch.float32:
            buf = self._buffers                     # one dict lookup each instead of nn.Module.__getattr__
            codes, scale = buf["codes"], buf["scale"]
            native.kv_store(k, pos, codes, scale, self._native_bits)
            return native.kv_load(codes, scale, n_keys, self._native_bits, self.dtype)
        if self._fast:
            q = self._fast_codes(k.float(), pos)
        else:
            if self.dynamic:
                scale, zp = Q.dynamic_qparams(k, self.block, self.fmt, self.symmetric, self.clip_ratio)
                self.scale.index_copy_(2, pos, scale)
                if zp is not None:       # integral floats in [0, 2^b - 1] (a NaN block's NaN scale decides)
                    self.zero.index_copy_(2, pos, zp.nan_to_num(0.0).to(self.zero.dtype))
            else:
                scale, zp = self.scale, self.zero
            q = Q.quantize(k, scale, zp, self.block, self.fmt)
        self.codes.index_copy_(2, pos, self._encode(q))
        return self.dequantize(n_keys)

    def _native_ready(self) -> bool:
        """Whether forward takes the native store / load (fp32 rows permitting): the common format, CPU buffers
        as created (fp32 scales) and the library there (native.available(): not with QPASS_NO_NATIVE set)."""
        codes, scale = self._buffers["codes"], self._buffers["scale"]
        return (self._native_bits is not None and codes.device.type == "cpu" and scale.device.type == "cpu"
                and codes.dtype == torch.uint8 and scale.dtype == torch.float32 and native.available())

    def _apply(self, fn, *args, **kwargs):
        self._native = None                         # buffers moved or cast: decide again at the next call
        return super()._apply(fn, *args, **kwargs)

    def __setstate__(self, state):
        super().__setstate__(state)
        self._native = None                         # deep copies: decide again, here

    @property
    def _fast(self) -> bool:
        """Dynamic symmetric int scales over whole dims (per token, per token and head): a short path."""
        return self.dynamic and self.symmetric and self.kind == "int" and all(b in (1, -1) for b in self.block)

    def _fast_codes(self, k: Tensor, pos: Tensor) -> Tensor:
        """Codes of `k` and its scales written at `pos`, as ``dynamic_qparams`` + ``quantize`` give them
        ((clip_ratio *) absmax / qmax floored at SCALE_FLOOR; a block holding inf/NaN dequantizes to NaN either way)."""
        lo, hi = Q.qrange(self.fmt, True)
        dims = [i for i, b in enumerate(self.block) if b == -1]
        amax = k.abs().amax(dim=dims, keepdim=True)
        if self.clip_ratio != 1.0:
            amax = amax.mul_(self.clip_ratio)
        s = amax.div_(hi).clamp_(min=Q.SCALE_FLOOR)
        self.scale.index_copy_(2, pos, s)
        return (k / s).round_().clamp_(lo, hi).to(torch.int8)

    def dequantize(self, n: int | None = None) -> Tensor:
        """The cache as floats, all of it or its first `n` slots: (q - z) * s rounded once, as
        ``Q.dequantize`` computes it, but with the zero point subtracted in integers and one promoting
        multiply (per-token blocks broadcast as they are)."""
        if n is not None and n >= self.shape[2]:
            n = None
        if n is not None and self.block[2] not in (1, -1):   # blocks spanning positions: decode all, then cut
            return self.dequantize()[:, :, :n]
        shape = self.shape if n is None else (*self.shape[:2], n, self.shape[3])
        q = self._decode(n)
        s, z = self._slots(self.scale, n), self._slots(self.zero, n)
        g = self.block[-1]
        if any(b > 1 for b in self.block[:-1]) or self.kind == "lut" or self.fmt == "fp4_e2m1":
            return Q.dequantize(q, s, z, self.block, self.fmt, self.dtype)
        if g > 1:                                   # groups along head_dim: [.., D/g, g] x [.., D/g, 1]
            q, s = q.view(*q.shape[:-1], -1, g), s.unsqueeze(-1)
            z = z.unsqueeze(-1) if z is not None else None
        if self.kind == "float":
            q = q.float()
        elif z is not None:
            q = q.to(torch.int16) - z.to(torch.int16)
        return torch.mul(q, s).view(shape).to(self.dtype)

    @staticmethod
    def _slots(t: Tensor | None, n: int | None) -> Tensor | None:
        """A scale/zero tensor cut to the first n positions (dim 2) when it has one entry per position."""
        return t if t is None or n is None or t.shape[2] == 1 else t[:, :, :n]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero) if t is not None)

    def float_nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return 4 * n

    def extra_repr(self) -> str:
        kind = "dynamic" if self.dynamic else "static"
        clip = f" clip {self.clip_ratio:g}" if self.clip_ratio != 1.0 else ""
        return f"{list(self.shape)}, {self.fmt} block={self.block} {kind}{clip}"
