"""The lowered forms, as ``torch.library`` ops (namespace ``qpass_onnx``), one per ONNX pattern we emit.

The FX rewrite (``patterns.py``) replaces qpass fake-quant nodes with these ops; each has a reference kernel
(so the rewritten graph still runs in torch and can be checked against the fake-quant graph before export),
a fake kernel (for export with dynamic shapes) and one onnxscript translation (``translations.py``).

    dq_matmul(x, codes[K,N], scale, zp?, block, bits, bias?)  MatMul(x, DequantizeLinear(codes)) (+ Add)
    int8_dyn_matmul(x, codes[K,N], w_scale, bias?, w_zp)      per-token int8 x -> MatMulInteger -> Cast -> Mul
    int8_outlier_matmul(x, codes[K,N], w_scale, bias?, w_zp,  LLM.int8(): the features O with max |x| >= threshold
                        threshold)                            in this call stay float: int8_dyn_matmul(x with O
                                                              zeroed) + x[..., O] @ deq(codes)[O] (NonZero, Gather)
    matmul_nbits(x, packed[N,nb,blob], scales, bias?, ...)    com.microsoft.MatMulNBits
    qdq(x, scale, zp?, axis, block, bits, signed)             QuantizeLinear -> DequantizeLinear (static)
    codebook_matmul(x, codes[K,N], table, off_k, off_n,       learned codebooks: Gather(table, codes + offsets)
                    outlier_index?, outlier_value?, bias?)    (+ ScatterND add of sparse values) -> MatMul
    grid_matmul(x, codes[K,N], grid, scale, off_k, off_n,    fixed-grid float formats (fp4_e2m1, nf4, fp8 weights):
                bias?)                                        Gather(grid, codes) * Gather(scale, offsets) -> MatMul
    qdq_dynamic(x, block, bits, symmetric)                    scales from x per block of the last axis, Q -> DQ
    gather_nbits(ids, packed[N,nb,blob], scales[N,nb], k, bits, block)  rows `ids` of a matmul_nbits weight:
                                                              Gather bytes + scales, unpack nibbles, (q - z) * s
    qdq_fp8(x, scale, axis, e5m2)                             float8 QuantizeLinear -> DequantizeLinear (static:
                                                              per tensor, 0-d scale, or per axis, 1-D scale)
    qdq_fp8_dynamic(x, block, e5m2)                           scale = max|x| / fp8 max per block of the last axis
                                                              (per token: the whole axis), float8 Q -> DQ

Weight layout: codes are stored [K, N] (the MatMul's B), so DequantizeLinear feeds MatMul directly (a
Transpose in between blocks onnxruntime's fusions). ``block`` > 0: blocked along K (scale [ceil(K/block), N],
partial last block allowed, as in ONNX); ``block`` == 0: per output channel (scale [N]) or per tensor (0-d).
``bits`` is the code width; it picks the ONNX container (<= 4: INT4/UINT4, else INT8/UINT8).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

SCALE_FLOOR = 1e-12   # same floor as qpass.primitives (all-zero blocks dequantize to 0)


def _expand_rows(s: Tensor, block: int, k: int) -> Tensor:
    """Scale/zero point laid out for `block` rows of K -> one row per K index ([N] / 0-d broadcast as is)."""
    return s.repeat_interleave(block, 0)[:k] if block > 0 else s


def dequantize_weight(codes: Tensor, scale: Tensor, zero_point: Optional[Tensor], block: int) -> Tensor:
    w = codes.float()
    if zero_point is not None:
        w = w - _expand_rows(zero_point.float(), block, codes.shape[0])
    return w * _expand_rows(scale.float(), block, codes.shape[0])


def _linear_out(x: Tensor, n: int) -> Tensor:
    return x.new_empty((*x.shape[:-1], n))


def per_token_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-token int8 codes (as float) and scales: what qpass's fake_quantize_dynamic computes."""
    s = (x.abs().amax(-1, keepdim=True) / 127.0).clamp(min=SCALE_FLOOR)
    return (x / s).round().clamp(-128, 127), s


