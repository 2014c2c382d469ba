"""``PackedLinear``: one fake-quantized linear held as packed codes + scales, run by a chosen kernel.

A weight quantizer ``fake_quantize(W, scale, zero_point, block, fmt)`` becomes *storage codes* ``u`` in a
canonical ``[N, K]`` (out, in) orientation, whatever layout the graph consumed (``linear``: [out, in];
``mm``/``addmm``/``matmul``: [in, out]):

    int, b < 8 bits   u = q + 2^(b-1) (symmetric) or q (asymmetric)    value = (u - zu) * s,
                      zu = 2^(b-1) or the zero point                   packed 8/b per byte or in bit planes
    int8              int8 c = q (symmetric) or q - 128 (asymmetric)   value = (c + 128·asym - zp) * s
    fp8               the float8 codes                                 value = float(u) * s
    fp4_e2m1, nf4     4-bit table indices, two per byte                value = TABLE[u] * s

so ``dequantize`` here reproduces ``qpass.primitives.fake_quantize`` bit for bit. Scales stay float32
(``[N or 1 or N/bn, groups]``), zero points uint8. The input (activation) quantizer, if any, moves into the
module too, because which kernel runs decides whether it is applied as fake-quant (float kernels) or as
integer codes (``int_mm``).

An input quantizer with threshold columns (LLM.int8()'s dynamic outlier features, ``ActFormat.threshold``) runs
as the paper's decomposition: per call, the features whose max |x| over the call reaches the threshold are
found, the chosen kernel (int_mm, i8avx2, ...: any W8A8 kernel) runs on the input with those features zeroed
(so they neither widen a token's scale nor enter the int8 product), and x[:, O] (float) times the stored
weight's columns O (dequantized, [N, |O|]) is added: y = int8 GEMM + a small float GEMM. Equal to the
fake-quant graph up to float summation order.

Memory layout of int4 weights (one copy, chosen by :func:`choose_layout` when the module is built or
loaded): ``q4`` when our own kernel (native.py, csrc/q4avx2.c) builds on this machine and the groups are
whole 16-column chunks (group % 16 == 0, or per channel); else ``int4pack`` when torch's CPU int4pack kernel
takes the shape; else ``dense``. q4 wins over int4pack whenever it is available: its kernel computes in fp32
(exact, where int4pack rounds activations, scales and results to bf16) and measured faster at every shape
and M in docs/benchmarks.md (the W4 int4pack rows there are a second module built with ``layout="int4pack"``),
and the ``dequant`` fallback reads any layout through :meth:`PackedLinear.codes`. So the layout is a fixed
function of the format and of what this machine can run, never of a timing, and stays reproducible.

State dict: ``qweight`` (canonical layout: int4 is two codes per byte, low nibble first, even when the
running kernel keeps the q4 or CPU int4pack layout in memory; loading converts it to this machine's layout,
so saved models do not depend on which kernels the saving or the loading machine has), ``scale``, ``zero``
(asymmetric), ``bias``, ``input_scale`` / ``input_zero`` (static activations). Kernel-specific tensors (bf16
scale/zero pairs, column sums, per-row scales of block-quantized q4 weights) are derived buffers, rebuilt
after loading and never saved.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from qpass.primitives import quant as Q

from . import native
from . import packing as P
from .kernels import Planned, bucket

TILE_BYTES = 4 << 20          # dequantize at most this many fp32 bytes of weight at a time (cache sized)


def _round_up(a: int, b: int) -> int:
    return -(-a // b) * b


@dataclass(frozen=True)
class WeightFormat:
    """What a PackedLinear stores: format, orientation-free block and memory layout."""

    fmt: str                  # 'int4', 'fp8_e4m3', 'nf4', ...
    symmetric: bool
    n: int                    # out features
    k: int                    # in features
    bn: int                   # block along N (-1: whole dim)
    bk: int                   # block along K (-1: whole dim); >1: groups
    layout: str               # 'q4' | 'int4pack' | 'dense' | 'bitplanes' | 'int8' | 'fp8'

    @property
    def kind(self) -> str:
        return Q.parse_format(self.fmt).kind

    @property
    def bits(self) -> int:
        return Q.parse_format(self.fmt).bits

    @property
    def kp(self) -> int:
        """K padded to whole groups (the input is zero-padded to this width)."""
        return _round_up(self.k, self.bk) if self.bk > 1 else self.k

    @property
    def k16(self) -> int:
        """kp rounded up to 16: the width of the q4 layout (and of the input its kernel reads)."""
        return _round_up(self.kp, 16)

    @property
    def q4_group(self) -> int | None:
        """Columns per scale in the q4 kernel (k16 for per channel), or None if q4 cannot hold the format."""
        if self.fmt != "int4" or self.bk == 1 or (self.bk > 1 and self.bk % 16):
            return None
        return self.bk if self.bk > 1 else self.k16

    @functools.cached_property
    def int4pack_group(self) -> int | None:
        """Group size the int4pack kernel runs with (scales repeated to it), or None if it cannot."""
        base = self.k if self.bk == -1 else self.bk
        if self.fmt != "int4" or self.n % 16 or self.bk == 1:
            return None
        return next((g for g in reversed(P.INT4PACK_GROUPS) if base % g == 0), None)

    def describe(self) -> str:
        g = {(-1, -1): "per-tensor", (1, -1): "per-channel"}.get((self.bn, self.bk), f"block {self.bn}x{self.bk}")
        if self.bn in (1, -1) and self.bk > 1:
            g = f"g{self.bk}"
        return f"{self.fmt} {g}{'' if self.symmetric else ' asym'}"


@dataclass(frozen=True)
class ActFormat:
    """The input quantizer absorbed into the module (its block is for the input's rank)."""

    fmt: str
    block: tuple[int, ...]
    symmetric: bool
    dynamic: bool
    clip_ratio: float = 1.0       # dynamic scales: each block's min/max times this (QuaRot's clipping)
    threshold: float | None = None     # float features found per call (LLM.int8(); last axis), None: none

    @property
    def per_row(self) -> bool:
        """One scale per row of the flattened [M, K] input (per token) or one for all (per tensor)."""
        b = self.block
        return all(x == 1 for x in b[:-1]) and b[-1] == -1 or all(x == -1 for x in b)

    @property
    def integer(self) -> bool:
        return Q.parse_format(self.fmt).kind == "int"

    @property
    def fast(self) -> bool:
        """Dynamic symmetric per-token int without clipping: the common case, computed with a short dedicated path
        (and natively, by native.token_quant, which computes absmax / qmax). A clip ratio takes the general path."""
        b = self.block
        return (self.dynamic and self.symmetric and self.integer and all(x == 1 for x in b[:-1]) and b[-1] == -1
                and self.clip_ratio == 1.0)

    def describe(self) -> str:
        g = "per-token" if self.block[-1] == -1 and self.block[0] == 1 else \
            "per-tensor" if all(x == -1 for x in self.block) else f"block {list(self.block)}"
        clip = f" clip {self.clip_ratio:g}" if self.clip_ratio != 1.0 else ""
        return f"{self.fmt} {g} {'dynamic' if self.dynamic else 'static'}{'' if self.symmetric else ' asym'}{clip}" + \
            (f", float features where max |x| >= {self.threshold:g}" if self.threshold is not None else "")


def choose_layout(fmt: str, n: int, k: int, bn: int, bk: int) -> str:
    f = Q.parse_format(fmt)
    wf = WeightFormat(fmt, True, n, k, bn, bk, "dense")
    if wf.q4_group and native.available():
        return "q4"
    if fmt == "int4" and wf.int4pack_group and P.int4pack_supported():
        return "int4pack"
    if f.kind == "int" and f.bits == 8:
        return "int8"
    if f.kind == "float" and f.bits == 8:
        return "fp8"
    return "dense" if f.bits in P.DENSE_BITS else "bitplanes"


def _normalize_block(block, n: int, k: int) -> tuple[int, int]:
    bn, bk = (int(b) for b in block)
    bn = -1 if bn == -1 or bn >= n else bn
    bk = -1 if bk == -1 or bk >= k else bk
    return bn, bk


def storage_codes(q: Tensor, fmt: str, symmetric: bool) -> Tensor:
    """Codes from ``qpass.primitives.quantize`` -> storage codes (see the module docstring)."""
    f = Q.parse_format(fmt)
    if f.kind != "int":
        return q
    if f.bits == 8:
        return q if symmetric else (q.to(torch.int16) - 128).to(torch.int8)
    return (q.to(torch.int16) + (1 << (f.bits - 1))).to(torch.uint8) if symmetric else q.to(torch.uint8)


class PackedLinear(Planned, nn.Module):
    """y = x Wᵀ + b with W held packed; `plan` maps an M bucket (1, 8, 128) to a kernel name."""

    def __init__(self, wf: WeightFormat, act: ActFormat | None = None, *, has_bias: bool = False,
                 act_qparam_shapes: tuple | None = None, act_zero: bool = False, name: str = ""):
        super().__init__()
        self.wf, self.act, self.name = wf, act, name
        self._plan: dict[int, str] = {}
        self._runners: dict = {}
        self.register_buffer("qweight", torch.empty(self._qweight_shape(wf.layout), dtype=self._qweight_dtype()))
        s_rows = 1 if wf.bn == -1 else -(-wf.n // wf.bn)
        s_cols = 1 if wf.bk == -1 else -(-wf.k // wf.bk)
        self.register_buffer("scale", torch.ones(s_rows, s_cols))
        self.register_buffer("zero", torch.zeros(s_rows, s_cols, dtype=torch.uint8) if self.asym_int else None)
        self.register_buffer("bias", torch.zeros(wf.n) if has_bias else None)
        if act is not None and not act.dynamic:
            self.register_buffer("input_scale", torch.ones(act_qparam_shapes))
            self.register_buffer("input_zero", torch.zeros(act_qparam_shapes, dtype=torch.int32) if act_zero else None)
        else:
            self.input_scale = self.input_zero = None
        self.in_rank = 2          # rank of the input in the graph (the input quantizer's block has it)
        for name in self.DERIVED:
            self.register_buffer(name, None, persistent=False)

    # ------------------------------------------------------------------------------- construction
    @property
    def asym_int(self) -> bool:
        return self.wf.kind == "int" and not self.wf.symmetric

    def _qweight_dtype(self) -> torch.dtype:
        return {"int8": torch.int8, "fp8": Q.FP8_DTYPES.get(self.wf.fmt, torch.uint8)}.get(self.wf.layout, torch.uint8)

    def _qweight_shape(self, layout: str) -> tuple[int, ...]:
        wf = self.wf
        return {"q4": (wf.n, wf.k16 // 2), "int4pack": (wf.n, wf.kp // 2), "dense": (wf.n, -(-wf.kp * wf.bits // 8)),
                "bitplanes": (wf.bits, wf.n, -(-wf.kp // 8)), "int8": (wf.n, wf.kp),
                "fp8": (wf.n, wf.kp)}[layout]

    @classmethod
    def from_weight(cls, w: Tensor, scale: Tensor, zero_point: Tensor | None, block, fmt: str,
                    *, bias: Tensor | None = None, act: ActFormat | None = None, act_scale: Tensor | None = None,
                    act_zero: Tensor | None = None, layout: str | None = None, name: str = "") -> "PackedLinear":
        """Pack a weight [N, K] the way ``fake_quantize(w, scale, zero_point, block, fmt)`` quantizes it."""
        n, k = w.shape
        bn, bk = _normalize_block(block, n, k)
        symmetric = zero_point is None
        layout = layout or choose_layout(fmt, n, k, bn, bk)
        wf = WeightFormat(fmt, symmetric, n, k, bn, bk, layout)
        mod = cls(wf, act, has_bias=bias is not None,
                  act_qparam_shapes=tuple(act_scale.shape) if act_scale is not None else None,
                  act_zero=act_zero is not None, name=name)
        q = Q.quantize(w.detach().float(), scale.float(), zero_point, list(block), fmt)
        u = storage_codes(q, fmt, symmetric)
        mod.scale = scale.detach().float().reshape(mod.scale.shape).clone()
        if mod.zero is not None:
            mod.zero = zero_point.detach().reshape(mod.zero.shape).to(torch.uint8)
        if bias is not None:
            mod.bias = bias.detach().float().clone()
        if act_scale is not None:
            mod.input_scale = act_scale.detach().float().clone()
            mod.input_zero = act_zero.detach().to(torch.int32).clone() if act_zero is not None else None
        mod.qweight = mod._pack(u)
        mod.refresh()
        return mod

    def _pack(self, u: Tensor) -> Tensor:
        """Storage codes [N, K] -> the in-memory layout."""
        wf = self.wf
        if wf.kp > wf.k:   # zero bytes: code 0 (the padded input columns are 0, so any code works)
            u = torch.nn.functional.pad(u.view(torch.uint8), (0, wf.kp - wf.k)).view(u.dtype)
        return self._to_layout(u)

    def _to_layout(self, u: Tensor) -> Tensor:
        """Storage codes [N, kp] -> the in-memory layout."""
        wf = self.wf
        if wf.layout == "q4":
            return P.to_q4(torch.nn.functional.pad(u, (0, wf.k16 - wf.kp)) if wf.k16 > wf.kp else u)
        if wf.layout == "int4pack":
            return P.to_int4pack(u)
        if wf.layout == "dense":
            return P.pack_dense(u, wf.bits)
        if wf.layout == "bitplanes":
            return P.pack_bitplanes(u, wf.bits)
        return u.contiguous()

    def codes(self, n0: int = 0, n1: int | None = None) -> Tensor:
        """Storage codes of rows [n0, n1) as [rows, kp] (n0 a multiple of 64 for int4pack, of 4 for q4)."""
        wf, n1 = self.wf, self.wf.n if n1 is None else n1
        qw = self.qweight
        if wf.layout == "q4":
            u = P.from_q4(qw.reshape(-1)[n0 * wf.k16 // 2: n1 * wf.k16 // 2], n1 - n0, wf.k16)
            return u[:, :wf.kp] if wf.k16 > wf.kp else u
        if wf.layout == "int4pack":
            return P.from_int4pack(qw.reshape(-1)[n0 * wf.kp // 2: n1 * wf.kp // 2], n1 - n0, wf.kp)
        if wf.layout == "dense":
            return P.unpack_dense(qw[n0:n1], wf.bits, wf.kp)
        if wf.layout == "bitplanes":
            return P.unpack_bitplanes(qw[:, n0:n1], wf.bits, wf.kp)
        return qw[n0:n1]

    # ---------------------------------------------------------------------------------- dequantize
    def _rows(self, t: Tensor | None, n0: int, n1: int) -> Tensor | None:
        if t is None or self.wf.bn == -1:
            return t
        if self.wf.bn == 1:
            return t[n0:n1]
        return t.index_select(0, torch.arange(n0, n1, device=t.device) // self.wf.bn)

    def dequantize(self, n0: int = 0, n1: int | None = None) -> Tensor:
        """float32 weight rows [n0, n1) as [rows, kp], equal to the fake-quantized weight (zero-padded).

        Zero points are subtracted in integer arithmetic and the scale applied by one promoting multiply,
        so the result is (q - z) * s rounded once, as in ``fake_quantize``, with a single float pass."""
        n1 = self.wf.n if n1 is None else n1
        return self._values(self.codes(n0, n1), self._rows(self.scale, n0, n1), self._rows(self.zero, n0, n1))

    def _values(self, u: Tensor, s: Tensor, z: Tensor | None) -> Tensor:
        """float32 values [rows, kp] of storage codes `u` [rows, kp] with their rows' scales and zero points."""
        wf = self.wf
        f = Q.parse_format(wf.fmt)
        if f.kind == "int":
            if wf.bits < 8 and wf.symmetric:
                q = u.view(torch.int8) - (1 << (wf.bits - 1))
            elif wf.bits == 8 and wf.symmetric:
                q = u
            else:
                q = u.to(torch.int16) + (128 if wf.bits == 8 else 0)
        elif f.kind == "float" and f.bits == 8:
            q = u.float()
        else:
            q = self._table()[u.long()]
        if wf.bk > 1:
            q = q.view(q.shape[0], -1, wf.bk)
            s = s.unsqueeze(-1)
            z = z.unsqueeze(-1) if z is not None else None
        if z is not None:
            q = q - z.to(torch.int16)
        return torch.mul(q, s).view(u.shape[0], wf.kp)

    def row_codes(self, rows: Tensor) -> Tensor:
        """Storage codes of the rows `rows` (1-D int64, any order, repeats allowed) as [len(rows), kp], reading
        only those rows' bytes (int4pack: their blocks of rows)."""
        wf, qw = self.wf, self.qweight
        if wf.layout == "q4":                    # row r: block r // 4 of R rows; chunk c at ((c * R + r % 4) * 8)
            blk = rows // P.Q4_BLOCK
            r_in = (wf.n - blk * P.Q4_BLOCK).clamp(max=P.Q4_BLOCK)
            c = torch.arange(wf.k16 // 16, device=rows.device)
            start = blk * P.Q4_BLOCK * (wf.k16 // 2) + (rows % P.Q4_BLOCK) * 8
            idx = (start[:, None] + c[None, :] * (r_in[:, None] * 8))[..., None] + torch.arange(8, device=rows.device)
            b = qw.reshape(-1)[idx.reshape(-1)].view(-1, wf.k16 // 16, 8)
            u = torch.stack([b & 15, b >> 4], 2).reshape(-1, wf.k16)
            return u[:, :wf.kp] if wf.k16 > wf.kp else u
        if wf.layout == "int4pack":              # blocks of rows of the CPU layout, each unpacked once
            block = P.int4pack_rows()
            blocks, where = torch.unique(rows // block, return_inverse=True)
            parts = [self.codes(int(b) * block, min(wf.n, (int(b) + 1) * block)) for b in blocks.tolist()]
            starts = torch.tensor([0] + [len(p) for p in parts[:-1]], device=rows.device).cumsum(0)
            return torch.cat(parts)[starts[where] + rows % block]
        if wf.layout == "dense":
            return P.unpack_dense(qw[rows], wf.bits, wf.kp)
        if wf.layout == "bitplanes":
            return P.unpack_bitplanes(qw[:, rows], wf.bits, wf.kp)
        return qw[rows]

    def gather(self, ids: Tensor) -> Tensor:
        """The dequantized weight rows `ids` (any shape), as float32 [*ids.shape, k]: ``embedding(fake-quantized
        W, ids)`` for a table tied to this linear, reading and dequantizing only the rows asked for."""
        wf, rows = self.wf, ids.reshape(-1).long()
        at = lambda t: t if t is None or wf.bn == -1 else t[rows // wf.bn] if wf.bn > 1 else t[rows]  # noqa: E731
        v = self._values(self.row_codes(rows), at(self.scale), at(self.zero))
        return (v[:, :wf.k] if wf.kp > wf.k else v).reshape(*ids.shape, wf.k)

    def _table(self) -> Tensor:
        vals = Q.FP4_E2M1_VALUES + tuple(-x for x in Q.FP4_E2M1_VALUES) if self.wf.fmt == "fp4_e2m1" else Q.NF4_VALUES
        return torch.tensor(vals, dtype=torch.float32, device=self.qweight.device)

    def tile_rows(self) -> int:
        rows = max(64, (TILE_BYTES // (4 * self.wf.kp)) // 64 * 64)
        return min(rows, self.wf.n)

    # -------------------------------------------------------------------------------------- input
    def input_fake_quant(self, x: Tensor) -> Tensor:
        a = self.act
        if a is None:
            return x
        if a.dynamic:          # per-token symmetric int takes the primitive's fast path
            return Q.fake_quantize_dynamic(x, list(a.block), a.fmt, a.symmetric, a.clip_ratio)
        return Q.fake_quantize(x, self.input_scale, self.input_zero, list(a.block), a.fmt)

    def input_codes(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Integer codes of the input as [M, K] (int8, or uint8 when asymmetric), scale [M or 1, 1] and
        zero point [M or 1, 1] (None when symmetric): exactly the codes the input fake-quant rounds to."""
        a, x = self.act, x.float()
        if a.fast:
            s = Q.token_scale(x, a.fmt)
            q = (x / s).round_().clamp_(*Q.qrange(a.fmt, True)).to(torch.int8)
            return q.reshape(-1, self.wf.k), s.reshape(-1, 1), None
        if a.dynamic:
            scale, zp = Q.dynamic_qparams(x, list(a.block), a.fmt, a.symmetric, a.clip_ratio)
        else:
            scale, zp = self.input_scale, self.input_zero
        q = Q.quantize(x, scale, zp, list(a.block), a.fmt)
        rows = 1 if all(b == -1 for b in a.block) else -1
        return (q.reshape(-1, self.wf.k), scale.reshape(rows, 1),
                zp.reshape(rows, 1).float() if zp is not None else None)

    # ----------------------------------------------------------------------------------- forward

    def forward(self, x: Tensor) -> Tensor:
        t = self.act.threshold if self.act is not None else None
        idx = None
        if t is not None:              # LLM.int8(): the outlier features of this call stay float
            mask = x.reshape(-1, self.wf.k).abs().amax(0) >= t
            idx = torch.nonzero(mask).flatten() if bool(mask.any()) else None
            if idx is not None:
                x_out, x = x[..., idx], x.index_fill(-1, idx, 0.0)
        y = self._runners[bucket(x.numel() // self.wf.k)](x)
        if y.dim() != x.dim():
            y = y.reshape(*x.shape[:-1], self.wf.n)
        if idx is not None:
            y = y + (x_out.float() @ self.column_values(idx).t())
        return y if y.dtype == x.dtype else y.to(x.dtype)               # kernels compute in fp32

    def column_values(self, idx: Tensor) -> Tensor:
        """float32 dequantized weight columns `idx` (input features) as [N, len(idx)]."""
        if self.wf.layout == "int8" and self.wf.bk == -1 and self.zero is None:
            return self.qweight[:, idx].float() * self.row_scale.unsqueeze(1)
        return self.dequantize()[:, idx]

    # ------------------------------------------------------------------------ derived + state dict
    DERIVED = ("sz", "scale_bf16", "ones_bf16", "row_scale", "zero_c", "colsum", "q4_scale", "q4_zero")

    def refresh(self) -> None:
        """Rebuild the kernel-side buffers (bf16 scale/zero pairs, per-row scales, column sums) from the
        stored ones. They are non-persistent: never saved, rebuilt after loading."""
        wf, d = self.wf, dict.fromkeys(self.DERIVED)
        if wf.layout == "int4pack":
            g4 = wf.int4pack_group
            s = self._rows(self.scale, 0, wf.n).expand(wf.n, -1)
            z = self._rows(self.zero, 0, wf.n)
            zero = (8.0 - (z.float() if z is not None else 8.0)) * s
            rep = (wf.kp if wf.bk == -1 else wf.bk) // g4
            sz = torch.stack([s, zero.expand_as(s)], -1).repeat_interleave(rep, dim=1)
            d["sz"] = sz.transpose(0, 1).contiguous().to(torch.bfloat16)           # [groups, N, 2]
        if wf.layout == "q4":                     # the kernel reads one scale (and zero) per row and group
            groups = self.scale.shape[1]
            for t, name in ((self.scale, "q4_scale"), (self.zero, "q4_zero")):
                if t is not None and (wf.bn != 1 or not t.is_contiguous()):
                    d[name] = self._rows(t, 0, wf.n).expand(wf.n, groups).contiguous()
        if wf.layout == "int8" and wf.bk == -1:
            s = self._rows(self.scale, 0, wf.n).reshape(-1).expand(wf.n).contiguous()
            d["scale_bf16"] = s.to(torch.bfloat16)
            d["ones_bf16"] = torch.ones(wf.n, dtype=torch.bfloat16, device=s.device)
            d["row_scale"] = s
            if self.zero is not None:                                                 # c-space zero point
                d["zero_c"] = self._rows(self.zero, 0, wf.n).reshape(-1).expand(wf.n).to(torch.int32) - 128
            d["colsum"] = self.qweight.to(torch.int32).sum(1)                          # per output row
        for name, t in d.items():
            self.register_buffer(name, t, persistent=False)
        self._bind()

    MACHINE_LAYOUTS = ("q4", "int4pack")     # held in memory only: saved as the portable dense layout

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.wf.layout in self.MACHINE_LAYOUTS:
            destination[prefix + "qweight"] = P.pack_dense(self.codes(), 4)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "qweight"
        if self.wf.layout in self.MACHINE_LAYOUTS and key in state_dict:
            state_dict[key] = self._to_layout(P.unpack_dense(state_dict[key], 4, self.wf.kp))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self.refresh()

    def weight_bytes(self) -> int:
        """Bytes this module holds for its weight (codes, scales, zeros, kernel-side copies)."""
        ts = [self.qweight, self.scale, self.zero, *(getattr(self, n) for n in self.DERIVED)]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def extra_repr(self) -> str:
        act = f", act={self.act.describe()}" if self.act else ""
        plan = ", ".join(f"M{b}:{k}" for b, k in sorted(self.plan.items()))
        return f"{self.wf.k} -> {self.wf.n}, {self.wf.describe()} [{self.wf.layout}]{act}, plan={{{plan}}}"
