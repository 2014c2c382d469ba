"""Quantize, dequantize and fake-quantize tensors: pure tensor math, no graphs.

Conventions
-----------
* **Block size**: one entry per dimension of ``x``; the number of consecutive elements along that dimension
  that share a scale, ``-1`` = the whole dimension. ``scale`` (and ``zero_point``) have the same rank as
  ``x`` and ``ceil(size / block)`` entries per dimension (``1`` for ``-1``), see :func:`scale_shape`. A block
  that does not divide its dimension leaves a smaller last block (704 features in groups of 128: 6 groups,
  the last of 64).
* **Format names**: the low-level functions take the format *name* (``'int2'``..``'int8'``, ``'fp8_e4m3'``,
  ``'fp8_e5m2'``, ``'fp4_e2m1'``, ``'nf4'``); an integer format is symmetric exactly when ``zero_point`` is
  None, so one signature serves the ``torch.library`` ops. :func:`spec_args` turns a ``QSpec`` into them.
* **Codes** (:func:`codes_dtype`): symmetric int -> ``int8`` in ``[-2^(b-1), 2^(b-1)-1]``; asymmetric int ->
  ``uint8`` in ``[0, 2^b-1]``; fp8 -> ``torch.float8_e4m3fn`` / ``torch.float8_e5m2`` (``x/scale`` clamped to
  +-max before the cast, which rounds to nearest even); ``fp4_e2m1`` -> ``uint8`` 0..15, bit 3 the sign and
  the low 3 bits an index into ``FP4_E2M1_VALUES`` (ties go to the even code, i.e. the even mantissa, as
  IEEE round-to-nearest-even; zero is always code 0, never 8); ``nf4`` -> ``uint8`` index into
  ``NF4_VALUES`` (nearest value, ties to the lower code). Integer rounding is ``torch.round``: half to even.
* **Scales** are float32. **Zero points** (asymmetric int only) are ``int32`` tensors holding integers in
  ``[0, 2^b-1]``; the functions also accept float zero points holding integers.
* **Arithmetic** runs in ``promote_types(x.dtype, float32)`` (float32 for bf16/fp16 inputs, float64 for
  float64) and the result is cast to ``x.dtype`` (fake-quant) or ``out_dtype`` (dequantize), so
  ``fake_quantize(x, ...) == dequantize(quantize(x, ...), ..., out_dtype=x.dtype)`` bit for bit.

Edge cases
----------
* All-zero block: the scale is floored at ``SCALE_FLOOR`` (1e-12), so its codes are the code of zero (0;
  the zero point for asymmetric int; 7 for nf4) and it dequantizes to exactly 0, never NaN. Blocks whose
  range is below ~1e-12 * qmax lose resolution; no real weight or activation is that small.
* Constant block ``c``: symmetric -> code ``sign(c) * qmax``; asymmetric -> code ``qmax`` (c > 0) or ``0``
  with zero point ``qmax`` (c < 0). It dequantizes to ``c`` up to float rounding of ``absmax / qmax``
  (a relative error of about one float32 ulp).
* Zero is exactly representable in every format (asymmetric: ``x = 0`` maps to code ``zero_point``).
* ``choose_qparams`` / ``qparams_from_minmax`` (and the observers) raise ``QuantizationError`` on +-inf or
  NaN, saying how many values are non-finite, and on an empty tensor whose blocks would be empty.
* ``quantize`` / ``fake_quantize`` with a given scale saturate +-inf to the largest code; NaN elements give
  an unspecified code (fake-quant propagates NaN for int and fp8). They never raise on data: they run
  inside graphs.
* ``fake_quantize_dynamic`` (inside graphs, cannot raise on data): a block holding +-inf or NaN gets a NaN
  scale, so *that block's* outputs are all NaN; every other block (other tokens, for per-token) is
  unaffected and exact.
* Empty tensors quantize to empty tensors (their scale has a 0-sized dimension).
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
from torch import Tensor

from qpass.errors import QuantizationError
from qpass.primitives.spec import BUILTIN_KINDS, Format, QSpec, format_from_name

NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982422828674, 0.5626170039176941,
    0.7229568362236023, 1.0,
)  # QLoRA NormalFloat4 (bitsandbytes)
FP4_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # magnitudes of codes 0..7 (8..15: negative)
FP8_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
SCALE_FLOOR = 1e-12

BlockSize = Sequence[int]

# ------------------------------------------------------------------------------------------- helpers


@lru_cache(maxsize=None)
def parse_format(fmt: str) -> Format:
    """Format name -> format object; QuantizationError for an unknown name."""
    try:
        return format_from_name(fmt)
    except ValueError as e:
        raise QuantizationError(str(e), fix="use int2..int8, fp8_e4m3, fp8_e5m2, fp4_e2m1 or nf4") from None


def spec_args(spec: QSpec, shape: Sequence[int]) -> tuple[tuple[int, ...], str]:
    """(block_size, format name) of `spec` for a tensor of `shape`: the arguments of the low-level ops."""
    return spec.block_size(tuple(shape)), spec.format.name


def codes_dtype(fmt: str, symmetric: bool) -> torch.dtype:
    """dtype of the codes `quantize` returns for format `fmt`."""
    f = parse_format(fmt)
    if f.kind == "int":
        return torch.int8 if symmetric else torch.uint8
    return FP8_DTYPES.get(f.name, torch.uint8)


def qrange(fmt: str, symmetric: bool) -> tuple[float, float]:
    """(lowest, highest) value in code units (before multiplying by the scale) of a format."""
    f = parse_format(fmt)
    if f.kind == "int":
        return f.qrange(symmetric)
    top = f.max if f.kind == "float" else 1.0
    return -top, top


def scale_shape(shape: Sequence[int], block_size: BlockSize) -> tuple[int, ...]:
    """Shape of the scale of a tensor of `shape`: ceil(size / block) per dim, 1 where the block is -1."""
    check_block_size(shape, block_size)
    return tuple(1 if b == -1 else -(-n // b) for n, b in zip(shape, block_size))


def check_block_size(shape: Sequence[int], block_size: BlockSize) -> None:
    """QuantizationError unless `block_size` has one entry (-1 or >= 1) per dimension of `shape`."""
    if len(block_size) != len(shape) or any(b != -1 and b < 1 for b in block_size):
        raise QuantizationError(
            f"block size {tuple(block_size)} does not fit a tensor of shape {tuple(shape)}",
            fix="give one entry per dimension: a positive block length, or -1 for the whole dimension",
        )


def _check_qparams(x: Tensor, scale: Tensor, zero_point: Tensor | None, block_size: BlockSize, fmt: str):
    want = scale_shape(x.shape, block_size)
    for name, t in (("scale", scale), ("zero_point", zero_point)):
        if t is not None and tuple(t.shape) != want:
            raise QuantizationError(
                f"{name} has shape {tuple(t.shape)}, but a tensor of shape {tuple(x.shape)} with block size "
                f"{tuple(block_size)} needs {want}",
                fix="compute qparams with choose_qparams(x, spec) or an observer using the same block size",
            )
    if zero_point is not None and parse_format(fmt).kind != "int":
        raise QuantizationError(f"{fmt} is symmetric only, but a zero point was given", fix="pass None")
    if parse_format(fmt).kind not in BUILTIN_KINDS:
        raise QuantizationError(f"{fmt} is a registered format: these functions run int, fp8, fp4 and nf4 only",
                                fix="use qpass.primitives.formats.fake_quantize_ext / quantize_ext / dequantize_ext")


def check_finite(x: Tensor, where: str) -> None:
    """QuantizationError if `x` holds +-inf or NaN (qparams computed from it would be meaningless)."""
    bad = x.numel() - int(torch.isfinite(x).sum()) if x.is_floating_point() else 0
    if bad:
        raise QuantizationError(
            f"{where}: {bad} of {x.numel()} values are non-finite (inf or NaN)",
            fix="check the model (overflow in fp16?) and the calibration data; scales cannot come from inf/NaN",
        )


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32) if dtype.is_floating_point else torch.float32


def expand_to(t: Tensor, block_size: BlockSize, shape: Sequence[int]) -> Tensor:
    """A scale-shaped tensor broadcast to `shape`: repeat_interleave along dims with block > 1 (then cut
    the partial last block); dims with block 1 or -1 broadcast as they are (safe for dynamic dims)."""
    for i, b in enumerate(block_size):
        if b > 1 and t.shape[i] != 1:
            t = t.repeat_interleave(b, dim=i).narrow(i, 0, shape[i])
    return t


def blocks(x: Tensor, block_size: BlockSize, fill: float | None = None) -> Tensor:
    """`x` rearranged to [*scale_shape, K]: the K elements of each block along the last dim. Partial last
    blocks are padded with `fill`, or with a copy of an element of the same block when `fill` is None
    (which keeps min, max and absmax of every block exact)."""
    check_block_size(x.shape, block_size)
    inter = []
    for i, (n, b) in enumerate(zip(x.shape, block_size)):
        bb = n if b == -1 else max(1, min(b, n))
        nb = -(-n // bb) if n else (1 if b == -1 else 0)
        if nb * bb > n and n:
            x = _pad(x, i, nb * bb - n, fill)
        inter += [nb, bb]
    rank = x.dim()
    xv = x.reshape(inter).permute([2 * i for i in range(rank)] + [2 * i + 1 for i in range(rank)])
    return xv.reshape(*inter[0::2], -1)


def _pad(x: Tensor, dim: int, extra: int, fill: float | None) -> Tensor:
    n = x.shape[dim]
    if fill is None:
        idx = torch.arange(n + extra, device=x.device).clamp(max=n - 1)
        return x.index_select(dim, idx)
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_full(shape, fill)], dim=dim)


def reduce_blocks(t: Tensor, block_size: BlockSize) -> Tensor:
    """Sum an x-shaped tensor over each block -> scale shape (the adjoint of `expand_to`)."""
    return blocks(t, block_size, fill=0.0).sum(-1)


def block_minmax(x: Tensor, block_size: BlockSize) -> tuple[Tensor, Tensor]:
    """Per-block (min, max), scale-shaped, in x's dtype. NaN propagates into its block's min and max."""
    if all(b in (1, -1) for b in block_size):  # no grouping: plain reductions (fine for dynamic dims)
        check_block_size(x.shape, block_size)
        dims = [i for i, b in enumerate(block_size) if b == -1]
        if not dims:
            return x, x
        return x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    mn, mx = torch.aminmax(blocks(x, block_size), dim=-1)
    return mn, mx


# --------------------------------------------------------------------------------------------- qparams


def pow2_ceil(scale: Tensor) -> Tensor:
    """The smallest power of two >= each positive `scale` (exact: from the binary exponent, not log2); NaN
    stays NaN. ``QSpec.scale_pow2`` rounds static scales with it."""
    m, e = torch.frexp(scale)                      # scale = m * 2^e, m in [0.5, 1)
    out = torch.ldexp(torch.ones_like(scale), torch.where(m == 0.5, e - 1, e))
    return torch.where(torch.isfinite(scale), out, scale)


def _qparams(mn: Tensor, mx: Tensor, fmt: str, symmetric: bool, *, int_zp: bool, full_range: bool = False,
             pow2: bool = False):
    """Min-max formulas. Non-finite min/max give a NaN scale (and zero point) for that block. `pow2`: scales
    rounded up to powers of two (the zero point follows the rounded scale)."""
    f = parse_format(fmt)
    mn, mx = mn.float(), mx.float()
    if full_range:   # the largest-magnitude value (sign kept) -> the most negative code
        extreme = torch.where(mx > -mn, mx.clamp(min=0), mn.clamp(max=0))   # a tie takes min (as MLAS)
        scale = extreme / qrange(fmt, True)[0]
        floor = torch.where(scale < 0, -SCALE_FLOOR, SCALE_FLOOR)
        scale = torch.where(scale.abs() < SCALE_FLOOR, floor, scale)
        return torch.where(torch.isfinite(scale), scale, torch.nan), None
    if symmetric:
        scale = torch.maximum(-mn, mx).clamp(min=0) / qrange(fmt, True)[1]
    else:
        if f.kind != "int":
            raise QuantizationError(f"{fmt} is symmetric only", fix="use symmetric quantization")
        lo, hi = mn.clamp(max=0), mx.clamp(min=0)
        scale = (hi - lo) / qrange(fmt, False)[1]
    scale = torch.where(torch.isfinite(scale), scale.clamp(min=SCALE_FLOOR), torch.nan)
    if pow2:
        scale = pow2_ceil(scale)
    if symmetric:
        return scale, None
    zp = (-lo / scale).round().clamp(*qrange(fmt, False))
    return scale, (zp.to(torch.int32) if int_zp else zp)


def qparams_from_minmax(min_val: Tensor, max_val: Tensor, spec: QSpec) -> tuple[Tensor, Tensor | None]:
    """Scale (float32) and zero point (int32, or None when symmetric) from per-block min and max.

    Symmetric: scale = max(|min|, |max|) / qmax (qmax = 2^(b-1)-1 for int, the format max for fp8/fp4, 1
    for nf4); with ``spec.full_range``: scale = v / -2^(b-1), v the one of min/max of larger magnitude
    (negative when v > 0). Asymmetric int: the range is widened to include 0, scale = (max - min) / (2^b - 1), zero
    point = clamp(round(-min / scale), 0, 2^b - 1). Scales are floored at SCALE_FLOOR. With
    ``spec.scale_pow2`` each scale is then rounded up to a power of two (:func:`pow2_ceil`).
    """
    check_finite(min_val, "qparams_from_minmax(min_val)")
    check_finite(max_val, "qparams_from_minmax(max_val)")
    return _qparams(min_val, max_val, spec.format.name, spec.symmetric, int_zp=True, full_range=spec.full_range,
                    pow2=spec.scale_pow2)


def choose_qparams(x: Tensor, spec: QSpec, *, block_size: BlockSize | None = None):
    """Min-max (scale, zero_point) of `x` for `spec`, one per block of `block_size` (default: from the
    spec's granularity). Raises QuantizationError on inf/NaN in x or on empty blocks."""
    block_size = tuple(spec.block_size(x.shape) if block_size is None else block_size)
    check_finite(x, "choose_qparams")
    shape = scale_shape(x.shape, block_size)
    if x.numel() == 0 and torch.Size(shape).numel() > 0:
        raise QuantizationError(f"cannot choose qparams of an empty tensor of shape {tuple(x.shape)}",
                                fix="give at least one element per block")
    if x.numel() == 0:
        return _qparams(x.new_zeros(shape), x.new_zeros(shape), spec.format.name, spec.symmetric, int_zp=True,
                        pow2=spec.scale_pow2)
    mn, mx = block_minmax(x, block_size)
    return _qparams(mn, mx, spec.format.name, spec.symmetric, int_zp=True, full_range=spec.full_range,
                    pow2=spec.scale_pow2)


# -------------------------------------------------------------------------------------- code grids


def _lut(values: Sequence[float], like: Tensor) -> Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device)