def _qdq_reference(x: Tensor, scale: Tensor, zero_point: Optional[Tensor], axis: int, block: int, qmin: int,
                   qmax: int) -> Tensor:
    if block > 0:
        s = scale.repeat_interleave(block, axis).narrow(axis, 0, x.shape[axis])
        z = None if zero_point is None else zero_point.repeat_interleave(block, axis).narrow(axis, 0, x.shape[axis])
    elif scale.dim() == 1:
        shape = [1] * x.dim()
        shape[axis] = -1
        s = scale.reshape(shape)
        z = None if zero_point is None else zero_point.reshape(shape)
    else:
        s, z = scale, zero_point
    q = (x / s).round() + (0 if z is None else z.float())
    q = q.clamp(qmin, qmax)
    return ((q - (0 if z is None else z.float())) * s).to(x.dtype)


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def dynamic_qparams(x: Tensor, block: int, bits: int, symmetric: bool,
                    clip_ratio: float = 1.0) -> tuple[Tensor, Tensor | None]:
    """Min-max scale (and zero point) per block of `block` elements along the last axis (per token when
    `block` is the whole axis); block == 0: one scale for the whole tensor. `clip_ratio`: min and max times it
    first (qpass's dynamic clipping ratio)."""
    if block == 0:
        mn, mx = x.amin().reshape([1] * x.dim()), x.amax().reshape([1] * x.dim())
    else:
        xg = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
        mn, mx = xg.amin(-1), xg.amax(-1)
    if clip_ratio != 1.0:
        mn, mx = mn * clip_ratio, mx * clip_ratio
    if symmetric:
        return (torch.maximum(-mn, mx).clamp(min=0) / qrange(bits, True)[1]).clamp(min=SCALE_FLOOR), None
    lo, hi = mn.clamp(max=0), mx.clamp(min=0)
    s = ((hi - lo) / qrange(bits, False)[1]).clamp(min=SCALE_FLOOR)
    return s, (-lo / s).round().clamp(*qrange(bits, False))


def _register() -> None:
    @torch.library.custom_op("qpass_onnx::dq_matmul", mutates_args=())
    def dq_matmul(x: Tensor, codes: Tensor, scale: Tensor, zero_point: Optional[Tensor], block: int, bits: int,
                  bias: Optional[Tensor]) -> Tensor:
        y = x @ dequantize_weight(codes, scale, zero_point, block).to(x.dtype)
        return y if bias is None else y + bias

    @dq_matmul.register_fake
    def _(x, codes, scale, zero_point, block, bits, bias):
        return _linear_out(x, codes.shape[1])

    @torch.library.custom_op("qpass_onnx::int8_dyn_matmul", mutates_args=())
    def int8_dyn_matmul(x: Tensor, codes: Tensor, w_scale: Tensor, bias: Optional[Tensor], w_zp: int) -> Tensor:
        q, s = per_token_int8(x)
        w = (codes.float() - w_zp) * w_scale
        y = ((q * s) @ w).to(x.dtype)
        return y if bias is None else y + bias

    @int8_dyn_matmul.register_fake
    def _(x, codes, w_scale, bias, w_zp):
        return _linear_out(x, codes.shape[1])

    @torch.library.custom_op("qpass_onnx::int8_outlier_matmul", mutates_args=())
    def int8_outlier_matmul(x: Tensor, codes: Tensor, w_scale: Tensor, bias: Optional[Tensor], w_zp: int,
                            threshold: float) -> Tensor:
        mask = x.reshape(-1, x.shape[-1]).abs().amax(0) >= threshold          # [K]: this call's outlier features
        q, s = per_token_int8(x.masked_fill(mask, 0.0))
        w = (codes.float() - w_zp) * w_scale
        y = (q * s) @ w + x.float()[..., mask] @ w[mask]
        y = y.to(x.dtype)
        return y if bias is None else y + bias

    @int8_outlier_matmul.register_fake
    def _(x, codes, w_scale, bias, w_zp, threshold):
        return _linear_out(x, codes.shape[1])

    @torch.library.custom_op("qpass_onnx::matmul_nbits", mutates_args=())
    def matmul_nbits(x: Tensor, packed: Tensor, scales: Tensor, bias: Optional[Tensor], k: int, n: int, bits: int,
                     block: int, accuracy_level: int) -> Tensor:
        # NOTE: the reference is accuracy_level 0 (exact w.r.t. the dequantized weights); level 4 also
        # quantizes x to int8 per block of K inside onnxruntime's kernel (see docs/onnx.md).
        codes = unpack_nbits(packed, k, bits).float() - 2 ** (bits - 1)          # [N, K]
        w = codes * scales.reshape(n, -1).repeat_interleave(block, 1)[:, :k]
        y = x @ w.t().to(x.dtype)
        return y if bias is None else y + bias

    @matmul_nbits.register_fake
    def _(x, packed, scales, bias, k, n, bits, block, accuracy_level):
        return _linear_out(x, n)

    @torch.library.custom_op("qpass_onnx::qdq", mutates_args=())
    def qdq(x: Tensor, scale: Tensor, zero_point: Optional[Tensor], axis: int, block: int, bits: int,
            signed: bool) -> Tensor:
        return _qdq_reference(x, scale, zero_point, axis, block, *qrange(bits, signed)).contiguous()

    @qdq.register_fake
    def _(x, scale, zero_point, axis, block, bits, signed):
        return torch.empty_like(x)

    @torch.library.custom_op("qpass_onnx::qdq_dynamic", mutates_args=())
    def qdq_dynamic(x: Tensor, block: int, bits: int, symmetric: bool, clip_ratio: float = 1.0) -> Tensor:
        s, z = dynamic_qparams(x, block, bits, symmetric, clip_ratio)
        return _qdq_reference(x, s, z, -1, block, *qrange(bits, symmetric)).contiguous()

    @qdq_dynamic.register_fake
    def _(x, block, bits, symmetric, clip_ratio=1.0):
        return torch.empty_like(x)

    @torch.library.custom_op("qpass_onnx::gather_nbits", mutates_args=())
    def gather_nbits(ids: Tensor, packed: Tensor, scales: Tensor, k: int, bits: int, block: int) -> Tensor:
        rows = ids.reshape(-1)
        codes = unpack_nbits(packed[rows], k, bits).float() - 2 ** (bits - 1)          # [rows, K]
        w = codes * scales[rows].reshape(rows.shape[0], -1).repeat_interleave(block, 1)[:, :k]
        return w.reshape(*ids.shape, k)

    @gather_nbits.register_fake
    def _(ids, packed, scales, k, bits, block):
        return ids.new_empty((*ids.shape, k), dtype=torch.float32)


