"""``ExtLinear``: the generic route for weight quantizers PackedLinear has no packed form for.

Any registered format (a learned codebook, a format a user or test registers) and any side channel (sparse
values, float columns, second-level scales) on a weight quantizer (``qpass::fake_quantize_ext``) lowers
here: the module stores the codes (one per element, in the codes dtype of the format), the scale, zero
point, table and side-channel tensors, and dequantizes with ``qpass.primitives.formats.dequantize_ext``
before ``F.linear``. The weight it computes is the fake-quant weight bit for bit (``fake_quantize_ext`` is
``dequantize_ext(quantize_ext(.))`` by definition); the float columns are stored as values, since the
float weight is dropped. Kernels are not measured for it (it is not a PackedLinear): one route, always.
Storage is compact where the format says how (:class:`_Packed`, shapes and dtypes from the graph, never from the
data, so a saved model loads into the same buffers): integer codes and zero points as bit planes at the
format's width, a scale with second-level quantization as its codes at the second level's width (its fp16
scale and int16 zero point as the graph holds them), outlier indices as int32, outlier values in the graph's
dtype (SpQR: fp16).
An OliVe input quantizer (registered format ``olive<b>``, static scale) runs its encode/decode on the input here.
A dynamic input quantizer with float columns (LLM.int8()'s outlier feature dimensions) lowers here too:
``formats.fake_quantize_dynamic_ext`` on the input (the columns stay float), then the same linear, so the
float columns of input and weight meet in one float matmul (the decomposition is not split into two GEMMs).
An input quantizer with threshold columns (the set found per call) in front of a weight that needs this route
(a format PackedLinear has no packed form for) runs ``formats.fake_quantize_dynamic_ext`` the same way; in
front of a plain int8 weight it is PackedLinear's (linear.py: int8 GEMM plus the float columns).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from qpass.primitives import formats
from qpass.primitives import quant as Q

from .packing import pack_bitplanes, unpack_bitplanes


class _Packed:
    """Integer codes of an int format (``fmt``, symmetric or not) stored as bit planes of ``code - lo``: any
    shape, flattened to one row. ``pack`` -> uint8 ``[bits, 1, ceil(numel / 8)]``; ``unpack`` inverts it."""

    def __init__(self, fmt: str, symmetric: bool, shape, dtype: torch.dtype):
        self.bits = Q.parse_format(fmt).bits
        self.lo, self.hi = (int(v) for v in Q.qrange(fmt, symmetric))
        self.shape, self.dtype = tuple(shape), dtype

    @staticmethod
    def applies(fmt: str, t: Tensor | None) -> bool:
        return t is not None and not t.is_floating_point() and Q.parse_format(fmt).kind == "int"

    def pack(self, t: Tensor, what: str) -> Tensor:
        if t.numel() and (int(t.min()) < self.lo or int(t.max()) > self.hi):
            raise ValueError(f"ExtLinear: {what} outside [{self.lo}, {self.hi}] cannot be stored in {self.bits} bits")
        return pack_bitplanes((t.reshape(1, -1).to(torch.int32) - self.lo).to(torch.uint8), self.bits)

    def unpack(self, planes: Tensor) -> Tensor:
        n = int(torch.Size(self.shape).numel())
        return (unpack_bitplanes(planes, self.bits, n).to(torch.int32) + self.lo).reshape(self.shape).to(self.dtype)


class ExtLinear(nn.Module):
    """y = linear(input_fq(x), dequantize_ext(codes, ...)[.t()], bias). Tensors are buffers (state dict)."""

    def __init__(self, *, fmt: str, block, codes: Tensor, scale: Tensor, zero_point: Tensor | None,
                 codebook: Tensor | None, outliers: tuple | None, float_columns: tuple | None,
                 scale_q: tuple | None, transpose: bool, bias: Tensor | None, act=None,
                 act_scale: Tensor | None = None, act_zero: Tensor | None = None,
                 act_float_columns: tuple | None = None, name: str = ""):
        super().__init__()
        self.fmt, self.block, self.transpose, self.act, self.name = fmt, list(block), transpose, act, name
        self.packed: dict[str, _Packed] = {}
        symmetric = zero_point is None
        if _Packed.applies(fmt, codes):
            self.packed["codes"] = _Packed(fmt, symmetric, codes.shape, codes.dtype)
            if zero_point is not None:
                self.packed["zero"] = _Packed(fmt, False, zero_point.shape, zero_point.dtype)
        if scale_q is not None and Q.parse_format(scale_q[2]).kind == "int":    # the scale's own codes
            z2 = scale_q[3] if len(scale_q) > 3 else None
            codes2 = Q.quantize(scale, scale_q[0], z2, list(scale_q[1]), scale_q[2])
            self.packed["scale"] = _Packed(scale_q[2], z2 is None, scale.shape, codes2.dtype)
            self.scale_dtype, scale = scale.dtype, codes2
        tensors = {"codes": codes, "scale": scale, "zero": zero_point, "codebook": codebook, "bias": bias,
                   "outlier_index": outliers[0].to(torch.int32) if outliers and outliers[0].numel() < 2 ** 31
                   else outliers[0] if outliers else None,
                   "outlier_value": outliers[1] if outliers else None,
                   "float_index": float_columns[0] if float_columns else None,
                   "float_values": float_columns[2] if float_columns else None,
                   "scale_scale": scale_q[0] if scale_q else None,
                   "scale_zero": scale_q[3] if scale_q and len(scale_q) > 3 else None,
                   "input_scale": act_scale, "input_zero": act_zero,
                   "input_float_index": act_float_columns[0] if act_float_columns else None}
        for k, v in tensors.items():
            if v is not None and k in self.packed:
                v = self.packed[k].pack(v, k)
            self.register_buffer(k, None if v is None else v.detach().clone())
        self.float_axis = float_columns[1] if float_columns else -1
        self.input_float_axis = act_float_columns[1] if act_float_columns else -1
        self.scale_block, self.scale_fmt = (list(scale_q[1]), scale_q[2]) if scale_q else ([], "")

    @classmethod
    def from_weight(cls, w: Tensor, *, scale, zero_point, block, fmt, codebook=None, outliers=None,
                    float_columns=None, scale_q=None, **kw) -> "ExtLinear":
        """Quantize `w` (laid out as the quantizer sees it) as fake_quantize_ext does. float_columns: (index, axis)."""
        codes = formats.quantize_ext(w, scale, zero_point, block, fmt, codebook=codebook, scale_q=scale_q)
        cols = None
        if float_columns is not None:
            index, axis = float_columns
            cols = (index, axis, w.index_select(axis % w.dim(), index.long()))
        return cls(fmt=fmt, block=block, codes=codes, scale=scale, zero_point=zero_point, codebook=codebook,
                   outliers=outliers, float_columns=cols, scale_q=scale_q, **kw)

    def _unpacked(self, k: str) -> Tensor | None:
        t = getattr(self, k)
        return self.packed[k].unpack(t) if t is not None and k in self.packed else t

    def weight(self) -> Tensor:
        outliers = None if self.outlier_index is None else (self.outlier_index, self.outlier_value)
        cols = None if self.float_index is None else (self.float_index, self.float_axis, self.float_values)
        scale, scale_q = self._unpacked("scale"), None
        if "scale" in self.packed:         # the effective scale from its codes (fake_quantize's values exactly)
            scale = Q.dequantize(scale, self.scale_scale, self.scale_zero, self.scale_block, self.scale_fmt,
                                 self.scale_dtype)
        elif self.scale_scale is not None:
            scale_q = (self.scale_scale, self.scale_block, self.scale_fmt, self.scale_zero)
        w = formats.dequantize_ext(self._unpacked("codes"), scale, self._unpacked("zero"), self.block, self.fmt,
                                   scale.dtype, codebook=self.codebook, outliers=outliers, float_columns=cols,
                                   scale_q=scale_q)
        return w.t() if self.transpose else w

    def forward(self, x: Tensor) -> Tensor:
        a = self.act
        if a is not None and self.input_float_index is not None:     # dynamic with float columns (LLM.int8())
            x = formats.fake_quantize_dynamic_ext(x, list(a.block), a.fmt, a.symmetric,
                                                  float_columns=(self.input_float_index, self.input_float_axis))
        elif a is not None and a.threshold is not None:                # the float features found per call
            x = formats.fake_quantize_dynamic_ext(x, list(a.block), a.fmt, a.symmetric, threshold=(a.threshold, -1))
        elif a is not None and a.fmt.startswith("olive"):              # OliVe pairs (static): the emulation
            x = formats.fake_quantize_ext(x, self.input_scale, None, list(a.block), a.fmt)
        elif a is not None:
            x = Q.fake_quantize_dynamic(x, list(a.block), a.fmt, a.symmetric, a.clip_ratio) if a.dynamic else \
                Q.fake_quantize(x, self.input_scale, self.input_zero, list(a.block), a.fmt)
        return F.linear(x, self.weight(), self.bias)

    def extra_repr(self) -> str:
        side = [k for k in ("outlier_index", "float_index", "scale_scale", "input_float_index")
                if getattr(self, k) is not None]
        return f"{self.name}: {self.fmt} block {self.block}, side {side or 'none'} (dequantize + matmul)"
