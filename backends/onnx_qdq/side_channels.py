"""ONNX lowering of weight quantizers with side channels: second-level scales and sparse float values (SpQR's
bilevel statistics and outliers, QuantEase's outliers, QLoRA's double quantization of int scales).

Matches   a linear whose weight quantizer is ``qpass::fake_quantize_ext`` of an integer format, per group along
          the input or per output channel, with ``scale_q`` (second-level blocks along the output axis, any
          int format, symmetric or with a zero point) and / or ``outliers``; no table, no float columns
Changes   the linear -> ``qpass_onnx::dq_matmul_side``, which exports as standard ops only:

            scale = (Cast(scale_codes) - z2) * s2        per block of `rows` output channels (Reshape, Sub, Mul)
            w     = DequantizeLinear(codes [K, N], scale, zero_point, axis 0, block_size g)
            w     = ScatterND(w, outlier (k, n) coordinates, Cast(values), reduction add)
            y     = MatMul(x, w) (- (-bias))

          The scale codes are uint8 initializers (the int formats' codes plus 2^(b-1) when symmetric), the
          second-level scale and the outlier values are stored in the graph's dtype (SpQR: fp16) and cast in the
          graph; outlier coordinates are int64 [k, 2] (ScatterND's index type).
Fused     nothing: onnxruntime's MatMulNBits takes constant scales, so the weight is dequantized at every call
          (exact, unfused; see docs/onnx.md).

The reference kernel computes the same values as ``qpass.primitives.formats.fake_quantize_ext`` of the stored
weight (codes times the effective scale, plus the sparse values), so the rewritten graph runs in torch too.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.fx import GraphModule, Node

from qpass.errors import UnsupportedOpError
from qpass.graph import LinearSite, describe, param_of
from qpass.primitives import quant as Q
from qpass.quantizer import Quantizer

SIDE = frozenset({"outliers", "scale_q"})


def _scale_from_codes(scale_codes: Tensor, s2: Tensor, z2: Tensor | None, rows: int, n: int) -> Tensor:
    """[G, Np] codes (Np = ceil(n / rows) * rows) -> [G, n] float scales, blocks of `rows` along N."""
    g, np_ = scale_codes.shape
    q = scale_codes.float().reshape(g, np_ // rows, rows)
    if z2 is not None:
        q = q - z2.float().unsqueeze(-1)
    return (q * s2.float().unsqueeze(-1)).reshape(g, np_)[:, :n]


def _register() -> None:
    @torch.library.custom_op("qpass_onnx::dq_matmul_side", mutates_args=())
    def dq_matmul_side(x: Tensor, codes: Tensor, scale: Optional[Tensor], zero_point: Optional[Tensor],
                       scale_codes: Optional[Tensor], s2: Optional[Tensor], z2: Optional[Tensor],
                       outlier_index: Optional[Tensor], outlier_value: Optional[Tensor], bias: Optional[Tensor],
                       block: int, rows: int, scale_offset: int, bits: int) -> Tensor:
        k, n = codes.shape
        if scale_codes is not None:
            scale = _scale_from_codes(scale_codes.to(torch.int32) - scale_offset, s2, z2, rows, n)
        w = codes.float()
        if zero_point is not None:
            w = w - zero_point.float().repeat_interleave(block, 0)[:k]
        w = w * scale.float().repeat_interleave(block, 0)[:k]
        if outlier_index is not None:
            w = w.index_put((outlier_index[:, 0], outlier_index[:, 1]), outlier_value.float(), accumulate=True)
        y = x @ w.to(x.dtype)
        return y if bias is None else y + bias

    @dq_matmul_side.register_fake
    def _(x, codes, scale, zero_point, scale_codes, s2, z2, outlier_index, outlier_value, bias, block, rows,
          scale_offset, bits):
        return x.new_empty((*x.shape[:-1], codes.shape[1]))


try:
    torch.ops.qpass_onnx.dq_matmul_side.default
except (AttributeError, RuntimeError):
    _register()

dq_matmul_side = torch.ops.qpass_onnx.dq_matmul_side.default


# ------------------------------------------------------------------------------------------ rewrite


def why_not(q: Quantizer) -> str | None:
    """Why this backend cannot lower the side channels of weight quantizer `q`, or None."""
    side = q.side_channels
    if q.fmt.kind != "int" or q.codebook is not None or q.dynamic:
        return f"format {q.fmt_name} with side channels (integer static weights only)"
    if set(side.names) - SIDE:
        return f"side channels {sorted(set(side.names) - SIDE)}"
    if side.scale_q is not None and Q.parse_format(side.scale_q.fmt).kind != "int":
        return f"second-level format {side.scale_q.fmt} (integer only)"
    return None


def lower_linear(r, site: LinearSite, wq: Node, x: Node) -> tuple[Node, str, str]:
    """Insert ``dq_matmul_side`` for `site` (weight quantizer `wq`, input `x` already lowered) with `r` the
    patterns._Rewriter (buffers, calls); returns (node, form, note) for the report."""
    gm, q = r.gm, Quantizer(wq)
    why = why_not(q)
    if why is not None:
        raise UnsupportedOpError(f"onnx_qdq cannot lower {why}", where=describe(gm, site.node),
                                 fix="use the torch backend (qpass.lower(qm, 'torch'))")
    t = lambda n: None if n is None else param_of(gm, n).detach()     # noqa: E731
    side, name = q.side_channels, site.weight.target
    w = _as_quantizer_sees(gm, site, q)
    scale, zp, block = t(q.scale), t(q.zero_point), list(q.block)
    sq = side.scale_q
    sq_args = None if sq is None else (t(sq.scale), list(sq.block), sq.fmt, t(sq.zero_point))
    from qpass.primitives import formats
    codes = formats.quantize_ext(w, scale, zp, block, q.fmt_name, scale_q=sq_args)
    flip = site.use_in_axis == 1                      # quantizer sees [out, in]: ONNX wants [K, N]
    canon = (lambda a: a.t()) if flip else (lambda a: a)     # noqa: E731
    codes, scale, zp, block = canon(codes), canon(scale), None if zp is None else canon(zp), block[::-1] if flip else block
    k, n = codes.shape
    b_k, b_n = block
    if b_n != 1 or b_k == 1:
        raise UnsupportedOpError(f"onnx_qdq lowers side channels on per-group (input) or per-channel weight scales; "
                                 f"this weight has block {q.block}", where=describe(gm, site.node),
                                 fix="use the torch backend")
    g = k if b_k == -1 else b_k
    args = dict(scale=scale.float(), scale_codes=None, s2=None, z2=None, rows=1, offset=0)
    if sq is not None:
        args.update(_second_level(gm, site, q, scale, flip, n))
    oi = ov = None
    if side.outliers is not None and t(side.outliers.index).numel():
        flat = t(side.outliers.index).long()
        cols = w.shape[1]
        r0, c0 = flat // cols, flat % cols                   # in the quantizer's layout
        oi = torch.stack([c0, r0], 1) if flip else torch.stack([r0, c0], 1)
        ov = t(side.outliers.value)
    node = r.call(site.node, dq_matmul_side, (
        x, r.buffer(site.node, f"{name}_codes", codes),
        None if args["scale_codes"] is not None else r.buffer(site.node, f"{name}_dq_scale", args["scale"]),
        r.buffer(site.node, f"{name}_dq_zero_point", None if zp is None else zp.to(torch.uint8)),
        r.buffer(site.node, f"{name}_scale_codes", args["scale_codes"]),
        r.buffer(site.node, f"{name}_scale_scale", args["s2"]), r.buffer(site.node, f"{name}_scale_zero", args["z2"]),
        r.buffer(site.node, f"{name}_outlier_kn", oi), r.buffer(site.node, f"{name}_outlier_value", ov),
        site.bias, g, args["rows"], args["offset"], q.fmt.bits))
    bits = q.fmt.bits
    parts = [p for p, on in (("second-level scales", sq is not None), ("outliers (ScatterND add)",
                                                                         side.outliers is not None)) if on]
    form = f"W{bits}A16: DequantizeLinear + {' + '.join(parts)} + MatMul (g{g})"
    return node, form, "side channels: scales dequantized and outliers scattered at run time (exact, unfused)"


def _as_quantizer_sees(gm: GraphModule, site: LinearSite, q: Quantizer) -> Tensor:
    w = param_of(gm, site.weight).detach()
    n, count = q.x, 0
    while n is not site.weight:
        count, n = count + 1, n.args[0]
    return w.t() if count % 2 else w


def _second_level(gm, site, q: Quantizer, scale: Tensor, flip: bool, n: int) -> dict:
    """Scale codes [G, Np] (uint8, padded to whole blocks), s2 / z2 [G, Np / rows] in the graph's dtypes."""
    sq = q.side_channels.scale_q
    s2 = param_of(gm, sq.scale).detach()
    z2 = None if sq.zero_point is None else param_of(gm, sq.zero_point).detach()
    raw = param_of(gm, q.scale).detach()
    codes2 = Q.quantize(raw, s2, z2, list(sq.block), sq.fmt)             # the quantizer's layout
    blk = list(sq.block)
    if flip:
        codes2, s2, z2, blk = codes2.t(), s2.t(), None if z2 is None else z2.t(), blk[::-1]
    if blk[0] != 1 or blk[1] < 1:
        raise UnsupportedOpError(f"onnx_qdq lowers second-level scales in blocks along the output channels; these "
                                 f"have block {tuple(sq.block)}", where=describe(gm, site.node),
                                 fix="use the torch backend")
    rows = blk[1]
    nb = s2.shape[1]
    offset = -int(Q.qrange(sq.fmt, z2 is None)[0])
    padded = torch.zeros(codes2.shape[0], nb * rows, dtype=torch.uint8)
    padded[:, :n] = (codes2.to(torch.int32) + offset).to(torch.uint8)
    return dict(scale_codes=padded, s2=s2.contiguous(), z2=None if z2 is None else z2.contiguous(), rows=rows,
                offset=offset)


