"""The quantization primitives as ``torch.library`` custom ops, so a pass inserts one opaque node per
quantizer and every backend matches that one op.

    qpass::quantize(Tensor x, Tensor scale, Tensor? zero_point, int[] block_size, str fmt) -> Tensor
    qpass::dequantize(Tensor codes, Tensor scale, Tensor? zero_point, int[] block_size, str fmt,
                      ScalarType out_dtype) -> Tensor
    qpass::fake_quantize(Tensor x, Tensor scale, Tensor? zero_point, int[] block_size, str fmt) -> Tensor
    qpass::fake_quantize_dynamic(Tensor x, int[] block_size, str fmt, bool symmetric,
                                 float clip_ratio=1.0) -> Tensor
    qpass::fake_quantize_ext(Tensor x, Tensor? scale, Tensor? zero_point, int[] block_size, str fmt,
                             Tensor? codebook, Tensor? outlier_index, Tensor? outlier_value,
                             Tensor? float_columns, int float_axis, Tensor? scale_scale,
                             int[] scale_block_size, str scale_fmt, Tensor? scale_zero_point=None,
                             float? float_threshold=None) -> Tensor

``fake_quantize_dynamic``'s ``clip_ratio`` (default 1.0: min-max) shrinks each block's range before the scale is
computed (QuaRot's activation / KV clipping ratios; ``quant.dynamic_qparams``). Passes give it only when it is not
1.0, so graphs without clipping keep the four-argument node.

``fake_quantize_ext`` is the quantizer of registered formats (learned codebooks: ``codebook`` holds one table
per block) and of weight quantizers with side channels (sparse values, float columns, second-level scales);
its semantics are ``qpass.primitives.formats.fake_quantize_ext``. Without a scale it is a dynamic symmetric
quantizer (scales from x at run time) whose only side channel is float columns (``formats.fake_quantize_dynamic_ext``:
LLM.int8()'s outlier feature dimensions), either a fixed set (``float_columns``) or the slices along
``float_axis`` whose max |x| over the call reaches ``float_threshold`` (found per call). Passes insert it only
where one of those is used, so every other quantizer stays the plain op. Read its arguments through
``qpass.quantizer.Quantizer``.

Semantics, dtypes and edge cases are those of ``qpass.primitives.quant`` (the real kernels call it).
Outputs are contiguous and never alias an input. Each op has a fake kernel (output shape = input shape, so
graphs with dynamic batch/sequence dims export and re-export), which checks the static arguments.

Autograd: ``fake_quantize`` -> straight-through estimator for x, masked to elements that are not clipped;
LSQ gradient for ``scale`` (int formats; none for fp8/fp4/nf4, whose scale gets no gradient); none for the
zero point (see ``quant.fake_quantize_grads``). ``fake_quantize_dynamic`` and ``fake_quantize_ext`` ->
identity for x (LLM-QAT: the dynamic scale is not differentiated; ext: a plain straight-through estimator). ``quantize`` / ``dequantize`` are not differentiable.

The module-level names ``quantize``, ``dequantize``, ``fake_quantize`` and ``fake_quantize_dynamic`` are
the ``OpOverload`` handles (``torch.ops.qpass.<name>.default``), the values ``node.target`` takes in graphs.
Importing this module more than once (e.g. under two names) registers the ops only once.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qpass.errors import QuantizationError
from qpass.primitives import formats, quant

NAMESPACE = "qpass"
OP_NAMES = ("quantize", "dequantize", "fake_quantize", "fake_quantize_dynamic", "fake_quantize_ext")


def _check_static(x: Tensor, scale: Tensor | None, zero_point: Tensor | None, block_size, fmt: str) -> None:
    """Checks that do not depend on (possibly symbolic) sizes: ranks and the format name."""
    quant.parse_format(fmt)
    for name, t in (("scale", scale), ("zero_point", zero_point)):
        if t is not None and t.dim() != x.dim():
            raise QuantizationError(f"{name} must have the rank of the input ({x.dim()}), got {t.dim()}")
    if len(block_size) != x.dim():
        raise QuantizationError(f"block size {tuple(block_size)} does not match a rank-{x.dim()} input")


def _fq_setup_context(ctx, inputs, output) -> None:
    x, scale, zero_point, block_size, fmt = inputs
    ctx.save_for_backward(x, scale, zero_point)
    ctx.block_size, ctx.fmt = list(block_size), fmt


def _fq_backward(ctx, grad):
    x, scale, zero_point = ctx.saved_tensors
    grad_x, grad_scale = quant.fake_quantize_grads(
        x, scale, zero_point, ctx.block_size, ctx.fmt, grad, need_scale=ctx.needs_input_grad[1]
    )
    return grad_x, grad_scale, None, None, None


def _dyn_backward(ctx, grad):
    return grad, None, None, None, None


def _ext_backward(ctx, grad):
    return (grad,) + (None,) * 14


def _ext_side(outlier_index, outlier_value, float_columns, float_axis, scale_scale, scale_block_size, scale_fmt,
              scale_zero_point=None):
    outliers = None if outlier_index is None else (outlier_index, outlier_value)
    cols = None if float_columns is None else (float_columns, float_axis)
    scale_q = None if scale_scale is None else (scale_scale, list(scale_block_size), scale_fmt,
                                                *(() if scale_zero_point is None else (scale_zero_point,)))
    return {"outliers": outliers, "float_columns": cols, "scale_q": scale_q}


def _check_dynamic_ext(zero_point, codebook, side: dict, float_threshold) -> None:
    """A fake_quantize_ext without a scale is dynamic and symmetric, with float columns as its only side channel
    (a fixed set or a threshold, not both)."""
    extra = [k for k, v in (("zero_point", zero_point), ("codebook", codebook), ("outliers", side["outliers"]),
                            ("scale_q", side["scale_q"])) if v is not None]
    if extra:
        raise QuantizationError(f"a dynamic fake_quantize_ext (no scale) takes float columns only, got {extra}",
                                fix="give a static scale for tables, sparse values or second-level scales")
    if float_threshold is not None and side["float_columns"] is not None:
        raise QuantizationError("a dynamic fake_quantize_ext takes fixed float columns or a float threshold, not both",
                                fix="pass float_columns=None with float_threshold (columns found per call)")
    if float_threshold is not None and not float_threshold > 0:
        raise QuantizationError(f"float_threshold must be > 0, got {float_threshold}")


def _check_threshold_static(scale, float_threshold) -> None:
    if scale is not None and float_threshold is not None:
        raise QuantizationError("float_threshold (columns found per call) needs a dynamic quantizer (scale None)",
                                fix="store the float columns as float_columns for a static quantizer")


def _register() -> None:
    @torch.library.custom_op("qpass::quantize", mutates_args=())
    def quantize(x: Tensor, scale: Tensor, zero_point: Optional[Tensor], block_size: list[int],
                 fmt: str) -> Tensor:
        return quant.quantize(x, scale, zero_point, block_size, fmt).contiguous()

    @quantize.register_fake
    def _(x, scale, zero_point, block_size, fmt):
        _check_static(x, scale, zero_point, block_size, fmt)
        return x.new_empty(x.shape, dtype=quant.codes_dtype(fmt, zero_point is None))

    @torch.library.custom_op("qpass::dequantize", mutates_args=())
    def dequantize(codes: Tensor, scale: Tensor, zero_point: Optional[Tensor], block_size: list[int],
                   fmt: str, out_dtype: torch.dtype) -> Tensor:
        return quant.dequantize(codes, scale, zero_point, block_size, fmt, out_dtype).contiguous()

    @dequantize.register_fake
    def _(codes, scale, zero_point, block_size, fmt, out_dtype):
        _check_static(codes, scale, zero_point, block_size, fmt)
        return codes.new_empty(codes.shape, dtype=out_dtype)

    @torch.library.custom_op("qpass::fake_quantize", mutates_args=())
    def fake_quantize(x: Tensor, scale: Tensor, zero_point: Optional[Tensor], block_size: list[int],
                      fmt: str) -> Tensor:
        return quant.fake_quantize(x, scale, zero_point, block_size, fmt).contiguous()

    @fake_quantize.register_fake
    def _(x, scale, zero_point, block_size, fmt):
        _check_static(x, scale, zero_point, block_size, fmt)
        return x.new_empty(x.shape)

    fake_quantize.register_autograd(_fq_backward, setup_context=_fq_setup_context)

    @torch.library.custom_op("qpass::fake_quantize_dynamic", mutates_args=())
    def fake_quantize_dynamic(x: Tensor, block_size: list[int], fmt: str, symmetric: bool,
                              clip_ratio: float = 1.0) -> Tensor:
        if clip_ratio != 1.0:
            quant.check_clip_ratio(clip_ratio)
        return quant.fake_quantize_dynamic(x, block_size, fmt, symmetric, clip_ratio).contiguous()

    @fake_quantize_dynamic.register_fake
    def _(x, block_size, fmt, symmetric, clip_ratio=1.0):
        _check_static(x, None, None, block_size, fmt)
        quant.check_clip_ratio(clip_ratio)
        if not symmetric and quant.parse_format(fmt).kind != "int":
            raise QuantizationError(f"{fmt} is symmetric only", fix="pass symmetric=True")
        return x.new_empty(x.shape)

    fake_quantize_dynamic.register_autograd(_dyn_backward)

    @torch.library.custom_op("qpass::fake_quantize_ext", mutates_args=())
    def fake_quantize_ext(x: Tensor, scale: Optional[Tensor], zero_point: Optional[Tensor], block_size: list[int],
                          fmt: str,
                          codebook: Optional[Tensor], outlier_index: Optional[Tensor],
                          outlier_value: Optional[Tensor], float_columns: Optional[Tensor], float_axis: int,
                          scale_scale: Optional[Tensor], scale_block_size: list[int], scale_fmt: str,
                          scale_zero_point: Optional[Tensor] = None,
                          float_threshold: Optional[float] = None) -> Tensor:
        side = _ext_side(outlier_index, outlier_value, float_columns, float_axis, scale_scale, scale_block_size,
                         scale_fmt, scale_zero_point)
        _check_threshold_static(scale, float_threshold)
        if scale is None:
            _check_dynamic_ext(zero_point, codebook, side, float_threshold)
            thr = None if float_threshold is None else (float_threshold, float_axis)
            return formats.fake_quantize_dynamic_ext(x, block_size, fmt, True, float_columns=side["float_columns"],
                                                     threshold=thr).contiguous()
        return formats.fake_quantize_ext(x, scale, zero_point, block_size, fmt, codebook=codebook,
                                         **side).contiguous()

    @fake_quantize_ext.register_fake
    def _(x, scale, zero_point, block_size, fmt, codebook, outlier_index, outlier_value, float_columns,
          float_axis, scale_scale, scale_block_size, scale_fmt, scale_zero_point=None, float_threshold=None):
        _check_static(x, scale, zero_point, block_size, fmt)
        _check_threshold_static(scale, float_threshold)
        if scale_zero_point is not None and scale_scale is None:
            raise QuantizationError("a second-level zero point needs a second-level scale (scale_scale)")
        if (outlier_index is None) != (outlier_value is None):
            raise QuantizationError("sparse values need both outlier_index and outlier_value")
        if scale is None:
            _check_dynamic_ext(zero_point, codebook, _ext_side(outlier_index, outlier_value, float_columns,
                                                               float_axis, scale_scale, scale_block_size, scale_fmt),
                               float_threshold)
        return x.new_empty(x.shape)

    fake_quantize_ext.register_autograd(_ext_backward)


def _registered() -> bool:
    try:
        getattr(torch.ops.qpass, OP_NAMES[-1])
    except (AttributeError, RuntimeError):
        return False
    return True


if not _registered():
    _register()

quantize = torch.ops.qpass.quantize.default
dequantize = torch.ops.qpass.dequantize.default
fake_quantize = torch.ops.qpass.fake_quantize.default
fake_quantize_dynamic = torch.ops.qpass.fake_quantize_dynamic.default
fake_quantize_ext = torch.ops.qpass.fake_quantize_ext.default