def _nearest(v: Tensor, grid: Tensor, ties_to_even: bool) -> Tensor:
    """Index of the nearest entry of the sorted `grid` (ties: lower index, or the even one)."""
    mids = (grid[1:] + grid[:-1]) / 2
    lo = torch.bucketize(v, mids)
    if not ties_to_even:
        return lo
    hi = torch.bucketize(v, mids, right=True)
    return torch.where((lo != hi) & (lo % 2 == 1), hi, lo)


def _encode(y: Tensor, zp: Tensor | None, fmt: str) -> Tensor:
    """Codes of `y` = x / scale (already in code units)."""
    f = parse_format(fmt)
    lo, hi = qrange(fmt, zp is None)
    if f.kind == "int":
        q = y.round() if zp is None else y.round() + zp
        return q.clamp(lo, hi).to(codes_dtype(fmt, zp is None))
    if f.name in FP8_DTYPES:
        return y.clamp(lo, hi).to(FP8_DTYPES[f.name])
    if f.name == "fp4_e2m1":
        idx = _nearest(y.abs().clamp(max=hi), _lut(FP4_E2M1_VALUES, y), ties_to_even=True)
        return (idx + 8 * ((y < 0) & (idx > 0))).to(torch.uint8)
    return _nearest(y.clamp(lo, hi), _lut(NF4_VALUES, y), ties_to_even=False).to(torch.uint8)


