"""AWQ numerics (Lin et al. 2024): activation-aware scale search and weight-clipping search. Pure tensors.

Weights are canonical ``[out, in]``; a linear's calibration inputs enter through their Gram matrix
``G = sum_t x_t x_t^T`` ([in, in], the GPTQ Hessian up to a factor), so every error below is summed over
*all* calibration tokens exactly, at a cost independent of their number (the reference sub-samples 512
tokens for the clip search to bound GPU memory). A *channel map* gives, for each input column of a linear,
the producer channel its scale comes from (``qpass.folding.Consumer.channel_map``), so one scale vector
serves every linear reading the same producer (q/k/v; repeated grouped-query heads).

Scale search (reference ``auto_scale``): ``s = mean|x|^alpha`` per producer channel, normalized by
``sqrt(max(s) * min(s))`` over the channels the linears read, for ``alpha`` on the grid ``i / n`` (i < n;
n = 20 in the paper); the loss is ``sum_j ||x_j W_j^T - (x_j / s) Q(W_j s)^T||^2`` over the linears of the
group. ``alpha = 0`` gives ``s = 1`` (plain RTN), so the best loss never exceeds RTN's.

Clip search (reference ``auto_clip_layer``): per output row and quantizer group, shrink the group's
max |w| by ``1 - i / grid`` for ``i < max_shrink * grid`` (1.00, 0.95, ..., 0.55), clamp the weights to
``[-m, m]``, quantize, and keep the shrink minimizing ``sum_t (x_t,group . (w - Q(w_clamped))_group)^2``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from qpass.errors import QuantizationError
from qpass.primitives.quant import choose_qparams, fake_quantize
from qpass.primitives.spec import QSpec


def fake_quantize_weight(w: Tensor, spec: QSpec) -> Tensor:
    """Round-to-nearest min-max fake quantization of a canonical [out, in] weight with `spec`."""
    block = spec.block_size(w.shape)
    scale, zp = choose_qparams(w, spec, block_size=block)
    return fake_quantize(w, scale, zp, block, spec.format.name)


def awq_scales(x_mean: Tensor, alpha: float, used: Tensor | None = None) -> Tensor:
    """``s = x_mean^alpha`` (x_mean clamped at 1e-4) normalized to ``s / sqrt(max * min)``; 1 where
    `used` is False (channels no linear reads)."""
    used = torch.ones_like(x_mean, dtype=torch.bool) if used is None else used
    s = x_mean.double().clamp(min=1e-4).pow(alpha)
    if bool(used.any()):
        s = s / (s[used].max() * s[used].min()).sqrt()
    return torch.where(used, s, torch.ones_like(s))


def output_error(d: Tensor, gram: Tensor) -> float:
    """``sum_t ||x_t D^T||^2 = tr(D G D^T)`` for a weight difference ``D`` ([out, in]) and the input Gram
    matrix ``G = sum_t x_t x_t^T`` ([in, in]): the output error over every calibration token at once."""
    d = d.double()
    return float(((d @ gram.double()) * d).sum())


def scale_search(grams: list[Tensor], ws: list[Tensor], maps: list[Tensor], x_mean: Tensor, spec: QSpec,
                 grid: int = 20, used: Tensor | None = None) -> tuple[float, Tensor, list[float]]:
    """Best (alpha, scales per producer channel, loss for every grid alpha) for one folding group: the
    linears' weights `ws` ([out, in]), their input Gram matrices `grams` and channel `maps`. The loss of a
    linear is ``||x W^T - (x / s) Q(W s)^T||^2 = tr(D G D^T)`` with ``D = W - Q(W s) / s``."""
    if grid < 1:
        raise QuantizationError(f"the alpha grid needs at least one point, got {grid}")
    losses, best = [], (0.0, None, float("inf"))
    for i in range(grid):
        alpha = i / grid
        s = awq_scales(x_mean, alpha, used)
        loss = 0.0
        for g, w, cmap in zip(grams, ws, maps):
            sc = s[cmap].to(w.dtype)
            loss += output_error(w - fake_quantize_weight(w * sc, spec) / sc, g)
        losses.append(loss)
        if loss < best[2]:
            best = (alpha, s, loss)
    if best[1] is None:   # every loss was NaN
        raise QuantizationError("AWQ scale search: the output error is NaN for every alpha",
                                fix="check the calibration data and weights for inf/NaN")
    return best[0], best[1], losses


def clip_search(w: Tensor, gram: Tensor, spec: QSpec, *, grid: int = 20,
                max_shrink: float = 0.5) -> tuple[Tensor, Tensor]:
    """(clipped weight, chosen shrink ratio per [out, group]) for a canonical weight quantized per output
    channel (``(1, -1)``) or per group along the input (``(1, g)``), given its input Gram matrix. The error
    of a (row, group) is ``d G_gg d^T`` with ``d`` the row's quantization error on the group's columns."""
    block = spec.block_size(w.shape)
    out_f, in_f = w.shape
    if block[0] != 1:
        raise QuantizationError(f"clip search needs one scale per output row (block {block})")
    g = in_f if block[1] == -1 else min(block[1], in_f)
    n_groups = -(-in_f // g)
    pad = n_groups * g - in_f
    gp = torch.nn.functional.pad(gram.double(), (0, pad, 0, pad))
    diag_blocks = torch.stack([gp[i * g:(i + 1) * g, i * g:(i + 1) * g] for i in range(n_groups)])
    wg = torch.nn.functional.pad(w, (0, pad)).reshape(out_f, n_groups, g)
    amax = wg.abs().amax(-1, keepdim=True)
    best_err = torch.full((out_f, n_groups), float("inf"), dtype=torch.float64, device=w.device)
    best_max, best_ratio = amax.clone(), torch.ones(out_f, n_groups, dtype=torch.float32, device=w.device)
    for i in range(max(1, int(max_shrink * grid))):
        ratio = 1.0 - i / grid
        m = amax * ratio
        clipped = torch.maximum(torch.minimum(wg, m), -m).reshape(out_f, -1)[:, :in_f]
        q = torch.nn.functional.pad(fake_quantize_weight(clipped, spec), (0, pad)).reshape(wg.shape)
        d = (wg - q).double()
        err = torch.einsum("ong,ngh,onh->on", d, diag_blocks, d)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better.unsqueeze(-1), m, best_max)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    clipped = torch.maximum(torch.minimum(wg, best_max), -best_max).reshape(out_f, -1)[:, :in_f]
    return clipped, best_ratio


__all__ = ["awq_scales", "scale_search", "clip_search", "fake_quantize_weight", "output_error"]
