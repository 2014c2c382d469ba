"""GPTQ numerics (Frantar et al. 2023): Hessian accumulation and the column loop. Pure tensors, no graphs.

Layout: every function takes a weight in canonical ``[out, in]`` layout and a *canonical* quantizer block
size ``(rows, cols)`` (``spec.block_size((out, in))``: ``(1, g)`` per group, ``(1, -1)`` per output channel,
``(-1, -1)`` per tensor, ``(-1, 1)`` per input channel, ``(g, 1)`` groups along the output axis).

The column loop follows the reference implementation (``gptq.py`` of IST-DASLab/gptq):
dead inputs (``H_ii == 0``) get ``H_ii = 1`` and a zero weight column; ``H += damp * mean(diag H) * I``;
``U = cholesky(H^-1, upper)``; columns are quantized left to right (or by decreasing ``diag H`` with
act-order) in lazy batches of ``block_size`` columns, each error fed back with ``W[:, i:] -= err * U[i, i:]``.

Quantizer parameters (scale, zero point) are computed per *column block* of the quantizer (a group of
``g`` input columns, or all columns for per-channel / per-tensor) from the weights as updated so far,
when the sweep first reaches a column of that block (for unpermuted groups: the group's first column, as
the reference does), or up front from the original weights with ``static_groups``. Lazy batches are cut
at those points so the parameters always see fully updated weights. Groups stay contiguous in the original
column order (no ``g_idx``), so the result is exactly what the graph's ``fake_quantize`` represents:
``fake_quantize(result.weight, result.scale, result.zero_point) == result.weight`` bit for bit.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from qpass.errors import QuantizationError
from qpass.primitives.quant import blocks, choose_qparams, fake_quantize, scale_shape
from qpass.primitives.spec import QSpec

log = logging.getLogger("qpass.gptq")


class HessianAccumulator:
    """``H = 2/n * sum_t x_t x_t^T`` over the rows of every tensor given to ``update`` (last dim = features).

    The raw sum ``X^T X`` is kept in float64 (each batch's product is computed in the input's float dtype,
    at least float32), so ``hessian`` equals the closed form on the concatenated inputs."""

    def __init__(self) -> None:
        self.xtx: Tensor | None = None
        self.tokens = 0
        self._part: Tensor | None = None     # reused product buffer (no [in, in] allocation per update)

    def update(self, x: Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1])
        x2 = x2.to(torch.promote_types(x2.dtype, torch.float32))
        if self._part is None or self._part.dtype != x2.dtype:
            self._part = x2.new_empty(x2.shape[1], x2.shape[1])
            self.xtx = torch.zeros(x2.shape[1], x2.shape[1], dtype=torch.float64, device=x2.device) \
                if self.xtx is None else self.xtx
        torch.mm(x2.t(), x2, out=self._part)
        self.xtx.add_(self._part)
        self.tokens += x2.shape[0]

    @property
    def hessian(self) -> Tensor:
        if self.xtx is None or self.tokens == 0:
            raise QuantizationError("no calibration inputs reached this Hessian",
                                    fix="check that calibration samples run through the layer")
        return self.xtx * (2.0 / self.tokens)


@dataclass
class GptqResult:
    weight: Tensor                # quantized weight values, [out, in], dtype of the input weight
    scale: Tensor                 # scale_shape((out, in), block), float32
    zero_point: Tensor | None     # same shape, int32 (asymmetric int) or None
    damp: float                   # dampening fraction finally used (raised when Cholesky failed)
    perm: Tensor | None           # column order used (act-order), None for the natural order


def hessian_inverse_factor(h: Tensor, percdamp: float, *, retries: int = 8) -> tuple[Tensor, float]:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` (float64) and the dampening used.
    When Cholesky fails the dampening is raised 10x (with a warning), up to `retries` times."""
    h = h.double()
    mean_diag = float(torch.diagonal(h).mean())
    damp = percdamp
    for attempt in range(retries + 1):
        damped = h.clone()
        damped.diagonal().add_(damp * mean_diag)
        chol, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            del chol
            u, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0 and bool(torch.isfinite(u).all()):
                return u, damp
        new = damp * 10 if damp > 0 else 0.01
        if attempt < retries:
            log.warning("GPTQ: Cholesky of the Hessian failed with dampening %.3g; retrying with %.3g", damp, new)
        damp = new
    raise QuantizationError(f"the Hessian is not positive definite even with dampening {damp / 10:.3g}",
                            fix="check the calibration data (NaN/inf activations?) or raise gptq.damp")


CLIP_GRID, CLIP_MAX_SHRINK, CLIP_NORM = 100, 0.8, 2.4      # the reference's (GPTQ's Quantizer) constants


def clipped_qparams(x: Tensor, spec: QSpec, block) -> tuple[Tensor, Tensor | None]:
    """Scale and zero point per block of `x` from its min-max range shrunk by the ratio that minimises the block's
    ``sum |q(x) - x|^2.4`` (ratios 1, 0.99, .., 0.21; ties keep the larger ratio, so never worse than min-max
    in that norm). A zero element stays exact for every ratio (the ranges include 0)."""
    block = tuple(block)
    best = None
    for i in range(int(CLIP_MAX_SHRINK * CLIP_GRID)):
        p = 1 - i / CLIP_GRID
        s, z = choose_qparams(x * p, spec, block_size=block)
        err = blocks((fake_quantize(x, s, z, list(block), spec.format.name) - x).abs().pow(CLIP_NORM),
                     block, fill=0.0).sum(-1)
        if best is None:
            best = [err, s, z]
            continue
        t = err < best[0]
        best = [torch.where(t, err, best[0]), torch.where(t, s, best[1]),
                None if z is None else torch.where(t, z, best[2])]
    return best[1], best[2]