def _decode(codes: Tensor, zp: Tensor | None, fmt: str, dtype: torch.dtype) -> Tensor:
    """Values of `codes` in code units (multiply by the scale to get x back), in `dtype`."""
    f = parse_format(fmt)
    if f.kind == "int":
        v = codes.to(dtype)
        return v if zp is None else v - zp
    if f.name in FP8_DTYPES:
        return codes.to(dtype)
    table = FP4_E2M1_VALUES + tuple(-v for v in FP4_E2M1_VALUES) if f.name == "fp4_e2m1" else NF4_VALUES
    return torch.tensor(table, dtype=dtype, device=codes.device)[codes.long()]


def _roundtrip(y: Tensor, zp: Tensor | None, fmt: str) -> Tensor:
    """_decode(_encode(y)) without integer codes for int formats (the int cast is exact in range)."""
    if parse_format(fmt).kind != "int":
        return _decode(_encode(y, zp, fmt), zp, fmt, y.dtype)
    q = (y.round() if zp is None else y.round() + zp).clamp(*qrange(fmt, zp is None))
    return q if zp is None else q - zp


def _code_units(x: Tensor, scale: Tensor, zero_point: Tensor | None, block_size: BlockSize, dtype):
    """(x / scale, zero point), both broadcast to x and in `dtype`."""
    s = expand_to(scale.to(dtype), block_size, x.shape)
    z = None if zero_point is None else expand_to(zero_point.to(dtype), block_size, x.shape)
    return x.to(dtype) / s, z, s