FP8_MAX = {False: 448.0, True: 57344.0}                     # e4m3fn, e5m2 (qpass.primitives.spec.FLOAT_MAX)
FP8_TORCH = {False: torch.float8_e4m3fn, True: torch.float8_e5m2}


def fp8_roundtrip(x: Tensor, scale: Tensor, e5m2: bool) -> Tensor:
    """x / scale saturated to the format's range, rounded to float8 (nearest even), times scale: what qpass's
    fake_quantize computes for fp8 formats and what float8 QuantizeLinear (saturate=1) + DequantizeLinear do."""
    m = FP8_MAX[e5m2]
    return ((x / scale).clamp(-m, m).to(FP8_TORCH[e5m2]).to(x.dtype) * scale).contiguous()


def fp8_dynamic_scale(x: Tensor, block: int, e5m2: bool) -> Tensor:
    """max|x| / fp8 max per block of `block` elements of the last axis (0: the whole tensor), floored at
    SCALE_FLOOR; shaped to broadcast against x reshaped [..., D / block, block]."""
    if block == 0:
        return (x.abs().amax() / FP8_MAX[e5m2]).clamp(min=SCALE_FLOOR)
    xg = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
    return (xg.abs().amax(-1, keepdim=True) / FP8_MAX[e5m2]).clamp(min=SCALE_FLOOR)


def _register_fp8() -> None:
    @torch.library.custom_op("qpass_onnx::qdq_fp8", mutates_args=())
    def qdq_fp8(x: Tensor, scale: Tensor, axis: int, e5m2: bool) -> Tensor:
        s = scale
        if scale.dim() == 1:
            shape = [1] * x.dim()
            shape[axis] = -1
            s = scale.reshape(shape)
        return fp8_roundtrip(x, s, e5m2)

    @qdq_fp8.register_fake
    def _(x, scale, axis, e5m2):
        return torch.empty_like(x)

    @torch.library.custom_op("qpass_onnx::qdq_fp8_dynamic", mutates_args=())
    def qdq_fp8_dynamic(x: Tensor, block: int, e5m2: bool) -> Tensor:
        s = fp8_dynamic_scale(x, block, e5m2)
        if block == 0:
            return fp8_roundtrip(x, s, e5m2)
        xg = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
        return fp8_roundtrip(xg, s, e5m2).reshape(x.shape)

    @qdq_fp8_dynamic.register_fake
    def _(x, block, e5m2):
        return torch.empty_like(x)


def codebook_weight(codes: Tensor, table: Tensor, off_k: Tensor, off_n: Tensor, outlier_index: Optional[Tensor],
                    outlier_value: Optional[Tensor]) -> Tensor:
    """[K, N] weight of a codebook_matmul: ``table[codes + off_k + off_n]`` (the table flattened, scales folded in,
    offsets selecting each element's block), plus the sparse values at their flat [K, N] indices."""
    w = table[codes.long() + off_k.long() + off_n.long()]
    if outlier_index is not None:
        w = w.reshape(-1).index_add(0, outlier_index.reshape(-1), outlier_value.to(w.dtype)).reshape(w.shape)
    return w