def gptq_quantize(w: Tensor, h: Tensor, spec: QSpec, *, block: tuple[int, int] | None = None,
                  percdamp: float = 0.01, block_size: int = 128, act_order: bool = False,
                  static_groups: bool = False, clip: bool = False) -> GptqResult:
    """Quantize ``w`` ([out, in]) with GPTQ given the input Hessian ``h`` ([in, in]) and the quantizer
    `spec` laid out with the canonical `block` (default ``spec.block_size(w.shape)``). `clip`: each row's
    (group's) scale from :func:`clipped_qparams` (the reference's ``Quantizer(mse=True)``, QuaRot's ``w_clip``)
    of the columns as the sweep reaches them, instead of their min-max."""
    out_f, in_f = w.shape
    if h.shape != (in_f, in_f):
        raise QuantizationError(f"Hessian of shape {tuple(h.shape)} does not fit a weight of shape {tuple(w.shape)}")
    block = tuple(spec.block_size(w.shape) if block is None else block)
    dtype = torch.promote_types(w.dtype, torch.float32)
    W = w.detach().to(dtype).clone()
    H = h.detach().double().clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    width = in_f if block[1] == -1 else min(block[1], in_f)            # columns per quantizer column block
    n_blocks = -(-in_f // width)
    qp = _ColumnQParams(spec, block, scale_shape((out_f, in_f), block), n_blocks, width, W.device, clip=clip)
    if static_groups:
        for b in range(n_blocks):
            qp.compute(b, W[:, b * width:(b + 1) * width])

    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm[:, None], perm[None, :]]
    order = perm if perm is not None else torch.arange(in_f, device=W.device)
    col_block = (order // width).tolist()                                # quantizer block of each position
    U, damp = hessian_inverse_factor(H, percdamp)
    del H
    U = U.to(dtype)

    Q = _sweep(W, U, qp, col_block, block_size, lazy_groups=width > 1 and not static_groups)
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return GptqResult(Q.to(w.dtype), qp.scale, qp.zero_point, damp, perm)


def _sweep(W: Tensor, U: Tensor, qp: "_ColumnQParams", col_block: list[int], block_size: int,
           lazy_groups: bool) -> Tensor:
    """The column loop on (permuted) W, updated in place; returns the quantized columns. `col_block[p]`:
    the quantizer column block of position p; with `lazy_groups`, lazy batches are also cut where a block
    is first reached, so its qparams are computed from fully updated weights."""
    in_f = W.shape[1]
    positions: dict[int, list[int]] = {}                                 # column block -> its positions
    for p, b in enumerate(col_block):
        positions.setdefault(b, []).append(p)
    cuts = set(range(0, in_f, block_size))
    if lazy_groups:
        cuts |= {ps[0] for ps in positions.values()}
    cuts = sorted(cuts) + [in_f]
    Q = torch.zeros_like(W)
    for i1, i2 in zip(cuts[:-1], cuts[1:]):
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            b = col_block[i1 + i]
            if not qp.ready[b]:
                if len(positions[b]) == 1:
                    qp.compute(b, W1[:, i:i + 1])
                else:   # i == 0 (a cut): W[:, i1:] holds every update so far
                    qp.compute(b, W[:, positions[b]])
            w_col = W1[:, i:i + 1]
            q = qp.quantize(b, w_col)
            Q[:, i1 + i] = q[:, 0]
            err = (w_col - q) / U1[i, i]
            W1[:, i:] -= err @ U1[i:i + 1, i:]
            Err1[:, i] = err[:, 0]
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return Q


class _ColumnQParams:
    """Scale / zero point of the quantizer, filled one column block (group) at a time."""

    def __init__(self, spec: QSpec, block, shape, n_blocks: int, width: int, device, *, clip: bool = False):
        self.spec, self.width, self.clip = spec, width, clip
        self.row_block = (block[0], -1)
        self.scale = torch.ones(shape, dtype=torch.float32, device=device)
        self.zero_point = None
        if not spec.symmetric and spec.format.kind == "int":
            self.zero_point = torch.zeros(shape, dtype=torch.int32, device=device)
        self.ready = [False] * n_blocks

    def compute(self, b: int, cols: Tensor) -> None:
        s, z = (clipped_qparams(cols, self.spec, self.row_block) if self.clip else
                choose_qparams(cols, self.spec, block_size=self.row_block))
        self.scale[:, b:b + 1] = s
        if self.zero_point is not None:
            self.zero_point[:, b:b + 1] = z
        self.ready[b] = True

    def quantize(self, b: int, col: Tensor) -> Tensor:
        z = None if self.zero_point is None else self.zero_point[:, b:b + 1]
        return fake_quantize(col, self.scale[:, b:b + 1], z, self.row_block, self.spec.format.name)


def reconstruction_error(w: Tensor, w_hat: Tensor, xtx: Tensor) -> float:
    """``||W X - W_hat X||^2`` summed over the calibration tokens, from ``X^T X`` (= sum_t x_t x_t^T)."""
    d = (w.double() - w_hat.double())
    return float(((d @ xtx.double()) * d).sum())


__all__ = ["HessianAccumulator", "GptqResult", "gptq_quantize", "hessian_inverse_factor", "reconstruction_error",
           "clipped_qparams"]