# ----------------------------------------------------------------------------------------- public ops


def quantize(x: Tensor, scale: Tensor, zero_point: Tensor | None, block_size: BlockSize, fmt: str) -> Tensor:
    """Codes of `x` (dtype: `codes_dtype(fmt, zero_point is None)`); out-of-range values saturate."""
    _check_qparams(x, scale, zero_point, block_size, fmt)
    y, z, _ = _code_units(x, scale, zero_point, block_size, _compute_dtype(x.dtype))
    return _encode(y, z, fmt)


def dequantize(codes: Tensor, scale: Tensor, zero_point: Tensor | None, block_size: BlockSize, fmt: str,
               out_dtype: torch.dtype = torch.float32) -> Tensor:
    """x_hat = value(codes) * scale (value = codes - zero_point for int), in `out_dtype`."""
    _check_qparams(codes, scale, zero_point, block_size, fmt)
    dtype = _compute_dtype(out_dtype)
    s = expand_to(scale.to(dtype), block_size, codes.shape)
    z = None if zero_point is None else expand_to(zero_point.to(dtype), block_size, codes.shape)
    return (_decode(codes, z, fmt, dtype) * s).to(out_dtype)


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor | None, block_size: BlockSize,
                  fmt: str) -> Tensor:
    """dequantize(quantize(x)) in x's dtype, bit for bit, without integer codes for int formats."""
    _check_qparams(x, scale, zero_point, block_size, fmt)
    y, z, s = _code_units(x, scale, zero_point, block_size, _compute_dtype(x.dtype))
    return (_roundtrip(y, z, fmt) * s).to(x.dtype)


