"""onnxscript translations of the ``qpass_onnx`` ops: the ``custom_translation_table`` of torch.onnx.export.

Each function builds exactly the ONNX pattern that onnxruntime (1.31, CPU) fuses, as measured in
docs/onnx.md:
  dq_matmul         DequantizeLinear(codes [K,N], opset-21 block_size on axis 0 | per-axis 1) -> MatMul
                    -> com.microsoft.MatMulNBits (4- and 8-bit) after graph optimization
  int8_dyn_matmul   per-token scale = max|x| / 127; codes = round(x / scale) + 128 as uint8 (zero point 128:
                    the symmetric int8 codes, exactly); MatMulInteger -> Cast -> Mul(scale * w_scale)
                    -> com.microsoft.MatMulIntegerToFloat (which takes a per-row A scale)
  int8_outlier_matmul  LLM.int8() with the outlier features found per call: mask = ReduceMax(Abs(x) over every
                    token) >= threshold; int8_dyn_matmul(Where(mask, 0, x)) + MatMul(Gather(x, idx, axis -1),
                    (Cast(Gather(codes, idx, axis 0)) - zp) * w_scale), idx = Squeeze(NonZero(mask)): standard
                    ops of data-dependent shape; the int8 part fuses as int8_dyn_matmul does, the float part is a
                    plain MatMul of [M, |O|] x [|O|, N] (empty when no feature crosses the threshold)
  matmul_nbits      com.microsoft.MatMulNBits, unsigned codes with the default zero point 2^(bits-1)
  codebook_matmul   Gather(table, Cast(codes, INT32) + off_k + off_n) [-> ScatterND(reduction add) of the sparse
                    values] -> MatMul: standard ops only, nothing fused (see docs/onnx.md)
  grid_matmul       Gather(grid, Cast(codes, INT32)) * Gather(scale, off_k + off_n) -> MatMul: weights in a
                    float format with a fixed value grid (fp4_e2m1, nf4, fp8), standard ops, nothing fused
  qdq / qdq_dynamic QuantizeLinear -> DequantizeLinear (dynamic: blocked along the last axis, scales from
                    ReduceMax / ReduceMin over each block, times the clipping ratio when it is not 1); codes of 2,
                    3, 5, 6 or 7 bits in INT8 / UINT8 with an integer Clip to their range between Q and DQ
  qdq_fp8 /         float8 (E4M3FN / E5M2) QuantizeLinear (saturate) -> DequantizeLinear, the input of a linear
  qdq_fp8_dynamic   with FP8 activations (dynamic: scale = max|x| / fp8 max per block of the last axis, blocked
                    QuantizeLinear); onnxruntime runs float8 Q/DQ on CPU (exact, unfused)
  gather_nbits      rows of a matmul_nbits weight (a tied embedding table): Gather of its bytes and scales,
                    nibbles split (BitwiseAnd / BitShift), (code - zero point) * scale
  sdpa              aten.scaled_dot_product_attention (LowerOptions.attention "grouped", the default): grouped
                    query heads meet their K/V head without a repeated copy (Q reshaped to [B, Hkv, G * L, E],
                    one MatMul with K, mask added on a [B, Hkv, G, L, S] view), the scores as (K Qᵀ)ᵀ: only
                    Q and the scores are transposed (small), K is read in place; the scale on Q only; a row a boolean mask blocks whole gives 0 (torch's safe softmax; torch.onnx's
                    translation adds the float minimum there instead: the mean of V). torch.onnx's own translation (attention "torch") repeats K and V (Expand), and
                    reshapes K to 3-D to transpose it, which onnxruntime runs as a copy: two copies of every
                    cache per layer and step. Anything else (dropout, is_causal, heads or sizes not static, a mask
                    of another head count) goes to torch.onnx's translation.
Int4 codes are int8 initializers behind ``Cast(to=INT4)``; ``lower.fold_int4_casts`` turns them into real INT4
initializers after export.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import onnxscript
import torch
from onnxscript import opset21 as op

from . import ops

msft = onnxscript.values.Opset("com.microsoft", 1)
FLOAT, UINT8 = ir.DataType.FLOAT, ir.DataType.UINT8


def _matmul_nbits_schema() -> onnx.defs.OpSchema:
    """com.microsoft.MatMulNBits as the exporter needs it (the ONNX registry does not hold contrib ops)."""
    S, P, A = onnx.defs.OpSchema, onnx.defs.OpSchema.FormalParameter, onnx.defs.OpSchema.Attribute
    opt = S.FormalParameterOption.Optional
    return S("MatMulNBits", "com.microsoft", 1, inputs=[
        P("A", "T1"), P("B", "T2"), P("scales", "T1"), P("zero_points", "T3", param_option=opt),
        P("g_idx", "T4", param_option=opt), P("bias", "T1", param_option=opt)],
        outputs=[P("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)"], ""), ("T2", ["tensor(uint8)"], ""),
                          ("T3", ["tensor(uint8)", "tensor(float)"], ""), ("T4", ["tensor(int32)"], "")],
        attributes=[A("K", S.AttrType.INT), A("N", S.AttrType.INT), A("bits", S.AttrType.INT),
                    A("block_size", S.AttrType.INT), A("accuracy_level", S.AttrType.INT, required=False)])


_MATMUL_NBITS = onnxscript.values.Op(msft, "MatMulNBits", _matmul_nbits_schema())


def sdpa(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False, scale=None,
         enable_gqa: bool = False):
    """scaled_dot_product_attention without copies of K and V (see the module docstring)."""
    hq, hk, e = (query.shape[1], key.shape[1], query.shape[3]) if len(query.shape) == 4 else (None,) * 3
    mask_heads = rank = None
    if attn_mask is not None:           # read before any op: a traced op's output carries no shape
        rank = len(attn_mask.shape)
        mask_heads = 1 if rank < 3 else attn_mask.shape[rank - 3]
    plain = (dropout_p == 0.0 and not is_causal and len(key.shape) == 4 and len(value.shape) == 4
             and all(isinstance(d, int) for d in (hq, hk, e)) and hk > 0 and hq % hk == 0
             and (hq == hk or enable_gqa) and mask_heads in (None, 1, hq) and query.dtype == FLOAT)
    if not plain:
        from onnxscript.function_libs.torch_lib.ops.nn import aten_scaled_dot_product_attention

        return aten_scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                                 enable_gqa)
    g = hq // hk
    q = op.Mul(query, _const(1.0 / math.sqrt(e) if scale is None else float(scale), np.float32))
    if g > 1:
        q = op.Reshape(q, _const([0, hk, -1, e], np.int64))                  # [B, Hkv, G * L, E]
    # (K q^T)^T, not q K^T: no transpose of K, which would be a copy of the cache (a MatMul packs its B operand),
    # and which onnxruntime's transpose optimizer would push up through a K/V quantizer's blocked
    # QuantizeLinear (onnxruntime 1.32 then fails at run time: "x_scale and x must have the same shape")
    scores = op.Transpose(op.MatMul(key, op.Transpose(q, perm=[0, 1, 3, 2])), perm=[0, 1, 3, 2])   # [B, Hkv, G*L, S]
    boolean = attn_mask is not None and attn_mask.dtype == ir.DataType.BOOL
    if attn_mask is not None:
        if boolean:
            attn_mask = op.Where(attn_mask, _const(0.0, np.float32), _const(-np.inf, np.float32))
        if g > 1:
            flat = op.Shape(scores)
            s5 = op.Concat(_const([0, hk, g, -1], np.int64), op.Shape(key, start=2, end=3), axis=0)
            if rank == 3 and mask_heads == hq:                             # [Hq, L, S] -> [1, Hq, L, S]
                attn_mask, rank = op.Unsqueeze(attn_mask, _const([0], np.int64)), 4
            if rank == 4 and mask_heads == hq:                             # [B, Hq, L, S] -> [B, Hkv, G, L, S]
                attn_mask = op.Reshape(attn_mask, op.Concat(op.Shape(attn_mask, start=0, end=1),
                                                            _const([hk, g], np.int64),
                                                            op.Shape(attn_mask, start=2), axis=0))
            elif rank == 4:                                                # [B, 1, L, S] -> [B, 1, 1, L, S]
                attn_mask = op.Unsqueeze(attn_mask, _const([1], np.int64))
            probs = op.Softmax(op.Add(op.Reshape(scores, s5), attn_mask), axis=-1)
        else:
            probs = op.Softmax(op.Add(scores, attn_mask), axis=-1)
        if boolean:             # a row a boolean mask blocks whole: 0, as torch's safe softmax gives (not NaN)
            probs = op.Where(op.IsNaN(probs), _const(0.0, np.float32), probs)
        if g > 1:
            probs = op.Reshape(probs, flat)
    else:
        probs = op.Softmax(scores, axis=-1)
    out = op.MatMul(probs, value)                                             # [B, Hkv, G * L, Ev]
    if g > 1:
        out = op.Reshape(out, op.Concat(_const([0, hq, -1], np.int64), op.Shape(value, start=3), axis=0))
    return out


def _const(value, dtype) -> "onnxscript.ir.Value":
    return op.Constant(value=ir.tensor(np.asarray(value, dtype=dtype)))


def _container(bits: int, signed: bool) -> ir.DataType:
    if bits <= 4:
        return ir.DataType.INT4 if signed else ir.DataType.UINT4
    return ir.DataType.INT8 if signed else ir.DataType.UINT8


def _act_container(bits: int, signed: bool) -> ir.DataType:
    """The Q/DQ type of activation codes: INT4 / UINT4 or INT8 / UINT8 exactly at 4 and 8 bits; every other width
    (2, 3, 5, 6, 7) is held in INT8 / UINT8 and clipped to its own range (_clip_codes)."""
    return _container(bits, signed) if bits == 4 else _container(8, signed)


def _clip_codes(q, bits: int, signed: bool):
    """QuantizeLinear saturates at its container's range; a b-bit format below 8 that is not 4 saturates at
    [qmin, qmax] of b bits: an integer Clip on the codes (onnxruntime's CPU Clip runs int8 / uint8), exact."""
    if bits in (4, 8):
        return q
    qmin, qmax = ops.qrange(bits, signed)
    dtype = np.int8 if signed else np.uint8
    return op.Clip(q, _const(qmin, dtype), _const(qmax, dtype))


def dq_matmul(x, codes, scale, zero_point=None, block: int = 0, bits: int = 8, bias=None):
    signed = codes.dtype == ir.DataType.INT8
    if bits <= 4:
        codes = op.Cast(codes, to=_container(bits, signed))
        zero_point = None if zero_point is None else op.Cast(zero_point, to=_container(bits, signed))
    if block > 0:
        w = op.DequantizeLinear(codes, scale, zero_point, axis=0, block_size=block)
    else:
        w = op.DequantizeLinear(codes, scale, zero_point, axis=1)
    y = op.MatMul(x, w)
    # NOTE: y - (-bias), not Add: with a 2-D input (OPT flattens tokens before fc1/fc2) onnxruntime (1.31) turns
    # MatMul + Add into Gemm (then FusedGemm with a ReLU) before it fuses DequantizeLinear + MatMul into
    # MatMulNBits, so the weight would be dequantized at every call. Sub is not folded into Gemm.
    return y if bias is None else op.Sub(y, op.Neg(bias))


def int8_dyn_matmul(x, codes, w_scale, bias=None, w_zp: int = 128):
    amax = op.ReduceMax(op.Abs(x), _const([-1], np.int64), keepdims=1)
    scale = op.Max(op.Div(amax, _const(127.0, np.float32)), _const(ops.SCALE_FLOOR, np.float32))
    q = op.Round(op.Div(x, scale))
    q = op.Cast(op.Clip(op.Add(q, _const(128.0, np.float32)), _const(0.0, np.float32),
                        _const(255.0, np.float32)), to=UINT8)
    a_zp = _const(128, np.uint8)
    if w_zp:
        acc = op.MatMulInteger(q, codes, a_zp, _const(w_zp, np.uint8))
    else:
        acc = op.MatMulInteger(q, codes, a_zp)
    y = op.Mul(op.Cast(acc, to=FLOAT), op.Mul(scale, w_scale))
    # NOTE: y - (-bias), not Add: onnxruntime (1.31) folds a bias Add into MatMulIntegerToFloat, whose kernel
    # applies a per-row A scale after adding the bias, i.e. scales the bias too (wrong). Sub is not folded.
    return y if bias is None else op.Sub(y, op.Neg(bias))


def int8_outlier_matmul(x, codes, w_scale, bias=None, w_zp: int = 128, threshold: float = 6.0):
    k = op.Shape(x, start=-1)
    flat = op.Reshape(x, op.Concat(_const([-1], np.int64), k, axis=0))
    mask = op.GreaterOrEqual(op.ReduceMax(op.Abs(flat), _const([0], np.int64), keepdims=0),
                             _const(float(threshold), np.float32))                        # [K]
    y = int8_dyn_matmul(op.Where(mask, _const(0.0, np.float32), x), codes, w_scale, None, w_zp)
    idx = op.Squeeze(op.NonZero(mask), _const([0], np.int64))                            # [|O|] int64
    w_o = op.Cast(op.Gather(codes, idx, axis=0), to=FLOAT)
    w_o = op.Mul(op.Sub(w_o, _const(float(w_zp), np.float32)), w_scale)                 # [|O|, N]
    y = op.Add(y, op.MatMul(op.Gather(x, idx, axis=-1), w_o))
    return y if bias is None else op.Sub(y, op.Neg(bias))      # NOTE: Sub, not Add: see int8_dyn_matmul


def matmul_nbits(x, packed, scales, bias=None, k: int = 0, n: int = 0, bits: int = 4, block: int = 128,
                 accuracy_level: int = 0):
    return _MATMUL_NBITS(x, packed, scales, None, None, bias, K=k, N=n, bits=bits, block_size=block,
                            accuracy_level=accuracy_level)


def qdq(x, scale, zero_point=None, axis: int = 0, block: int = 0, bits: int = 8, signed: bool = True):
    container = _act_container(bits, signed)
    if zero_point is not None and container != (ir.DataType.INT8 if signed else ir.DataType.UINT8):
        zero_point = op.Cast(zero_point, to=container)
    if zero_point is None:
        q = op.QuantizeLinear(x, scale, axis=axis, block_size=block, output_dtype=container)
    else:
        q = op.QuantizeLinear(x, scale, zero_point, axis=axis, block_size=block)
    q = _clip_codes(q, bits, signed)
    trailing = _trailing_dims(x, axis)
    if block == 0 and trailing is not None and scale.shape is not None and len(scale.shape) == 1 and \
            container in (ir.DataType.INT8, ir.DataType.UINT8):
        # NOTE: (Cast(q) - zp) * scale, not DequantizeLinear, per axis on 8-bit codes: onnxruntime (1.32) fuses
        # a DequantizeLinear of the input + one of the weight + MatMul into MatMulIntegerToFloat, whose kernel
        # refuses a per-axis input zero point at run time (seen on RPTQ's per-cluster int6 inputs). The same
        # values: DequantizeLinear computes (q - zp) * scale in float.
        shape = _const([-1] + [1] * trailing, np.int64)
        y = op.Cast(q, to=FLOAT)
        if zero_point is not None:
            y = op.Sub(y, op.Reshape(op.Cast(zero_point, to=FLOAT), shape))
        return op.Mul(y, op.Reshape(scale, shape))
    return op.DequantizeLinear(q, scale, zero_point, axis=axis, block_size=block)


def _trailing_dims(x, axis: int) -> int | None:
    """How many axes of `x` follow `axis` (None when `x`'s rank is unknown and `axis` is not negative)."""
    if axis < 0:
        return -axis - 1
    return None if x.shape is None else len(x.shape) - axis - 1


def qdq_dynamic(x, block: int = 0, bits: int = 8, symmetric: bool = True, clip_ratio: float = 1.0):
    if block == 0:
        mn, mx = op.ReduceMin(x, keepdims=0), op.ReduceMax(x, keepdims=0)
    else:   # [..., D] -> [..., D / block, block], reduced over the last axis
        shape = op.Concat(op.Shape(x, end=-1), _const([-1, block], np.int64), axis=0)
        xg = op.Reshape(x, shape)
        last = _const([-1], np.int64)
        mn, mx = op.ReduceMin(xg, last, keepdims=0), op.ReduceMax(xg, last, keepdims=0)
    if clip_ratio != 1.0:   # the clipping ratio: min and max times it before the scale (one Mul each)
        c = _const(clip_ratio, np.float32)
        mn, mx = op.Mul(mn, c), op.Mul(mx, c)
    floor = _const(ops.SCALE_FLOOR, np.float32)
    if symmetric:
        qmax = float(2 ** (bits - 1) - 1)
        scale = op.Max(op.Div(op.Max(op.Neg(mn), mx), _const(qmax, np.float32)), floor)
        q = op.QuantizeLinear(x, scale, axis=-1, block_size=block, output_dtype=_act_container(bits, True))
        return op.DequantizeLinear(_clip_codes(q, bits, True), scale, axis=-1, block_size=block)
    zero = _const(0.0, np.float32)
    qmax = float(2**bits - 1)
    lo, hi = op.Min(mn, zero), op.Max(mx, zero)
    scale = op.Max(op.Div(op.Sub(hi, lo), _const(qmax, np.float32)), floor)
    zp = op.Clip(op.Round(op.Div(op.Neg(lo), scale)), zero, _const(qmax, np.float32))
    zp = op.Cast(zp, to=_act_container(bits, False))
    q = _clip_codes(op.QuantizeLinear(x, scale, zp, axis=-1, block_size=block), bits, False)
    if block == 0 or bits == 4:
        return op.DequantizeLinear(q, scale, zp, axis=-1, block_size=block)
    # NOTE: (Cast(q) - zp) * scale per block, not DequantizeLinear: a zero point per token on 8-bit codes hits
    # the MatMulIntegerToFloat fusion of qdq's note (the kernel refuses a per-row input zero point)
    last = _const([-1], np.int64)
    y = op.Sub(op.Cast(op.Reshape(q, shape), to=FLOAT), op.Unsqueeze(op.Cast(zp, to=FLOAT), last))
    return op.Reshape(op.Mul(y, op.Unsqueeze(scale, last)), op.Shape(x))


def _fp8(e5m2: bool) -> ir.DataType:
    return ir.DataType.FLOAT8E5M2 if e5m2 else ir.DataType.FLOAT8E4M3FN


def qdq_fp8(x, scale, axis: int = 0, e5m2: bool = False):
    q = op.QuantizeLinear(x, scale, axis=axis, output_dtype=_fp8(e5m2), saturate=1)
    return op.DequantizeLinear(q, scale, axis=axis)


def qdq_fp8_dynamic(x, block: int = 0, e5m2: bool = False):
    floor = _const(ops.SCALE_FLOOR, np.float32)
    top = _const(ops.FP8_MAX[bool(e5m2)], np.float32)
    if block == 0:
        scale = op.Max(op.Div(op.ReduceMax(op.Abs(x), keepdims=0), top), floor)
        q = op.QuantizeLinear(x, scale, output_dtype=_fp8(e5m2), saturate=1)
        return op.DequantizeLinear(q, scale)
    shape = op.Concat(op.Shape(x, end=-1), _const([-1, block], np.int64), axis=0)
    amax = op.ReduceMax(op.Abs(op.Reshape(x, shape)), _const([-1], np.int64), keepdims=0)
    scale = op.Max(op.Div(amax, top), floor)
    q = op.QuantizeLinear(x, scale, axis=-1, block_size=block, output_dtype=_fp8(e5m2), saturate=1)
    return op.DequantizeLinear(q, scale, axis=-1, block_size=block)


def codebook_matmul(x, codes, table, off_k, off_n, outlier_index=None, outlier_value=None, bias=None):
    idx = op.Add(op.Add(op.Cast(codes, to=ir.DataType.INT32), off_k), off_n)
    w = op.Gather(table, idx, axis=0)
    if outlier_index is not None:
        flat = op.ScatterND(op.Reshape(w, _const([-1], np.int64)), outlier_index, outlier_value, reduction="add")
        w = op.Reshape(flat, op.Shape(codes))
    y = op.MatMul(x, w)
    return y if bias is None else op.Sub(y, op.Neg(bias))      # NOTE: Sub, not Add: see dq_matmul


def grid_matmul(x, codes, grid, scale, off_k, off_n, bias=None):
    w = op.Mul(op.Gather(grid, op.Cast(codes, to=ir.DataType.INT32), axis=0),
               op.Gather(scale, op.Add(off_k, off_n), axis=0))
    y = op.MatMul(x, w)
    return y if bias is None else op.Sub(y, op.Neg(bias))      # NOTE: Sub, not Add: see dq_matmul


def gather_nbits(ids, packed, scales, k: int = 0, bits: int = 4, block: int = 128):
    """Rows `ids` of a MatMulNBits weight (uint8 [N, blocks, block * bits / 8]; 4 bits: two codes per byte, low
    nibble first; zero point 2^(bits-1)) with standard ops: Gather of the bytes and of the scales [N, blocks],
    nibbles split with BitwiseAnd / BitShift, (code - zero point) * scale, the padded tail of the last block sliced
    off."""
    b = op.Gather(packed, ids, axis=0)                                        # [*ids, blocks, blob]
    if bits == 4:
        lo = op.Unsqueeze(op.BitwiseAnd(b, _const(15, np.uint8)), _const([-1], np.int64))
        hi = op.Unsqueeze(op.BitShift(b, _const(4, np.uint8), direction="RIGHT"), _const([-1], np.int64))
        b = op.Concat(lo, hi, axis=-1)
    q = op.Sub(op.Cast(b, to=FLOAT), _const(float(2 ** (bits - 1)), np.float32))
    s = op.Unsqueeze(op.Gather(scales, ids, axis=0), _const([-1, -2] if bits == 4 else [-1], np.int64))
    w = op.Reshape(op.Mul(q, s), op.Concat(op.Shape(ids), _const([-1], np.int64), axis=0))
    return op.Slice(w, _const([0], np.int64), _const([k], np.int64), _const([-1], np.int64))


ATTENTION_TABLE = {torch.ops.aten.scaled_dot_product_attention.default: sdpa}   # LowerOptions.attention "grouped"

TABLE = {
    ops.gather_nbits: gather_nbits,
    ops.dq_matmul: dq_matmul,
    ops.int8_dyn_matmul: int8_dyn_matmul,
    ops.int8_outlier_matmul: int8_outlier_matmul,
    ops.matmul_nbits: matmul_nbits,
    ops.qdq: qdq,
    ops.qdq_dynamic: qdq_dynamic,
    ops.codebook_matmul: codebook_matmul,
    ops.grid_matmul: grid_matmul,
    ops.qdq_fp8: qdq_fp8,
    ops.qdq_fp8_dynamic: qdq_fp8_dynamic,
}