def grid_weight(codes: Tensor, grid: Tensor, scale: Tensor, off_k: Tensor, off_n: Tensor) -> Tensor:
    """[K, N] weight of a grid_matmul: ``grid[codes] * scale[off_k + off_n]`` (the format's value of each code, in
    code units, times the scale of the element's block; `scale` flattened, offsets selecting the block)."""
    return grid[codes.long()] * scale[off_k.long() + off_n.long()]


def _register_grid() -> None:
    @torch.library.custom_op("qpass_onnx::grid_matmul", mutates_args=())
    def grid_matmul(x: Tensor, codes: Tensor, grid: Tensor, scale: Tensor, off_k: Tensor, off_n: Tensor,
                    bias: Optional[Tensor]) -> Tensor:
        y = x @ grid_weight(codes, grid, scale, off_k, off_n).to(x.dtype)
        return y if bias is None else y + bias

    @grid_matmul.register_fake
    def _(x, codes, grid, scale, off_k, off_n, bias):
        return _linear_out(x, codes.shape[1])


def _register_codebook() -> None:
    @torch.library.custom_op("qpass_onnx::codebook_matmul", mutates_args=())
    def codebook_matmul(x: Tensor, codes: Tensor, table: Tensor, off_k: Tensor, off_n: Tensor,
                        outlier_index: Optional[Tensor], outlier_value: Optional[Tensor],
                        bias: Optional[Tensor]) -> Tensor:
        y = x @ codebook_weight(codes, table, off_k, off_n, outlier_index, outlier_value).to(x.dtype)
        return y if bias is None else y + bias

    @codebook_matmul.register_fake
    def _(x, codes, table, off_k, off_n, outlier_index, outlier_value, bias):
        return _linear_out(x, codes.shape[1])


def pack_nbits(codes: Tensor, block: int, bits: int) -> Tensor:
    """Unsigned codes [N, K] (0 .. 2^bits-1) -> MatMulNBits' B: uint8 [N, ceil(K/block), block*bits/8], codes
    packed low bits first along K; the partial last block is padded with zeros."""
    if bits not in (4, 8):
        raise ValueError(f"MatMulNBits packing supports 4 or 8 bits here, got {bits}")
    n, k = codes.shape
    nb = -(-k // block)
    c = torch.zeros(n, nb * block, dtype=torch.uint8)
    c[:, :k] = codes.to(torch.uint8)
    if bits == 4:
        c = c[:, 0::2] | (c[:, 1::2] << 4)
    return c.reshape(n, nb, block * bits // 8).contiguous()


def unpack_nbits(packed: Tensor, k: int, bits: int) -> Tensor:
    n = packed.shape[0]
    flat = packed.reshape(n, -1)
    if bits == 4:
        flat = torch.stack([flat & 0x0F, flat >> 4], -1).reshape(n, -1)
    return flat[:, :k]


def _registered() -> bool:
    try:
        torch.ops.qpass_onnx.gather_nbits.default
    except (AttributeError, RuntimeError):
        return False
    return True


if not _registered():
    _register()
if not hasattr(torch.ops.qpass_onnx, "codebook_matmul"):
    _register_codebook()
if not hasattr(torch.ops.qpass_onnx, "qdq_fp8"):
    _register_fp8()
if not hasattr(torch.ops.qpass_onnx, "grid_matmul"):
    _register_grid()

dq_matmul = torch.ops.qpass_onnx.dq_matmul.default
int8_dyn_matmul = torch.ops.qpass_onnx.int8_dyn_matmul.default
int8_outlier_matmul = torch.ops.qpass_onnx.int8_outlier_matmul.default
matmul_nbits = torch.ops.qpass_onnx.matmul_nbits.default
qdq = torch.ops.qpass_onnx.qdq.default
qdq_dynamic = torch.ops.qpass_onnx.qdq_dynamic.default
codebook_matmul = torch.ops.qpass_onnx.codebook_matmul.default
grid_matmul = torch.ops.qpass_onnx.grid_matmul.default
gather_nbits = torch.ops.qpass_onnx.gather_nbits.default
qdq_fp8 = torch.ops.qpass_onnx.qdq_fp8.default
qdq_fp8_dynamic = torch.ops.qpass_onnx.qdq_fp8_dynamic.default
