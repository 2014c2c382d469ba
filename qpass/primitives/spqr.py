"""SpQR numerics (Dettmers, Svirschevski, Egiazarian et al. 2024): GPTQ with tiny groups, quantized group
statistics and unstructured float outliers. Pure tensors, no graphs.

Layout as in ``qpass.primitives.gptq``: a weight in canonical ``[out, in]`` layout, groups of ``group_size``
contiguous input columns (in the original column order, so the graph's quantizer block ``(1, g)`` holds them;
with ``act_order`` the sweep visits columns by decreasing ``diag H`` and a group's statistics are computed
when the sweep first reaches one of its columns, from the weights as updated so far, as GPTQ's act-order does).

Per group (the reference's ``spqr_engine.py``):
1. **Outlier-aware statistics.** For every weight of the group, the leave-one-out reduction of the group's
   GPTQ error ``sum_j ((w_j - q(w_j)) / d_j)^2`` (``d = diag(U)``, U the upper Cholesky factor of ``H^-1``)
   when that weight is left out of the min-max fit (:func:`loo_error_reduction`); weights whose reduction
   exceeds the threshold are replaced by the row mean of the others before the asymmetric min-max fit.
2. **Bilevel statistics.** The group's scales (one per output row) are quantized to ``scale_bits`` with
   min-max in second-level groups of ``scale_group`` rows; the second-level scale is stored in fp16 and its
   zero point as an int16 (:func:`second_level`). The weights are quantized with the *quantized* scales.
3. **Outliers.** Column by column, a weight whose GPTQ error ``((w - q(w)) / d)^2`` exceeds the threshold is
   kept in float (fp16) and feeds back no error; the others are quantized and their error fed forward.

The threshold is relative, as the reference's ``--outlier_threshold``: ``tau * mean_j(var_i(W_ij) / d_j^2)``.

Deviations from the reference, and why:
* The first-level zero point stays an integer of the weight's width (``[0, 2^b-1]``), not a float zero
  quantized to 3 bits: it is the graph's int zero point, and costs b/g bits (3-bit: the same as the
  reference's 3-bit zeros without their second-level statistics).
* Asymmetric ranges include 0 (qpass's min-max: ``[min(w, 0), max(w, 0)]``), so a zeroed weight is exact:
  an outlier's dense code is the zero point and its float value is added after dequantization.
* Second-level zero points are integers, and rounded towards a higher lowest level (``z2 = -ceil(min/s2)``)
  so no quantized scale is ever 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from qpass.errors import QuantizationError
from qpass.primitives.gptq import hessian_inverse_factor
from qpass.primitives.quant import SCALE_FLOOR, fake_quantize

FP16_MIN_NORMAL = 2.0 ** -14


@dataclass
class SpqrResult:
    weight: Tensor                  # the dense grid values, [out, in]; 0 at outliers (their code is the zero point)
    scale: Tensor                   # first-level scales [out, n_groups], float32 (before the second level)
    zero_point: Tensor              # [out, n_groups] int32, in [0, 2^bits - 1]
    scale_scale: Tensor             # second-level scales [ceil(out / scale_group), n_groups], float16
    scale_zero: Tensor              # second-level zero points, same shape, int16
    outlier_index: Tensor           # int64 flat indices into [out, in] (row-major), ascending
    outlier_value: Tensor           # float16 values there (the weight kept in float)
    damp: float
    threshold: float                # the absolute threshold used (inf: no outliers)

    @property
    def outliers(self) -> int:
        return self.outlier_index.numel()

    def dense(self) -> Tensor:
        """The layer's weight: grid values plus the outliers, [out, in] float32."""
        w = self.weight.float().reshape(-1).clone()
        w[self.outlier_index] += self.outlier_value.float()
        return w.reshape(self.weight.shape)


