"""``ExtLinear``: the generic route for weight quantizers PackedLinear has no packed form for.

Any registered format (a learned codebook, a format a user or test registers) and any side channel (sparse
values, float columns, second-level scales) on a weight quantizer (``qpass::fake_quantize_ext``) lowers
here: the module stores the codes (one per element, in the codes dtype of the format), the scale, zero
point, table and side-channel tensors, and dequantizes with ``qpass.primitives.formats.dequantize_ext``
before ``F.linear``. The weight it computes is the fake-quant weight bit for bit (``fake_quantize_ext`` is
``dequantize_ext(quantize_ext(.))`` by definition); the float columns are stored as values, since the
float weight is dropped. Kernels are not measured for it (it is not a PackedLinear): one route, always.
An OliVe input quantizer (registered format ``olive<b>``, static scale) runs its encode/decode on the input here.
A dynamic input quantizer with float columns (LLM.int8()'s outlier feature dimensions) lowers here too:
``formats.fake_quantize_dynamic_ext`` on the input (the columns stay float), then the same linear, so the
float columns of input and weight meet in one float matmul (the decomposition is not split into two GEMMs).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from qpass.primitives import formats
from qpass.primitives import quant as Q


class ExtLinear(nn.Module):
    """y = linear(input_fq(x), dequantize_ext(codes, ...)[.t()], bias). Tensors are buffers (state dict)."""

    def __init__(self, *, fmt: str, block, codes: Tensor, scale: Tensor, zero_point: Tensor | None,
                 codebook: Tensor | None, outliers: tuple | None, float_columns: tuple | None,
                 scale_q: tuple | None, transpose: bool, bias: Tensor | None, act=None,
                 act_scale: Tensor | None = None, act_zero: Tensor | None = None,
                 act_float_columns: tuple | None = None, name: str = ""):
        super().__init__()
        self.fmt, self.block, self.transpose, self.act, self.name = fmt, list(block), transpose, act, name
        tensors = {"codes": codes, "scale": scale, "zero": zero_point, "codebook": codebook, "bias": bias,
                   "outlier_index": outliers[0] if outliers else None,
                   "outlier_value": outliers[1] if outliers else None,
                   "float_index": float_columns[0] if float_columns else None,
                   "float_values": float_columns[2] if float_columns else None,
                   "scale_scale": scale_q[0] if scale_q else None, "input_scale": act_scale, "input_zero": act_zero,
                   "input_float_index": act_float_columns[0] if act_float_columns else None}
        for k, v in tensors.items():
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

    def weight(self) -> Tensor:
        outliers = None if self.outlier_index is None else (self.outlier_index, self.outlier_value)
        cols = None if self.float_index is None else (self.float_index, self.float_axis, self.float_values)
        scale_q = None if self.scale_scale is None else (self.scale_scale, self.scale_block, self.scale_fmt)
        w = formats.dequantize_ext(self.codes, self.scale, self.zero, self.block, self.fmt, self.scale.dtype,
                                   codebook=self.codebook, outliers=outliers, float_columns=cols, scale_q=scale_q)
        return w.t() if self.transpose else w

    def forward(self, x: Tensor) -> Tensor:
        a = self.act
        if a is not None and self.input_float_index is not None:     # dynamic with float columns (LLM.int8())
            x = formats.fake_quantize_dynamic_ext(x, list(a.block), a.fmt, a.symmetric,
                                                  float_columns=(self.input_float_index, self.input_float_axis))
        elif a is not None and a.fmt.startswith("olive"):              # OliVe pairs (static): the emulation
            x = formats.fake_quantize_ext(x, self.input_scale, None, list(a.block), a.fmt)
        elif a is not None:
            x = Q.fake_quantize_dynamic(x, list(a.block), a.fmt, a.symmetric) if a.dynamic else \
                Q.fake_quantize(x, self.input_scale, self.input_zero, list(a.block), a.fmt)
        return F.linear(x, self.weight(), self.bias)

    def extra_repr(self) -> str:
        side = [k for k in ("outlier_index", "float_index", "scale_scale", "input_float_index")
                if getattr(self, k) is not None]
        return f"{self.name}: {self.fmt} block {self.block}, side {side or 'none'} (dequantize + matmul)"