# ------------------------------------------------------------------------------------------ export


def translation_table() -> dict:
    """{op: onnxscript function} for torch.onnx.export (imports onnxscript)."""
    import numpy as np
    import onnx_ir as ir
    from onnxscript import opset21 as op

    from .translations import _const, _container

    FLOAT = ir.DataType.FLOAT

    def dq_matmul_side(x, codes, scale=None, zero_point=None, scale_codes=None, s2=None, z2=None,
                       outlier_index=None, outlier_value=None, bias=None, block: int = 0, rows: int = 1,
                       scale_offset: int = 0, bits: int = 8):
        if scale_codes is not None:
            q = op.Cast(scale_codes, to=FLOAT)
            g_np = op.Shape(q)
            q = op.Reshape(q, op.Concat(op.Shape(q, end=1), _const([-1, rows], np.int64), axis=0))
            if scale_offset:
                q = op.Sub(q, _const(float(scale_offset), np.float32))
            if z2 is not None:
                q = op.Sub(q, op.Unsqueeze(op.Cast(z2, to=FLOAT), _const([-1], np.int64)))
            sc = op.Reshape(op.Mul(q, op.Unsqueeze(op.Cast(s2, to=FLOAT), _const([-1], np.int64))), g_np)
            n = op.Shape(codes, start=1, end=2)
            scale = op.Slice(sc, _const([0], np.int64), n, _const([1], np.int64))
        signed = codes.dtype == ir.DataType.INT8
        if bits <= 4:
            codes = op.Cast(codes, to=_container(bits, signed))
            zero_point = None if zero_point is None else op.Cast(zero_point, to=_container(bits, signed))
        w = op.DequantizeLinear(codes, scale, zero_point, axis=0, block_size=block)
        if outlier_index is not None:
            w = op.ScatterND(w, outlier_index, op.Cast(outlier_value, to=FLOAT), reduction="add")
        y = op.MatMul(x, w)
        return y if bias is None else op.Sub(y, op.Neg(bias))

    return {OP: dq_matmul_side}


OP = dq_matmul_side


__all__ = ["dq_matmul_side", "lower_linear", "why_not", "translation_table", "SIDE"]
