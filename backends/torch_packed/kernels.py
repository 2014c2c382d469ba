"""Kernels a PackedLinear can run, and the measurement that picks one per (shape, M bucket).

One table, ``KERNELS``: name -> Kernel(exact, applies(mod), bind(mod)). ``bind(mod)`` returns ``run(x)``
with the module's tensors captured; ``x`` is the module input as the graph gives it (any leading dims, not
yet quantized) and ``run`` returns [M, N] (or [..., N]) float32. A module's plan maps an M bucket to a kernel name.

    dequant          every format: fake-quantize the input (if the recipe does), dequantize the weight in
                     cache-sized row tiles, fp32 matmul. Same math as the fake-quant graph (exact). The
                     fallback: always a candidate, so a kernel slower than it is never chosen.
    q4avx2           int4 weights in the q4 layout (groups of 16k columns or per channel, any N, symmetric
                     or not, any scale sign): our own C kernel (native.py, csrc/q4avx2.c; AVX2 + FMA, OpenMP
                     with torch's thread count). fp32 activations and accumulation: exact up to summation
                     order. Only where the library builds on this machine.
    q4deq            int4 weights in the q4 layout, the prefill path: our own C dequantizer (native.py
                     ``q4_dequant``, AVX2) writes tiles of Q4DEQ_TILE_BYTES of fp32 weight rows, the values
                     fake-quant computes bit for bit, into one reused buffer, and torch's fp32 matmul
                     (MKL) multiplies each tile. The dequantization costs ~8% of an M = 128 matmul, so
                     prefill runs at about fp32 speed (the ``dequant`` fallback's torch ops cost as much
                     as the matmul). Exact up to fp32 summation order. Only where the library builds.
    q4i8             W4A8 (int4 weights in the q4 layout, the common dynamic symmetric per-token int input
                     quantizer): the input's own int8 codes (one native.token_quant call) times the int4 codes
                     with integer dot products (q4a8's kernel, one scale per token instead of per block):
                     exact up to fp32 summation order.
    q4a8             weight-only int4 (no input quantizer: W4A8's inputs are already int8 codes, and rounding
                     them again would only add error) in the q4 layout on the same C library's
                     ``q4_linear_a8``: the input is rounded to int8 per token in blocks of 128 columns (64,
                     32 or 16 where the weight groups are that narrow: ``native.q4().a8_block``), x^ = s *
                     rint(x / s), s = max|block| / 127, and the codes are multiplied as integers (vpmaddubsw,
                     vpdpbusd; 512-bit registers where AVX512-VNNI is there), the int32 sums running over a whole
                     block: fewer vector ops per weight byte, so decode runs
                     nearer the memory bandwidth. Exact on x^ up to summation order; x^ itself is the
                     approximation (relative error <= 1/254 of each block's largest input), the same trade as
                     llama.cpp's Q8 activations and onnxruntime's MatMulNBits accuracy level 4.
    int4pack         int4 weights (groups 32..256 or per channel, N % 16 == 0) in the CPU int4pack layout:
                     ``aten._weight_int4pack_mm_for_cpu`` with bf16 activations, bf16 scales and zeros and a
                     bf16 result (the vectorized CPU paths exist for bf16 only).
    int8pack         int8 per-channel weights: ``aten._weight_int8pack_mm`` with bf16 activations/scales
                     (K % 16 == 0 only: the op crashes on AVX512-BF16 CPUs otherwise).
    w8avx2           int8 per-channel weights (W8A16; also under a W8A8 recipe's input fake-quant, as q4avx2):
                     our own C kernel (native.py ``w8_linear``: sign-extend, convert, fp32 FMA, 4 weight rows
                     at a time, prefetched) on the module's int8 [N, K] codes, the scale once per dot product,
                     the zero point through the input's row sum: exact up to fp32 rounding order. The decode
                     GEMV of W8A16 (int8pack rounds to bf16). Only where the library builds on this machine.
    q8a8             weight-only int8 (no input quantizer) on the same C library's ``w8_linear_a8``: the input
                     rounded to int8 per token in blocks of 128 columns as q4a8 does, the codes multiplied as
                     integers (vpdpbusd with the weight codes as the unsigned operand, sign bit flipped, and the
                     input codes' block sums correcting the offset: exact int32), one float step per block. The
                     W8A16 decode GEMV near the memory bandwidth: w8avx2 spends ~12 vector ops per 64 weight
                     bytes on conversions and FMAs, this ~3.5. Approximate as q4a8 (x^ for x). Only on CPUs with
                     AVX512-VNNI (+BW).
    int_mm           W8A8: int8 input codes (per token or per tensor, exactly the codes the input
                     fake-quant rounds to) x int8 weight codes with int32 accumulation (``torch._int_mm``),
                     then the scales: exact up to float rounding of the fp32 reference.
    i8avx2           W8A8 with symmetric int8 codes on both sides (per-token or per-tensor input, per-channel
                     or per-tensor weights): our own C kernel (native.py, csrc/q4avx2.c ``i8_linear``: int16
                     vpmaddwd on AVX2, OpenMP with torch's thread count) on the module's int8 [N, K] weights,
                     the same input codes as int_mm: int32 sums exact, then the same fp32 scaling steps.
                     Only where the library builds on this machine.
    int8pack_codes   W8A8 on the int8pack kernel: integer input codes fed as bf16 (exact up to 256), one
                     bf16 rounding of each output dot product.
    lutavx2          learned codebooks (CodebookLinear, codebook.py: SqueezeLLM's per-row tables, BCQ's
                     per-group ones, 1..4-bit codes, with or without sparse values): our own C kernel
                     (native.py ``lut_linear``, csrc/q4avx2.c) decoding the stored codes by a table lookup in
                     registers, fp32 FMA, sparse values added in the same pass; exact up to summation order.
                     Its fallback ``dequant`` is CodebookLinear's reference route (decode tiles + F.linear).
                     Only where the library builds on this machine.

Input quantizers: where the native library is there, the common one (dynamic symmetric per-token int of <= 8
bits, ``ActFormat.fast``) runs as one ``native.token_quant`` call instead of ~5 torch ops: its codes in i8avx2,
its fake-quant values in q4avx2, int4pack and int8pack (fp32 inputs only, others keep the torch path). The
same codes, scales and values as the torch ops, bit for bit. The dequant fallback keeps the torch ops: it is
the reference the other kernels are tested against.

Approximate kernels (``exact=False``) round to bf16: relative error of a few 2^-9 per output, see
docs/benchmarks.md and tests/test_torch_packed.py for the measured bound.
"""
from __future__ import annotations