def check_clip_ratio(clip_ratio: float) -> None:
    """A dynamic quantizer's clipping ratio is in (0, 1] (1: min-max, no clipping)."""
    if not (isinstance(clip_ratio, (int, float)) and 0.0 < clip_ratio <= 1.0):
        raise QuantizationError(f"clip_ratio must be in (0, 1], got {clip_ratio!r}",
                                fix="use 1.0 for min-max scales, e.g. 0.9 to clip the top 10% of each block's range")


def dynamic_qparams(x: Tensor, block_size: BlockSize, fmt: str, symmetric: bool, clip_ratio: float = 1.0):
    """Min-max (scale, float zero point or None) of `x` per block, never raising on data: blocks with
    inf/NaN get a NaN scale. Used by `fake_quantize_dynamic`.

    `clip_ratio` c (QuaRot's ``a_clip_ratio`` / ``k_clip_ratio`` / ``v_clip_ratio``): each block's min and max
    are multiplied by c before the min-max formulas (symmetric: scale = c * absmax / qmax; asymmetric: the
    range [c * min(min, 0), c * max(max, 0)]); values outside saturate. c == 1 computes exactly min-max."""
    if x.numel() == 0:
        shape = scale_shape(x.shape, block_size)
        return _qparams(x.new_zeros(shape), x.new_zeros(shape), fmt, symmetric, int_zp=False)
    mn, mx = block_minmax(x, block_size)
    if clip_ratio != 1.0:
        mn, mx = mn * clip_ratio, mx * clip_ratio
    return _qparams(mn, mx, fmt, symmetric, int_zp=False)


