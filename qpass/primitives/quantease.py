"""QuantEase numerics (Behdin et al. 2023): cyclic coordinate descent on the layer objective. Pure tensors.

The objective is GPTQ's, ``f(Q) = tr((W - Q) S (W - Q)^T)`` with ``S = H`` the input Hessian ([in, in]) and Q
on a *fixed* grid (the scale / zero point of the quantizer, canonical ``[out, in]`` layout and block as in
``qpass.primitives.gptq``). One coordinate step minimises f over one column of Q with the others fixed::

    Q[:, j] <- grid( Q[:, j] + G[:, j] / S[j, j] ),    G = (W - Q) S

which is the exact minimiser on the grid (the 1-D objective is a parabola in each entry, and rows are
independent), so f never increases. A sweep visits every column once (natural order, or decreasing ``diag S``
with ``act_order`` as the reference does); G is recomputed exactly at the start of every sweep and kept exact
inside it by lazy updates over batches of ``block_size`` columns (no inverse, no Cholesky). Columns with
``S[j, j] == 0`` (no input ever reached them) keep their initial values.

Outlier-aware variant (the paper's Algorithm 3, unstructured): ``W ~ Q + Hs`` with Hs holding ``k`` float
entries. After each sweep of Q (towards ``W - Hs``), Hs takes one iterative-hard-thresholding step,
``Hs <- top_k(Hs + G / lambda_max(S))`` (a gradient step of length 1/L on f in Hs, L = 2 lambda_max, then the k
largest entries in magnitude), which does not increase f either.

Deviations from the reference code (linkedin/QuantEase), and why:
* Every sweep rounds onto the grid: the reference leaves every third sweep unrounded (a relaxation heuristic),
  which breaks the monotone descent the sanity check asks for; here f is non-increasing sweep by sweep.
* The grid (scales, zero points) is the initialisation's (GPTQ's or the quantize pass's), fixed: the reference
  recomputes min-max group scales from W, which is what the quantize pass (RTN) already holds.
* The outlier part starts empty and is chosen by the first IHT step (the reference starts from the k largest
  |W| with Q zero there); starting from the GPTQ / RTN solution keeps the result at or below it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from qpass.errors import QuantizationError
from qpass.primitives.quant import expand_to, fake_quantize


@dataclass
class QuantEaseResult:
    weight: Tensor                  # Q, on the grid, [out, in], dtype of the input weight
    outlier_index: Tensor | None    # int64 flat indices into [out, in] (row-major), k of them, ascending
    outlier_value: Tensor | None    # float32 values added there (Q + Hs is the layer's weight)
    objective: list[float]          # f (with S = h) at the start and after every sweep


def quantease(w: Tensor, h: Tensor, q0: Tensor, scale: Tensor, zero_point: Tensor | None, block, fmt: str, *,
              iterations: int = 30, outliers: int = 0, act_order: bool = True,
              block_size: int = 128) -> QuantEaseResult:
    """Coordinate descent from ``q0`` (on the grid of `scale`, `zero_point`, canonical `block`, `fmt`) for
    ``iterations`` sweeps; with ``outliers`` = k > 0, a k-sparse float part is fitted beside Q."""
    out_f, in_f = w.shape
    if h.shape != (in_f, in_f) or q0.shape != w.shape:
        raise QuantizationError(f"QuantEase: Hessian {tuple(h.shape)} / start {tuple(q0.shape)} do not fit a weight "
                                f"of shape {tuple(w.shape)}")
    if not 0 <= outliers <= w.numel():
        raise QuantizationError(f"QuantEase: {outliers} outliers for a weight of {w.numel()} elements")
    dtype = torch.promote_types(w.dtype, torch.float32)
    W, S, Q = w.detach().to(dtype), h.detach().to(dtype), q0.detach().to(dtype).clone()
    se = expand_to(scale.to(torch.float32), block, W.shape).expand(W.shape)
    ze = None if zero_point is None else expand_to(zero_point, block, W.shape).expand(W.shape)
    diag = torch.diagonal(S)
    order = torch.argsort(diag, descending=True, stable=True) if act_order else torch.arange(in_f)
    order = order[diag[order] > 0].tolist()                           # dead columns keep their start
    Hs = torch.zeros_like(W)
    lam = float(torch.linalg.eigvalsh(h.detach().double())[-1]) if outliers else 0.0

    def objective() -> float:
        e = (W - Q - Hs).double()
        return float(((e @ S.double()) * e).sum())

    history = [objective()]
    best = (history[0], Q.clone(), Hs.clone())
    for _ in range(iterations):
        G = (W - Q - Hs) @ S
        for b0 in range(0, len(order), block_size):
            cols = order[b0:b0 + block_size]
            idx = torch.tensor(cols)
            S_bb = S[idx[:, None], idx[None, :]]
            D = torch.zeros(out_f, len(cols), dtype=dtype)
            for t, j in enumerate(cols):
                g = G[:, j] - D[:, :t] @ S_bb[:t, t] if t else G[:, j]
                target = (Q[:, j] + g / S[j, j])[:, None]
                new = fake_quantize(target, se[:, j:j + 1], None if ze is None else ze[:, j:j + 1], (1, 1), fmt)[:, 0]
                D[:, t] = new - Q[:, j]
                Q[:, j] = new
            G -= D @ S[idx, :]
        if outliers and lam > 0:
            step = Hs + G / lam
            keep = step.reshape(-1).abs().topk(outliers).indices
            Hs = torch.zeros_like(W).reshape(-1).index_copy_(0, keep, step.reshape(-1)[keep]).reshape(W.shape)
        history.append(objective())
        if history[-1] <= best[0]:           # NOTE: exact steps never increase f; this guards float round-off
            best = (history[-1], Q.clone(), Hs.clone())
    _, Q, Hs = best
    index = value = None
    if outliers:
        index = Hs.reshape(-1).abs().topk(outliers).indices.sort().values
        value = Hs.reshape(-1)[index].to(torch.float32)
    return QuantEaseResult(Q.to(w.dtype), index, value, history)


__all__ = ["QuantEaseResult", "quantease"]