import logging
import math
import statistics
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from qpass.primitives import quant as Q

from . import native

log = logging.getLogger("qpass.backends.torch_packed")
aten = torch.ops.aten

BUCKETS = (1, 8, 128)          # representative M of: decode (1), small batches (2..16), prefill (> 16)
FALLBACK = "dequant"
Q4DEQ_TILE_BYTES = 8 << 20     # fp32 bytes per q4deq tile: a scratch sweep at M = 32 and 128 (4096-, 11008-wide
                               # layers, 1 thread, 2 MB L2) had 8 MB fastest, 2 MB 1.3x and 16 MB up to 1.3x slower


class NativeCall(NamedTuple):
    """What a native runner calls, for the decode tape (segments.py): the kernel family, the layer's input and
    output widths and the rest of its arguments (data pointers of the tensors in ``run.tensors``, sizes, the
    input quantizer's bits where the kernel rounds the input first). Runners without one are not taped."""
    kind: str                   # q4 (q4avx2 / q4a8), q4i8, w8 (w8avx2 / q8a8), i8 (i8avx2)
    k: int
    n: int
    args: dict


def bucket(m: int) -> int:
    return 1 if m <= 1 else 8 if m <= 16 else 128


# ----------------------------------------------------------------------------------------- kernels
# Each kernel is a binder: bind(mod) -> run(x) -> [M, N] float32, with the tensors it reads captured once
# (PackedLinear rebinds after a plan change, a reload or a device move), so a call does no module lookups.

_INT4PACK_MM = aten._weight_int4pack_mm_for_cpu.default
_INT8PACK_MM = aten._weight_int8pack_mm.default


def _native_act_bits(mod) -> int | None:
    """Bits of the module's input quantizer where native.token_quant computes it in one call (dynamic
    symmetric per-token int of <= 8 bits, ``ActFormat.fast``, and the library is there); else None."""
    a = mod.act
    if a is None or not a.fast or not native.available():
        return None
    bits = Q.parse_format(a.fmt).bits
    return bits if 2 <= bits <= 8 else None


def _fake_quant(mod):
    """The module's input fake-quant as a function, or None without one: ``native.token_quant`` for fp32
    inputs where it applies (bit for bit ``mod.input_fake_quant``), else ``mod.input_fake_quant``."""
    if mod.act is None:
        return None
    fq, bits = mod.input_fake_quant, _native_act_bits(mod)
    if bits is None:
        return fq
    tq, f32 = native.token_quant, torch.float32

    def run(x: Tensor) -> Tensor:
        return tq(x, bits, codes=False)[0] if x.dtype is f32 else fq(x)
    return run