def token_scale(x: Tensor, fmt: str, clip_ratio: float = 1.0) -> Tensor:
    """Per-token (last axis) symmetric int scale, [..., 1]: (clip_ratio *) absmax / qmax floored at SCALE_FLOOR,
    as `dynamic_qparams` computes it, except that a token holding inf/NaN gets an inf/NaN scale (its outputs are
    NaN either way)."""
    amax = x.abs().amax(-1, keepdim=True)
    if clip_ratio != 1.0:
        amax = amax.mul_(clip_ratio)
    return amax.div_(qrange(fmt, True)[1]).clamp_(min=SCALE_FLOOR)


def fake_quantize_dynamic(x: Tensor, block_size: BlockSize, fmt: str, symmetric: bool,
                          clip_ratio: float = 1.0) -> Tensor:
    """Fake-quantize `x` with min-max qparams computed from `x` itself, per block (per-token activations:
    block (1, ..., 1, -1)), the range shrunk by `clip_ratio` (see `dynamic_qparams`). A block holding inf/NaN
    comes out all NaN; other blocks are unaffected."""
    if symmetric and x.dtype == torch.float32 and fmt.startswith("int") and x.numel() and \
            all(b == 1 for b in block_size[:-1]) and block_size[-1] in (-1, x.shape[-1]):
        # per-token symmetric int (the activation quantizer of every W8A8 / W4A8 recipe): the same float32
        # operations as the general path (scale = absmax / qmax floored, round(x / scale) clamped, times scale;
        # an inf/NaN token makes its scale inf/NaN and so its outputs NaN) in four fused passes, ~2.5x faster.
        scale = token_scale(x, fmt, clip_ratio)
        return (x / scale).round_().clamp_(*qrange(fmt, True)).mul_(scale)
    scale, zp = dynamic_qparams(x, block_size, fmt, symmetric, clip_ratio)
    return fake_quantize(x, scale, zp, block_size, fmt)


# ----------------------------------------------------------------------------------------- gradients


def fake_quantize_grads(x: Tensor, scale: Tensor, zero_point: Tensor | None, block_size: BlockSize,
                        fmt: str, grad: Tensor, need_scale: bool) -> tuple[Tensor, Tensor | None]:
    """Backward of fake_quantize: (grad wrt x, grad wrt scale or None).

    x: straight-through estimator masked to the elements that are not clipped (their code is strictly
    inside the saturating clamp, i.e. qmin <= round(x/s)+z <= qmax for int, |x/s| <= max for float).
    scale (int formats only; None otherwise): LSQ (Esser et al. 2020), d x_hat / d s = round(x/s) - x/s
    where not clipped and (qmin - z) or (qmax - z) where clipped, times grad, summed over each block and
    multiplied by 1 / sqrt(numel_per_scale * qmax), numel_per_scale = x.numel() / scale.numel().
    """
    dtype = _compute_dtype(x.dtype)
    y, z, _ = _code_units(x, scale, zero_point, block_size, dtype)
    lo, hi = qrange(fmt, zero_point is None)
    if parse_format(fmt).kind == "int":
        q = y.round() if z is None else y.round() + z
        inside = (q >= lo) & (q <= hi)
    else:
        inside = (y >= lo) & (y <= hi)
    grad_x = (grad * inside).to(x.dtype)
    if not need_scale or parse_format(fmt).kind != "int":
        return grad_x, None
    d_ds = _roundtrip(y, z, fmt) - y * inside
    g = 1.0 / (max(x.numel() / max(scale.numel(), 1), 1.0) * hi) ** 0.5
    grad_s = reduce_blocks(grad.to(dtype) * d_ds, block_size) * g
    return grad_x, grad_s.to(scale.dtype)
