"""SqueezeLLM's numerics (Kim et al., ICML 2024): sensitivity-weighted k-means per output row, dense-and-sparse.

    weighted_kmeans(w [N, K], f [N, K], 2^b)          -> centroids [N, 2^b]: Lloyd's iterations on
                                                         sum_k f_k (w_k - c(w_k))^2, each row independently
    sparse_mask(w, f, outliers, sensitive)            -> bool [N, K]: the largest |w| (fraction `outliers`) and
                                                         the largest f among the rest (fraction `sensitive`)
    squeezellm_quantize(w, f, bits, ...)              -> SqueezeLlmResult: fp16 scale [N, 1] (row absmax), fp16
                                                         table [N, 1, 2^b] in code units, sparse (index, value)

Two starts per row, both deterministic: the weighted quantiles of the row (k-means' usual 1-D start) and the
symmetric uniform grid of the same bit width (round to nearest's levels, absmax / (2^(b-1) - 1) apart). Lloyd's
iterations never increase the objective, so the row keeps the better of the two results: the weighted error is
never above the uniform grid's (the property tests check this). Values in the sparse set get weight 0 (they do
not pull centroids, so the dense range shrinks, as in the paper) and are stored as the fp16 residual
``w - table[code] * scale`` added after decoding (formats: sparse values). Tables and scales are rounded to fp16
(what the bit accounting counts and what the packed kernels store); the codes are the nearest entries of the
rounded table. Never imports torch.fx.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .formats import nearest


def _objective(w: Tensor, f: Tensor, c: Tensor) -> Tensor:
    """Per-row sum f (w - nearest centroid)^2."""
    q = c.gather(1, nearest(w, c.unsqueeze(1)))
    return (f * (w - q) ** 2).sum(1)


def _lloyd(w: Tensor, f: Tensor, c: Tensor, iters: int) -> Tensor:
    n, t = c.shape
    for _ in range(iters):
        a = nearest(w, c.unsqueeze(1))                                    # [N, K]
        num = torch.zeros(n, t, dtype=w.dtype).scatter_add_(1, a, f * w)
        den = torch.zeros(n, t, dtype=w.dtype).scatter_add_(1, a, f)
        new = torch.where(den > 0, num / den.clamp(min=torch.finfo(w.dtype).tiny), c)   # empty cluster: kept
        new, _ = new.sort(1)
        if torch.equal(new, c):
            break
        c = new
    return c


def quantile_init(w: Tensor, f: Tensor, t: int) -> Tensor:
    """Weighted quantiles of each row at (i + 1/2) / t (f + a tiny floor, so an all-zero row still spreads)."""
    order = w.argsort(1)
    ws, fs = w.gather(1, order), f.gather(1, order) + 1e-12
    cdf = fs.cumsum(1) / fs.sum(1, keepdim=True)
    probs = (torch.arange(t, dtype=w.dtype) + 0.5) / t
    idx = torch.searchsorted(cdf.contiguous(), probs.expand(w.shape[0], t).contiguous()).clamp(max=w.shape[1] - 1)
    return ws.gather(1, idx)


def uniform_init(w: Tensor, t: int) -> Tensor:
    """The symmetric uniform grid with t levels: step absmax / (t/2 - 1), levels -t/2 .. t/2 - 1 (int RTN's)."""
    half = max(t // 2 - 1, 1)
    step = w.abs().amax(1, keepdim=True).clamp(min=1e-12) / half
    return step * torch.arange(-(t // 2), t - t // 2, dtype=w.dtype)


CHUNK_ELEMENTS = 1 << 23      # rows at a time: [rows, K, t] distances stay under 64 MB of float64


def weighted_kmeans(w: Tensor, f: Tensor, t: int, iters: int = 50) -> Tensor:
    """Centroids [N, t] (sorted) minimising sum f (w - c)^2 per row; the better of two deterministic starts."""
    rows = max(1, CHUNK_ELEMENTS // max(w.shape[1] * t, 1))
    return torch.cat([_kmeans_rows(w[i:i + rows], f[i:i + rows], t, iters) for i in range(0, w.shape[0], rows)])


def _kmeans_rows(w: Tensor, f: Tensor, t: int, iters: int) -> Tensor:
    w, f = w.double(), f.double()
    best = None
    for init in (quantile_init(w, f, t), uniform_init(w, t)):
        c = _lloyd(w, f, init.sort(1).values, iters)
        err = _objective(w, f, c)
        best = (c, err) if best is None else (torch.where((err < best[1]).unsqueeze(1), c, best[0]),
                                              torch.minimum(err, best[1]))
    return best[0]


def sparse_mask(w: Tensor, f: Tensor, outliers: float, sensitive: float) -> Tensor:
    """Elements kept in float: the round(outliers * numel) largest |w| of the tensor, then the
    round(sensitive * numel) largest f among the others."""
    mask = torch.zeros(w.numel(), dtype=torch.bool)
    n_out, n_sen = round(outliers * w.numel()), round(sensitive * w.numel())
    if n_out:
        mask[w.abs().reshape(-1).topk(n_out).indices] = True
    if n_sen:
        score = f.reshape(-1).double().masked_fill(mask, -1.0)
        mask[score.topk(n_sen).indices] = True
    return mask.reshape(w.shape)


@dataclass(frozen=True)
class SqueezeLlmResult:
    scale: Tensor                 # fp16 [N, 1]
    table: Tensor                 # fp16 [N, 1, 2^b], code units
    index: Tensor                 # int64 flat indices into [N, K] (sorted)
    value: Tensor                 # fp16 residuals
    weighted_error: float         # sum f (w - w_hat)^2 over the dense part (after fp16 rounding)


def squeezellm_quantize(w: Tensor, f: Tensor, bits: int, *, outliers: float = 0.0, sensitive: float = 0.0,
                        iters: int = 50) -> SqueezeLlmResult:
    """Quantize [N, K] weight `w` with sensitivities `f` (same shape, >= 0) as SqueezeLLM (see the module doc)."""
    from .formats import fake_quantize_ext

    t = 2 ** bits
    w32 = w.detach().float()
    keep = sparse_mask(w32, f, outliers, sensitive)
    dense = w32.masked_fill(keep, 0.0)
    fd = f.double().masked_fill(keep, 0.0)
    c = weighted_kmeans(dense, fd, t, iters)
    scale = dense.abs().amax(1, keepdim=True).clamp(min=1e-6).half()
    table = (c / scale.double()).half().unsqueeze(1)                        # [N, 1, T]
    base = fake_quantize_ext(w32, scale.float(), None, (1, -1), f"codebook{bits}", codebook=table.float())
    idx = keep.reshape(-1).nonzero().reshape(-1)
    value = (w32 - base).reshape(-1)[idx].half()
    err = float((fd * (dense.double() - base.double()) ** 2).masked_fill(keep, 0.0).sum())
    return SqueezeLlmResult(scale, table, idx, value, err)


__all__ = ["weighted_kmeans", "quantile_init", "uniform_init", "sparse_mask", "squeezellm_quantize",
           "SqueezeLlmResult"]