def minmax_qparams(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Asymmetric min-max scale and integer zero point over the last dim (range widened to include 0), as
    ``qpass.primitives.quant`` computes them for ``int{bits}`` with ``symmetric: false``."""
    maxq = 2 ** bits - 1
    lo, hi = x.amin(-1).clamp(max=0), x.amax(-1).clamp(min=0)
    s = ((hi - lo) / maxq).clamp(min=SCALE_FLOOR)
    z = (-lo / s).round().clamp(0, maxq)
    return s, z


def loo_error_reduction(g: Tensor, d: Tensor, bits: int) -> Tensor:
    """``[out, k]``: how much the group's error ``sum_j ((w_j - q(w_j)) / d_j)^2`` drops when weight j is left
    out of the min-max fit (and not quantized); `g` the group's columns ``[out, k]``, `d` their ``diag(U)``."""
    k, maxq = g.shape[1], 2 ** bits - 1

    def err(x: Tensor, dd: Tensor) -> Tensor:
        s, z = minmax_qparams(x, bits)
        s, z = s.unsqueeze(-1), z.unsqueeze(-1)
        rec = ((x / s).round() + z).clamp(0, maxq).sub(z).mul(s)
        return ((rec - x) / dd).square().sum(-1)

    base = err(g, d)                                                     # [out]
    if k == 1:
        return base[:, None].clone()
    idx = torch.arange(k)
    loo = idx[1:] - (idx[:, None] >= idx[1:]).long()                     # [k, k-1]: all columns but j
    return base[:, None] - err(g[:, loo], d[loo])                        # [out, k]


def second_level(s: Tensor, bits: int, rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize one group column of scales `s` ([out]) to `bits` with min-max in blocks of `rows` rows:
    (effective scales [out] float32, second-level scale [ceil(out/rows)] float16, zero point int16). The
    lowest level is at or above each block's minimum, so every effective scale is positive."""
    out_f, maxq = s.shape[0], 2 ** bits - 1
    nb = -(-out_f // rows)
    pad = torch.nn.functional.pad(s, (0, nb * rows - out_f), value=float("nan")).reshape(nb, rows)
    mn = torch.where(pad.isnan(), torch.inf, pad).amin(-1)
    mx = torch.where(pad.isnan(), -torch.inf, pad).amax(-1)
    s2 = torch.maximum((mx - mn) / maxq, mx / (maxq * 1024)).clamp(min=FP16_MIN_NORMAL).half()
    z2 = -torch.ceil(mn / s2.float()).clamp(max=32767)
    eff = fake_quantize(s[:, None], s2.float()[:, None], z2.to(torch.int32)[:, None], [rows, 1], f"int{bits}")
    return eff[:, 0], s2, z2.to(torch.int16)


def relative_threshold(w: Tensor, d: Tensor, tau: float) -> float:
    """The reference's absolute threshold: ``tau * mean_j(var_i(W_ij) / d_j^2)``."""
    if not math.isfinite(tau):
        return math.inf
    return tau * float((w.var(dim=0) / d.square()).mean())


def spqr_quantize(w: Tensor, h: Tensor, *, bits: int, group_size: int = 16, scale_bits: int = 3,
                  scale_group: int = 16, tau: float = 0.2, percdamp: float = 0.01, act_order: bool = True,
                  block_size: int = 128, max_outliers: int | None = None) -> SpqrResult:
    """SpQR of ``w`` ([out, in]) given the input Hessian ``h`` (see the module doc). ``tau = inf``: no
    outliers (GPTQ at ``group_size`` with quantized statistics). `max_outliers`: once that many are kept, the
    column loop keeps no more (in a column that would pass it, those of largest error are kept)."""
    out_f, in_f = w.shape
    if h.shape != (in_f, in_f):
        raise QuantizationError(f"Hessian of shape {tuple(h.shape)} does not fit a weight of shape {tuple(w.shape)}")
    W = w.detach().float().clone()
    H = h.detach().double().clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else torch.arange(in_f)
    W, H = W[:, perm], H[perm[:, None], perm[None, :]]
    U, damp = hessian_inverse_factor(H, percdamp)
    del H
    U = U.float()
    d = torch.diagonal(U).clone()
    thr = relative_threshold(W, d, tau)
    n_groups = -(-in_f // group_size)
    stats = _Stats(out_f, n_groups, bits, scale_bits, scale_group)
    col_group = (perm // group_size).tolist()
    positions: dict[int, list[int]] = {}
    for p, b in enumerate(col_group):
        positions.setdefault(b, []).append(p)
    cuts = sorted(set(range(0, in_f, block_size)) | {ps[0] for ps in positions.values()}) + [in_f]
    Q = torch.zeros_like(W)
    out_mask = torch.zeros_like(W, dtype=torch.bool)
    room = W.numel() if max_outliers is None else max_outliers
    for i1, i2 in zip(cuts[:-1], cuts[1:]):
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            b = col_group[i1 + i]
            if not stats.ready[b]:    # i == 0 (a cut): W[:, i1:] holds every update so far
                ps = positions[b]
                stats.fit(b, W[:, ps], d[ps], thr)
            col = W1[:, i]
            q = stats.quantize(b, col)
            err = (col - q) / U1[i, i]
            if math.isfinite(thr):
                is_out = err.square() > thr
                n_out = int(is_out.sum())
                if n_out > room:
                    top = torch.where(is_out, err.square(), -1.0).topk(room).indices
                    is_out = torch.zeros_like(is_out).index_fill_(0, top, True)
                    n_out = room
                room -= n_out
                q = torch.where(is_out, col.half().float(), q)
                err = (col - q) / U1[i, i]
                out_mask[:, i1 + i] = is_out
            Q[:, i1 + i] = q
            W1[:, i:] -= err[:, None] @ U1[i:i + 1, i:]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    inv = torch.argsort(perm)
    Q, out_mask = Q[:, inv], out_mask[:, inv]
    index = out_mask.reshape(-1).nonzero()[:, 0]
    value = Q.reshape(-1)[index].half()
    Q = Q.reshape(-1).index_fill(0, index, 0.0).reshape(Q.shape)
    return SpqrResult(Q.to(w.dtype), stats.scale, stats.zero.to(torch.int32), stats.s2, stats.z2, index, value,
                      damp, thr)


class _Stats:
    """First-level scales / zeros and their second-level quantization, filled one group at a time."""

    def __init__(self, out_f: int, n_groups: int, bits: int, scale_bits: int, rows: int):
        self.bits, self.scale_bits, self.rows = bits, scale_bits, rows
        self.scale = torch.ones(out_f, n_groups)
        self.eff = torch.ones(out_f, n_groups)
        self.zero = torch.zeros(out_f, n_groups)
        self.s2 = torch.ones(-(-out_f // rows), n_groups, dtype=torch.float16)
        self.z2 = torch.zeros(-(-out_f // rows), n_groups, dtype=torch.int16)
        self.ready = [False] * n_groups

    def fit(self, b: int, g: Tensor, d: Tensor, thr: float) -> None:
        if math.isfinite(thr):
            likely = loo_error_reduction(g, d, self.bits) > thr
            keep = (~likely).float()
            mean = (g * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp(min=1)
            g = torch.where(likely, mean, g)
        s, _ = minmax_qparams(g, self.bits)
        eff, self.s2[:, b], self.z2[:, b] = second_level(s, self.scale_bits, self.rows)
        # the zero point follows the quantized scale (the range [min(g, 0), max(g, 0)] on the grid of `eff`)
        self.zero[:, b] = (-g.amin(-1).clamp(max=0) / eff).round().clamp(0, 2 ** self.bits - 1)
        self.scale[:, b], self.eff[:, b] = s, eff
        self.ready[b] = True

    def quantize(self, b: int, col: Tensor) -> Tensor:
        return fake_quantize(col[:, None], self.eff[:, b:b + 1], self.zero[:, b:b + 1].to(torch.int32), [1, 1],
                             f"int{self.bits}")[:, 0]


__all__ = ["SpqrResult", "spqr_quantize", "loo_error_reduction", "second_level", "minmax_qparams",
           "relative_threshold"]
