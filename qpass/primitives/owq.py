"""OWQ numerics (Lee et al., AAAI 2024): weak-column sensitivity, the column count a bit budget allows, and
RTN or GPTQ of a weight whose weak columns stay in float. Pure tensors, no graphs.

Layout as ``qpass.primitives.gptq``: a weight in canonical ``[out, in]`` layout, a canonical quantizer block
``(rows, cols)``; "columns" are input columns (axis 1).

* Sensitivity of input column j (the paper's eq. and the reference's ``hessian_sorting(frob_norm=...)``):
  ``s_j = H_jj * ||W[:, j] - Q(W)[:, j]||^2`` with ``H = 2 X X^T`` and ``Q`` round-to-nearest of the weight spec.
* The weak columns are the top-k by ``s``. They are kept in float; the others are quantized with scales from
  the quantized columns only (a weak column never widens its row's or group's grid).
* GPTQ (``owq_gptq``), as the reference ``GPTQ_OWQ.fasterquant``: the columns are reordered so that the weak
  ones come last, the column loop quantizes the others (in their natural order, or by decreasing ``H_jj`` with
  act-order) and feeds every error forward, so the weak columns receive all updates and are stored updated.
  Groups stay contiguous in the original column order (the graph's quantizer has no ``g_idx``): a group's
  scale comes from its quantized columns. With no weak column this is ``gptq_quantize`` exactly.
* Truncation search (``clip``, the reference's ``--tuning mse``: GPTQ's ``Quantizer(mse=True)`` with its norm 2.4,
  grid 100 and max shrink 0.8): each row's (group's) min-max range is shrunk by the ratio p = 1 - i/100,
  i < 80, that minimises ``sum |q(w) - w|^2.4`` over the quantized columns (ties: the larger p; p = 1 is min-max),
  for RTN and for every group the GPTQ column loop reaches (from its error-updated columns).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from qpass.primitives.gptq import CLIP_GRID, CLIP_MAX_SHRINK, CLIP_NORM, clipped_qparams  # noqa: F401  (re-exported)
from qpass.primitives.gptq import GptqResult, _ColumnQParams, _sweep, hessian_inverse_factor
from qpass.primitives.quant import blocks, choose_qparams, fake_quantize, scale_shape
from qpass.primitives.spec import QSpec

FLOAT_BITS = 16          # a float column element, as stored by the OWQ kernel (fp16)
INDEX_BITS = 32          # one int32 index per float column


def column_sensitivity(w: Tensor, h_diag: Tensor, spec: QSpec, block) -> Tensor:
    """``H_jj * ||W[:, j] - rtn(W)[:, j]||^2`` per input column (float64), rtn with `spec` and `block`."""
    s, z = choose_qparams(w, spec, block_size=block)
    err = (w.double() - fake_quantize(w, s, z, list(block), spec.format.name).double()).pow(2).sum(0)
    return h_diag.double() * err


def weak_columns(sensitivity: Tensor, k: int) -> Tensor:
    """The `k` most sensitive columns, ascending, int64 (ties: the lower index)."""
    order = torch.argsort(sensitivity, descending=True, stable=True)[:k]
    return order.sort().values.to(torch.int64)


def base_bits(shape: tuple[int, int], spec: QSpec, block) -> float:
    """Bits of a weight quantized with `spec` (codes, fp16 scales, zero points at code width), no float column."""
    out_f, in_f = shape
    n_scales = math.prod(scale_shape((out_f, in_f), tuple(block)))
    zp = spec.bits if not spec.symmetric and spec.format.kind == "int" else 0
    return out_f * in_f * spec.bits + n_scales * (16 + zp)


def columns_for_bits(shape: tuple[int, int], spec: QSpec, block, target_bits: float) -> int:
    """The most float columns a weight of `shape` may keep within `target_bits` per weight on average (codes
    for every element, scales, zero points, and per float column its fp16 values and an int32 index)."""
    out_f, in_f = shape
    spare = target_bits * out_f * in_f - base_bits(shape, spec, block)
    return max(0, min(in_f, math.floor(spare / (out_f * FLOAT_BITS + INDEX_BITS))))


def owq_rtn_qparams(w: Tensor, spec: QSpec, block, cols: Tensor, *,
                    clip: bool = False) -> tuple[Tensor, Tensor | None]:
    """Round-to-nearest scale and zero point of `w` from its non-weak columns (min-max ranges include 0, so a
    zeroed column does not change them); `clip`: with the truncation search."""
    x = w.index_fill(1, cols, 0.0)
    return clipped_qparams(x, spec, block) if clip else choose_qparams(x, spec, block_size=tuple(block))


class _KeepFloat(_ColumnQParams):
    """Column quantizer parameters plus one extra column block, the weak columns, 'quantized' as themselves."""

    def __init__(self, *args, clip: bool = False):
        super().__init__(*args)
        self.ready.append(True)
        self.float_block = len(self.ready) - 1
        self.clip = clip

    def compute(self, b: int, cols: Tensor) -> None:
        if not self.clip:
            return super().compute(b, cols)
        s, z = clipped_qparams(cols, self.spec, self.row_block)
        self.scale[:, b:b + 1] = s
        if self.zero_point is not None:
            self.zero_point[:, b:b + 1] = z
        self.ready[b] = True

    def quantize(self, b: int, col: Tensor) -> Tensor:
        return col.clone() if b == self.float_block else super().quantize(b, col)


def owq_gptq(w: Tensor, h: Tensor, spec: QSpec, cols: Tensor, *, block: tuple[int, int] | None = None,
             percdamp: float = 0.01, block_size: int = 128, act_order: bool = False,
             clip: bool = False) -> GptqResult:
    """GPTQ of `w` ([out, in]) with input Hessian `h` that keeps columns `cols` in float (see the module doc;
    `clip`: each group's scale from the truncation search).
    ``result.weight`` holds the quantized columns on the grid and the weak columns as updated floats."""
    out_f, in_f = w.shape
    block = tuple(spec.block_size(w.shape) if block is None else block)
    dtype = torch.promote_types(w.dtype, torch.float32)
    W, H = w.detach().to(dtype).clone(), h.detach().double().clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    width = in_f if block[1] == -1 else min(block[1], in_f)
    n_blocks = -(-in_f // width)
    qp = _KeepFloat(spec, block, scale_shape((out_f, in_f), block), n_blocks, width, W.device, clip=clip)
    weak = torch.zeros(in_f, dtype=torch.bool, device=W.device)
    weak[cols.long()] = True
    rest = torch.arange(in_f, device=W.device)[~weak]
    if act_order:
        rest = rest[torch.argsort(torch.diagonal(H)[rest], descending=True, stable=True)]
    order = torch.cat([rest, cols.long().to(W.device)])                    # the weak columns last
    n_rest = rest.numel()
    col_block = [b if p < n_rest else qp.float_block for p, b in enumerate((order // width).tolist())]
    W, H = W[:, order], H[order[:, None], order[None, :]]
    U, damp = hessian_inverse_factor(H, percdamp)
    del H
    Q = _sweep(W, U.to(dtype), qp, col_block, block_size, lazy_groups=width > 1)
    Q = Q[:, torch.argsort(order)]
    perm = None if not act_order and not cols.numel() else order
    return GptqResult(Q.to(w.dtype), qp.scale, qp.zero_point, damp, perm)


__all__ = ["column_sensitivity", "weak_columns", "base_bits", "columns_for_bits", "owq_rtn_qparams", "owq_gptq",
           "clipped_qparams", "FLOAT_BITS", "INDEX_BITS", "CLIP_GRID", "CLIP_MAX_SHRINK", "CLIP_NORM"]