def _input(mod, *, torch_only: bool = False):
    """x -> [M, kp] float input: fake-quantized if the recipe quantizes it, zero-padded to whole groups.
    torch_only: the input quantizer as the primitive computes it, never natively (the dequant reference)."""
    fq = (mod.input_fake_quant if mod.act is not None else None) if torch_only else _fake_quant(mod)
    k, pad = mod.wf.k, mod.wf.kp - mod.wf.k

    def prep(x: Tensor) -> Tensor:
        x = (fq(x) if fq is not None else x).reshape(-1, k).float()     # no-op for fp32 graphs
        return F.pad(x, (0, pad)) if pad else x
    return prep


def _bind_dequant(mod):
    if mod.wf.layout == "codebook":                 # CodebookLinear: its own reference route
        return mod.reference
    prep, n, rows, bias, deq = _input(mod, torch_only=True), mod.wf.n, mod.tile_rows(), mod.bias, mod.dequantize

    def run(x: Tensor) -> Tensor:
        x = prep(x)
        if rows >= n:
            return F.linear(x, deq(), bias)
        out = x.new_empty(x.shape[0], n)
        for n0 in range(0, n, rows):
            n1 = min(n, n0 + rows)
            out[:, n0:n1] = F.linear(x, deq(n0, n1))
        return out if bias is None else out.add_(bias)
    return run


def _q4_tensors(mod) -> tuple[tuple, tuple]:
    """The q4 kernels' tensors (codes, one scale and zero point per row and group, bias), to keep alive, and
    their data pointers (None for an absent one)."""
    scale = mod.q4_scale if mod.q4_scale is not None else mod.scale
    zero = mod.q4_zero if mod.q4_zero is not None else mod.zero
    tensors = (mod.qweight, scale, zero, mod.bias)
    return tensors, tuple(t.data_ptr() if t is not None else None for t in tensors)


def _f32_rows(x: Tensor, fq, k: int, k_pad: int) -> Tensor:
    """A native kernel's input: fake-quantized where the recipe quantizes it, fp32, contiguous, zero-padded from k
    to k_pad columns."""
    if fq is not None:
        x = fq(x)
    if x.dtype != torch.float32:
        x = x.float()
    if k_pad != k:
        return F.pad(x, (0, k_pad - k))
    return x if x.is_contiguous() else x.contiguous()


def _bind_q4avx2(mod, *, a8: bool = False):
    """The q4 kernel through ctypes: x as fp32 [..., k16] (zero-padded), bias added in the kernel. Returns
    [..., N] (x's leading dims: the module then has nothing left to reshape; calls here cost microseconds).
    a8: ``q4_linear_a8`` (the input rounded to int8 in blocks of up to 128 columns inside the kernel) instead."""
    wf, fq = mod.wf, _fake_quant(mod)
    lib = native.q4()
    k, k16, n, group, call = wf.k, wf.k16, wf.n, wf.q4_group, lib.linear_a8 if a8 else lib.linear
    tensors, (qw, s, z, b) = _q4_tensors(mod)
    threads = torch.get_num_threads

    def run(x: Tensor) -> Tensor:
        x = _f32_rows(x, fq, k, k16)
        out = torch.empty(*x.shape[:-1], n)
        m = x.numel() // k16
        if call(x.data_ptr(), m, k16, qw, n, s, z, group, b, out.data_ptr(), threads()):
            raise RuntimeError(f"{'q4a8' if a8 else 'q4avx2'} failed for a {m}x{k} input and {n}x{k} weights (bad "
                               "shape or out of memory)")
        return out
    run.tensors = tensors
    bits = _native_act_bits(mod)
    if mod.act is None or bits is not None:
        run.native = NativeCall("q4", k, n, dict(k16=k16, group=group, w=qw, s=s, z=z, bias=b, a8=int(a8),
                                                 bits=bits or 0))
    return run


def q4deq_rows(n: int, kp: int) -> int:
    """Rows per q4deq tile: Q4DEQ_TILE_BYTES of fp32 values (whole layout blocks of 4 rows), at most n."""
    return min(n, max(4, Q4DEQ_TILE_BYTES // (4 * kp) // 4 * 4))


_TILES = threading.local()       # one q4deq tile buffer per thread, shared by every module (calls in a thread are
                                 # sequential), grown to the largest tile asked for (Q4DEQ_TILE_BYTES, or 4 rows if more)


def _tile_buffer(numel: int) -> Tensor:
    buf = getattr(_TILES, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = _TILES.buf = torch.empty(numel)
    return buf


def _bind_q4deq(mod):
    """q4 weights dequantized by ``native.q4().dequant`` into a tile of q4deq_rows rows (one buffer per thread
    shared by all modules, so a call allocates only its outputs and a model holds one tile), each tile multiplied by torch's fp32 matmul as tile @ x^T into its rows
    of an [N, M] result (``torch.mm(..., out=)`` on a row slice), transposed into [M, N] with the bias added in one
    pass at the end. (That orientation measured 1.1-1.5x faster than x @ tile^T into column slices of [M, N] at
    M = 32..128 on the 4096-wide layers: docs/benchmarks.md.) The input as the other kernels take it (native
    token_quant where it applies: the torch fake-quant bit for bit), zero-padded to kp. Returns [..., N]."""
    wf, prep, call = mod.wf, _input(mod), native.q4().dequant
    n, kp, k16, group = wf.n, wf.kp, wf.k16, wf.q4_group
    rows = q4deq_rows(n, kp)
    tensors, (qw, s, z, _) = _q4_tensors(mod)
    bias, threads = mod.bias, torch.get_num_threads

    def run(x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x = prep(x)
        buf = _tile_buffer(rows * kp)[: rows * kp].view(rows, kp)
        m = x.shape[0]
        out_t = torch.empty(n, m)
        xt = x.t()
        for n0 in range(0, n, rows):
            n1 = min(n, n0 + rows)
            t = buf[: n1 - n0]
            if call(qw, n, k16, s, z, group, n0, n1, kp, t.data_ptr(), kp, threads()):
                raise RuntimeError(f"q4deq failed for rows {n0}..{n1} of {n}x{kp} weights (bad arguments)")
            torch.mm(t, xt, out=out_t[n0:n1])
        out = torch.empty(*lead, n)
        if bias is None:
            out.view(m, n).copy_(out_t.t())
        else:
            torch.add(out_t.t(), bias, out=out.view(m, n))
        return out
    run.tensors = tensors
    return run


def _bind_lutavx2(mod):
    """native.lut_linear on the module's stored codes and its derived fp32 tables (CodebookLinear.lut_tensors).
    Returns x's leading dims and dtype."""
    fq, kw, lut = _fake_quant(mod), mod.lut_tensors(), native.lut_linear

    def run(x: Tensor) -> Tensor:
        dtype = x.dtype
        if fq is not None:
            x = fq(x)
        y = lut(x if x.dtype is torch.float32 else x.float(), **kw)
        return y if dtype is torch.float32 else y.to(dtype)
    run.tensors = kw                 # kept alive with the module
    return run


def _lutavx2_applies(mod) -> bool:
    return mod.wf.layout == "codebook" and mod.native_applies() and native.available()


def _bind_q4i8(mod):
    """W4A8 through ``q4_linear_i8``: the input's int8 codes and per-token scales from one native.token_quant call
    (the fake-quant graph's own codes, bit for bit), then integer dot products with the int4 codes. Returns
    [..., N] (x's leading dims)."""
    wf, call, tq, bits = mod.wf, native.q4().linear_i8, native.token_quant, _native_act_bits(mod)
    k, k16, n, group = wf.k, wf.k16, wf.n, wf.q4_group
    tensors, (qw, s, z, b) = _q4_tensors(mod)
    threads = torch.get_num_threads

    def run(x: Tensor) -> Tensor:
        a, sa = tq(x, bits, codes=True)                          # int8 [M, K], fp32 [M], both contiguous
        m = a.shape[0]
        out = torch.empty(*x.shape[:-1], n)
        if call(a.data_ptr(), sa.data_ptr(), m, k, k16, qw, n, s, z, group, b, out.data_ptr(), threads()):
            raise RuntimeError(f"q4i8 failed for a {m}x{k} input and {n}x{k} weights (bad shape or out of memory)")
        return out
    run.tensors = tensors
    run.native = NativeCall("q4i8", k, n, dict(k16=k16, group=group, w=qw, s=s, z=z, bias=b, bits=bits))
    return run


def _q4i8_applies(mod) -> bool:
    """int4 in the q4 layout with the common dynamic symmetric per-token int input quantizer (<= 8 bits), fp32."""
    return (mod.wf.layout == "q4" and _cpu(mod) and native.available() and mod.act is not None
            and mod.act.symmetric and _native_act_bits(mod) is not None
            and (mod.bias is None or mod.bias.dtype == torch.float32))


def _bind_int4pack(mod):
    prep, qw, sz, g, bias = _input(mod), mod.qweight, mod.sz, mod.wf.int4pack_group, mod.bias

    def run(x: Tensor) -> Tensor:
        y = _INT4PACK_MM(prep(x).to(torch.bfloat16), qw, g, sz).float()
        return y if bias is None else y.add_(bias)
    return run


def _bind_int8pack(mod):
    prep, qw, s16, bias = _input(mod), mod.qweight, mod.scale_bf16, mod.bias
    zs = mod.zero_c.float() * mod.row_scale if mod.zero_c is not None else None   # asymmetric: (zp - 128) s

    def run(x: Tensor) -> Tensor:
        xf = prep(x)
        y = _INT8PACK_MM(xf.to(torch.bfloat16), qw, s16).float()
        if zs is not None:
            y -= xf.sum(-1, keepdim=True) * zs
        return y if bias is None else y.add_(bias)
    return run


def _codes(mod):
    """x -> (int8 codes [M, K], scale [M or 1, 1], zero point or None), uint8 codes shifted to int8."""
    codes = mod.input_codes

    def run(x: Tensor):
        a, sa, za = codes(x)
        if za is not None:
            a, za = (a.to(torch.int16) - 128).to(torch.int8), za - 128
        return a, sa, za
    return run


def _bind_int_mm(mod):
    codes, qt, zc, colsum, rs, k, bias = (_codes(mod), mod.qweight.t(), mod.zero_c, mod.colsum, mod.row_scale,
                                          mod.wf.k, mod.bias)

    def run(x: Tensor) -> Tensor:
        a, sa, za = codes(x)
        acc = torch._int_mm(a, qt)
        if zc is not None:
            acc -= a.sum(-1, keepdim=True, dtype=torch.int32) * zc
        if za is not None:
            zi = za.to(torch.int32)
            acc -= zi * colsum
            if zc is not None:
                acc += k * zi * zc
        y = acc.float().mul_(sa).mul_(rs)
        return y if bias is None else y.add_(bias)
    return run


def _bind_i8avx2(mod):
    """i8_linear through ctypes on the input codes int_mm uses (``_codes``; symmetric: no zero points). For
    the common dynamic per-token quantizer the codes and scales come from one native.token_quant call (the
    same codes and scales, bit for bit, on finite tokens; a token holding inf/NaN gets a NaN scale, so its
    outputs are all NaN as in the fake-quant graph). Returns [..., N] (x's leading dims)."""
    codes, k, n, call = _codes(mod), mod.wf.k, mod.wf.n, native.q4().i8_linear_ws
    wsum = mod.colsum.to(torch.int32).contiguous()               # the rows' code sums (|sum| < 2^31: K < 2^24)
    tensors = (mod.qweight, mod.row_scale, mod.bias, wsum)       # kept alive with the pointers below
    qw, rs, b, cs = (t.data_ptr() if t is not None else None for t in tensors)
    threads, bits, tq = torch.get_num_threads, _native_act_bits(mod), native.token_quant

    def run(x: Tensor) -> Tensor:
        if bits is not None:
            a, sa = tq(x, bits, codes=True)                      # int8 [M, K], fp32 [M], both contiguous
            m = a.shape[0]
        else:
            a, sa, _ = codes(x)
            a = (a if a.dtype == torch.int8 else a.to(torch.int8)).contiguous()
            m = a.shape[0]
            sa = sa.float().reshape(-1).expand(m).contiguous()
        out = torch.empty(*x.shape[:-1], n)        # x's leading dims: nothing left for the module to reshape
        if call(a.data_ptr(), m, k, qw, n, sa.data_ptr(), rs, b, out.data_ptr(), threads(), cs):
            raise RuntimeError(f"i8avx2 failed for a {m}x{k} input and {n}x{k} weights (out of memory)")
        return out
    run.tensors = tensors
    if bits is not None:
        run.native = NativeCall("i8", k, n, dict(w=qw, ws=rs, bias=b, wsum=cs, bits=bits))
    return run


def _i8avx2_applies(mod) -> bool:
    return (_w8a8(mod) and mod.act.symmetric and mod.wf.symmetric and mod.wf.k == mod.wf.kp and _cpu(mod)
            and mod.qweight.dtype == torch.int8 and mod.qweight.is_contiguous()
            and mod.row_scale.dtype == torch.float32 and (mod.bias is None or mod.bias.dtype == torch.float32)
            and mod.colsum is not None and native.available())


def _bind_w8avx2(mod, *, a8: bool = False):
    """w8_linear through ctypes on the module's int8 [N, K] codes, per-row scales and c-space zero points (the
    input fake-quantized first where the recipe quantizes it, as q4avx2 does). Returns [..., N] (x's leading dims).
    a8: ``w8_linear_a8`` (the input rounded to int8 in blocks of 128 columns inside the kernel) instead."""
    lib = native.q4()
    fq, k, n, call = _fake_quant(mod), mod.wf.k, mod.wf.n, lib.w8_linear_a8 if a8 else lib.w8_linear
    zc = mod.zero_c.contiguous() if mod.zero_c is not None else None
    tensors = (mod.qweight, mod.row_scale, zc, mod.bias)             # kept alive with the pointers below
    qw, rs, z, b = (t.data_ptr() if t is not None else None for t in tensors)
    threads = torch.get_num_threads

    def run(x: Tensor) -> Tensor:
        x = _f32_rows(x, fq, k, k)
        out = torch.empty(*x.shape[:-1], n)
        m = x.numel() // k
        if call(x.data_ptr(), m, k, qw, n, rs, z, b, out.data_ptr(), threads()):
            raise RuntimeError(f"{'q8a8' if a8 else 'w8avx2'} failed for a {m}x{k} input and {n}x{k} weights (out of "
                               "memory)")
        return out
    run.tensors = tensors
    bits = _native_act_bits(mod)
    if mod.act is None or bits is not None:
        run.native = NativeCall("w8", k, n, dict(w=qw, ws=rs, zc=z, bias=b, a8=int(a8), bits=bits or 0))
    return run


def _w8avx2_applies(mod) -> bool:
    return (_int8_rows(mod) and mod.wf.k == mod.wf.kp and _cpu(mod) and mod.qweight.dtype == torch.int8
            and mod.qweight.is_contiguous() and mod.row_scale.dtype == torch.float32
            and (mod.bias is None or mod.bias.dtype == torch.float32) and native.available())


def _q8a8_applies(mod) -> bool:
    """Weight-only int8 (no input quantizer, as q4a8) where the library has its AVX512-VNNI kernel."""
    return mod.act is None and _w8avx2_applies(mod) and native.q4().vnni512


def _bind_int8pack_codes(mod):
    codes, qw, ones, rs, bias = _codes(mod), mod.qweight, mod.ones_bf16, mod.row_scale, mod.bias

    def run(x: Tensor) -> Tensor:
        a, sa, za = codes(x)
        af = a.float() if za is None else a.float() - za          # integers in [-255, 255]: exact in bf16
        y = _INT8PACK_MM(af.to(torch.bfloat16), qw, ones).float().mul_(sa).mul_(rs)
        return y if bias is None else y.add_(bias)
    return run


def _cpu(mod) -> bool:
    return mod.qweight.device.type == "cpu"


def _int8_rows(mod) -> bool:
    return mod.wf.layout == "int8" and mod.wf.bk == -1


def _w8a8(mod) -> bool:
    return _int8_rows(mod) and mod.act is not None and mod.act.integer and mod.act.per_row


def _int8pack_k(mod) -> bool:
    """``_weight_int8pack_mm`` (torch 2.13) segfaults on AVX512-BF16 CPUs when K % 16 != 0 and M > 1 (its
    vectorized path reads whole 16-wide K chunks): only offer it for K a multiple of 16, on every CPU."""
    return mod.qweight.shape[-1] % 16 == 0


@dataclass(frozen=True)
class Kernel:
    name: str
    exact: bool
    applies: Callable
    bind: Callable
    note: str = ""

    def run(self, mod, x: Tensor) -> Tensor:
        """One call without binding (tools and tests); PackedLinear.forward uses bound runners."""
        return self.bind(mod)(x)


KERNELS: dict[str, Kernel] = {k.name: k for k in (
    Kernel("dequant", True, lambda m: True, _bind_dequant, "tiled dequantize + fp32 matmul"),
    Kernel("q4avx2", True, lambda m: m.wf.layout == "q4" and _cpu(m) and native.available(), _bind_q4avx2,
           "own AVX2 int4 kernel (csrc/q4avx2.c), fp32"),
    Kernel("q4deq", True, lambda m: m.wf.layout == "q4" and _cpu(m) and native.available(), _bind_q4deq,
           "own AVX2 dequantizer (csrc/q4avx2.c q4_dequant) into L2-sized tiles + torch's fp32 matmul"),
    Kernel("q4i8", True, _q4i8_applies, _bind_q4i8, "own int4 x int8-code kernel for W4A8 (csrc/q4avx2.c), exact"),
    Kernel("q4a8", False, lambda m: m.wf.layout == "q4" and m.act is None and _cpu(m) and native.available(),
           lambda m: _bind_q4avx2(m, a8=True), "own AVX2 int4 kernel with int8 input blocks (csrc/q4avx2.c)"),
    Kernel("int4pack", False, lambda m: m.wf.layout == "int4pack" and _cpu(m), _bind_int4pack,
           "_weight_int4pack_mm_for_cpu, bf16 activations"),
    Kernel("int8pack", False, lambda m: _int8_rows(m) and _cpu(m) and _int8pack_k(m), _bind_int8pack,
           "_weight_int8pack_mm, bf16 activations"),
    Kernel("w8avx2", True, _w8avx2_applies, _bind_w8avx2,
           "own AVX2 int8-weight x fp32 kernel (csrc/q4avx2.c w8_linear), exact"),
    Kernel("q8a8", False, _q8a8_applies, lambda m: _bind_w8avx2(m, a8=True),
           "own AVX512-VNNI int8 kernel with int8 input blocks (csrc/q4avx2.c w8_linear_a8)"),
    Kernel("int_mm", True, _w8a8, _bind_int_mm, "int8 x int8 -> int32 (torch._int_mm)"),
    Kernel("i8avx2", True, _i8avx2_applies, _bind_i8avx2, "own AVX2 int8 x int8 -> int32 kernel (csrc/q4avx2.c)"),
    Kernel("int8pack_codes", False, lambda m: _w8a8(m) and m.wf.symmetric and _cpu(m) and _int8pack_k(m),
           _bind_int8pack_codes,
           "int8 input codes on _weight_int8pack_mm, bf16 result"),
    Kernel("lutavx2", True, _lutavx2_applies, _bind_lutavx2,
           "own AVX2 codebook kernel (csrc/q4avx2.c lut_linear): table lookup in registers, fp32"),
)}


class Planned:
    """A module run by the kernel its plan names per M bucket (PackedLinear, CodebookLinear): ``plan`` is
    {M bucket: kernel name} (kernels.tune sets it); buckets without an entry, or naming a kernel that does not
    apply here (a plan saved where the native kernel was built, loaded where it is not, or disabled since), run
    the fallback. The runners are bound once per plan change and rebound after a device move."""

    @property
    def plan(self) -> dict[int, str]:
        return self._plan

    @plan.setter
    def plan(self, plan: dict[int, str]) -> None:
        self._plan = dict(plan)
        self._bind()

    def _bind(self) -> None:
        kernels = {b: self._plan.get(b, FALLBACK) for b in BUCKETS}
        kernels = {b: k if KERNELS[k].applies(self) else FALLBACK for b, k in kernels.items()}
        bound = {k: KERNELS[k].bind(self) for k in set(kernels.values())}
        self._runners = {b: bound[k] for b, k in kernels.items()}

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        if self._runners:
            self._bind()                 # the runners hold tensors: rebind to the moved ones
        return out


def candidates(mod, policy: str = "auto") -> list[str]:
    """Kernels that can run `mod` under `policy` ('auto': all; 'exact': exact ones only)."""
    return [k.name for k in KERNELS.values() if k.applies(mod) and (policy == "auto" or k.exact)]


# ------------------------------------------------------------------------------------- measurement


def measure(fns: Mapping[str, Callable[[], object]], *, repeats: int = 5, target_s: float = 0.004,
            prune: float | None = 4.0, prune_above_s: float = 0.01, keep: tuple[str, ...] = (),
            clock: Callable[[], float] = time.perf_counter) -> dict[str, tuple[float, bool]]:
    """Median seconds per call of each function (by `clock`: wall time; benchmarks of one thread on a shared
    machine may pass ``time.thread_time``, the CPU time of the calling thread, which other jobs do not inflate).

    Each function gets a warm-up call and a probe (the fastest of 3 calls, robust to load spikes); then
    `repeats` rounds in which every function runs in turn (interleaved, so load changes hit all alike),
    each with enough calls to take about `target_s`. A function whose probe is over `prune` x the fastest
    and over `prune_above_s` seconds is not repeated (it cannot win, and repeating it is what costs) and
    reports its probe time. Returns {name: (seconds, pruned)}."""
    probe, failed = {}, {}
    for name, fn in fns.items():
        try:
            fn()
        except (RuntimeError, NotImplementedError) as e:    # e.g. a shape this device's kernel refuses
            failed[name] = e
            continue
        times = []
        for _ in range(3):
            t0 = clock()
            fn()
            times.append(clock() - t0)
            if times[-1] > prune_above_s:       # slow: one probe is enough
                break
        probe[name] = min(times)
    best = min(probe.values())
    live = [n for n in probe if prune is None or n in keep or probe[n] <= max(prune * best, prune_above_s)]
    calls = {n: max(1, round(target_s / max(probe[n], 1e-7))) for n in live}
    samples: dict[str, list[float]] = {n: [] for n in live}
    for _ in range(repeats):
        for n in live:
            fn, k = fns[n], calls[n]
            t0 = clock()
            for _ in range(k):
                fn()
            samples[n].append((clock() - t0) / k)
    for name, e in failed.items():
        log.info("kernel %s failed while measuring, not a candidate: %s", name, e)
    return {n: (statistics.median(samples[n]), False) if n in samples else (probe.get(n, math.inf), True)
            for n in fns}


@dataclass
class TuneRecord:
    """One kernel decision: the shape/format it is for, the times measured (ms), and the choice."""

    key: str
    bucket: int
    choice: str
    times_ms: dict[str, float] = field(default_factory=dict)
    pruned: list[str] = field(default_factory=list)
    fp32_ms: float | None = None
    modules: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"key": self.key, "M": self.bucket, "choice": self.choice, "fp32_ms": self.fp32_ms,
                "times_ms": self.times_ms, "pruned": self.pruned, "modules": self.modules}


def tune_key(mod) -> str:
    act = mod.act.describe() if mod.act else "-"
    return f"{mod.wf.n}x{mod.wf.k} {mod.wf.describe()} [{mod.wf.layout}] act={act}{' bias' if mod.bias is not None else ''}"


_DECISIONS: dict[tuple, TuneRecord] = {}


def tune(mods, policy: str | Mapping = "auto", *, repeats: int = 5, reference: bool = True,
         cache: bool = True) -> list[TuneRecord]:
    """Set ``mod.plan`` ({M bucket: kernel}) on every module.

    policy: 'auto' (measure every applicable kernel, pick the fastest), 'exact' (measure exact kernels
    only), 'reference' (always the dequant fallback, nothing measured), a kernel name (that kernel where
    it applies, else the fallback) or {bucket: kernel name}. Modules with the same shape and format share
    one measurement; decisions are cached per process (same key, bucket, thread count)."""
    groups: dict[str, list] = {}
    for m in mods:
        groups.setdefault(tune_key(m), []).append(m)
    records = []
    for key, group in groups.items():
        for b in BUCKETS:
            rec = replace(_decide(group[0], key, b, policy, repeats, reference, cache),
                          modules=[m.name for m in group])
            for m in group:
                m.plan = {**m.plan, b: rec.choice}
            records.append(rec)
    return records


def _decide(mod, key: str, b: int, policy, repeats: int, reference: bool, cache: bool) -> TuneRecord:
    if isinstance(policy, Mapping) or policy not in ("auto", "exact"):
        want = policy.get(b, FALLBACK) if isinstance(policy, Mapping) else \
            FALLBACK if policy == "reference" else policy
        if want not in KERNELS:
            raise ValueError(f"unknown kernel {want!r}; known: {sorted(KERNELS)}")
        return TuneRecord(key, b, want if KERNELS[want].applies(mod) else FALLBACK)
    ck = (key, b, policy, torch.get_num_threads(), reference)
    if cache and ck in _DECISIONS:
        return _DECISIONS[ck]
    names = candidates(mod, policy)
    rec = TuneRecord(key, b, FALLBACK)
    if len(names) > 1:
        x = torch.randn(*([1] * (getattr(mod, "in_rank", 2) - 2)), b, mod.wf.k,
                        generator=torch.Generator().manual_seed(0)).to(mod.qweight.device)
        fns = {n: KERNELS[n].bind(mod) for n in names}
        fns = {n: (lambda f=f: f(x)) for n, f in fns.items()}
        if reference:
            w = torch.randn(mod.wf.n, mod.wf.k, device=x.device)
            x2 = x.reshape(-1, mod.wf.k)
            fns["fp32"] = lambda: F.linear(x2, w)
        with torch.no_grad():
            res = measure(fns, repeats=repeats, keep=("fp32",))
        rec.times_ms = {n: round(t * 1e3, 4) for n, (t, _) in res.items() if n != "fp32" and t < math.inf}
        rec.pruned = [n for n, (_, p) in res.items() if p]
        rec.fp32_ms = round(res["fp32"][0] * 1e3, 4) if reference else None
        rec.choice = min(names, key=lambda n: res[n][0])
        log.info("kernel for %s at M=%d: %s (%s)", key, b, rec.choice, rec.times_ms)
    if cache:
        _DECISIONS[ck] = rec
    return rec
