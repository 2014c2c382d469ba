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

Clip search (after the reference's ``auto_clip_layer``): per output row and quantizer group, clamp the
weights (symmetric: to ``[-r m, r m]``, m = max |w|, r in 1.00, 0.95, ..., 0.55; asymmetric: that, or
``[r min, r max]``), quantize, and keep the clamps minimizing each row's whole output error
``sum_t (x_t . (w - Q(w_clamped)))^2``. The reference scores each group alone and drops the cross-group
terms, which can make a row worse than not clipping; here no clipping is a candidate of every group and
a row's error never exceeds its unclipped error.
"""
from __future__ import annotations

from collections.abc import Sequence

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


def scale_search(grams: list[Tensor], ws: list[Tensor], maps: list[Tensor], x_mean: Tensor,
                 spec: QSpec | Sequence[QSpec], grid: int = 20,
                 used: Tensor | None = None) -> tuple[float, Tensor, list[float]]:
    """Best (alpha, scales per producer channel, loss for every grid alpha) for one folding group: the
    linears' weights `ws` ([out, in]), their input Gram matrices `grams` and channel `maps`; `spec` is the
    weight quantizer of every linear, or one per linear. The loss of a linear is
    ``||x W^T - (x / s) Q(W s)^T||^2 = tr(D G D^T)`` with ``D = W - Q(W s) / s``. ``alpha = 0`` (s = 1, the
    linears' plain round-to-nearest) comes first and a later alpha must be strictly better, so a tie keeps
    the weights unscaled."""
    specs = [spec] * len(ws) if isinstance(spec, QSpec) else list(spec)
    if len(specs) != len(ws):
        raise QuantizationError(f"scale search: {len(specs)} weight specs for {len(ws)} linears")
    if grid < 1:
        raise QuantizationError(f"the alpha grid needs at least one point, got {grid}")
    losses, best = [], (0.0, None, float("inf"))
    for i in range(grid):
        alpha = i / grid
        s = awq_scales(x_mean, alpha, used)
        loss = 0.0
        for g, w, cmap, sp in zip(grams, ws, maps, specs):
            sc = s[cmap].to(w.dtype)
            loss += output_error(w - fake_quantize_weight(w * sc, sp) / sc, g)
        losses.append(loss)
        if loss < best[2]:
            best = (alpha, s, loss)
    if best[1] is None:   # every loss was NaN
        raise QuantizationError("AWQ scale search: the output error is NaN for every alpha",
                                fix="check the calibration data and weights for inf/NaN")
    return best[0], best[1], losses


def clip_candidates(w: Tensor, spec: QSpec, ratios: list[float]) -> tuple[Tensor, Tensor, Tensor]:
    """(low, high, kept) clamp bounds per candidate, output row and group ([k, out, groups, 1] each; ``kept``
    is the fraction of the quantizer's range left) for a canonical weight `w` grouped as `spec` groups it.

    Symmetric (reference ``auto_clip_layer``): ``[-r m, r m]``, m = max |w| of the group. Asymmetric: the
    quantizer maps ``[min(lo, 0), max(hi, 0)]`` onto its codes, so a shrink of the larger side alone (the
    reference's clamp) and a shrink of both ends ``[r min, r max]`` are both candidates."""
    wg, _, _ = _grouped(w, spec)
    amax = wg.abs().amax(-1, keepdim=True)
    r = torch.tensor(ratios, dtype=w.dtype, device=w.device).view(-1, 1, 1, 1)
    lo, hi = -r * amax, r * amax
    if not spec.symmetric:
        qlo, qhi = wg.amin(-1, keepdim=True).clamp(max=0), wg.amax(-1, keepdim=True).clamp(min=0)
        lo, hi = torch.cat([lo, r[1:] * qlo]), torch.cat([hi, r[1:] * qhi])
        span = (qhi - qlo).clamp(min=1e-30)
        kept = (torch.minimum(hi, qhi) - torch.maximum(lo, qlo)) / span
    else:
        kept = r.expand_as(lo)
    return lo, hi, kept


def clip_search(w: Tensor, gram: Tensor, spec: QSpec, *, grid: int = 20, max_shrink: float = 0.5,
                sweeps: int = 2, rows: int = 128) -> tuple[Tensor, Tensor]:
    """(clipped weight, fraction of the quantizer range kept per [out, group]) for a canonical weight
    quantized per output channel (``(1, -1)``) or per group along the input (``(1, g)``), given its input
    Gram matrix. Candidates per (row, group): no clip, and the clamps of :func:`clip_candidates` for the
    ratios ``1 - i / grid`` (i < max_shrink * grid).

    The objective is a row's whole output error ``d G d^T`` (``d`` the row's quantization error over all
    its columns), cross-group terms included: the reference's per-group ``d_g G_gg d_g^T`` drops them, and
    clipping errors are biased (a clamp only moves values toward zero), so on inputs with a common offset
    (LayerNorm bias, ReLU outputs) group choices that each look better can add up to a worse row. Start per
    row from the better of the per-group choice and no clipping, then coordinate descent over the groups
    (`sweeps` passes, a group's choice changes only when the row's error strictly drops): every row's
    output error is at most its unclipped one."""
    block = spec.block_size(w.shape)
    if block[0] != 1:
        raise QuantizationError(f"clip search needs one scale per output row (block {block})")
    ratios = [1.0 - i / grid for i in range(max(1, int(max_shrink * grid)))]
    wg, g, pad = _grouped(w, spec)
    out_f, n_groups, _ = wg.shape
    gp = torch.nn.functional.pad(gram.double(), (0, pad, 0, pad))
    lo, hi, kept = clip_candidates(w, spec, ratios)
    choice = torch.empty(out_f, n_groups, dtype=torch.long, device=w.device)
    for r0 in range(0, out_f, rows):       # rows are independent: bound the [k, rows, in] candidate errors
        sl = slice(r0, r0 + rows)
        choice[sl] = _descend(wg[sl], gp, lo[:, sl], hi[:, sl], spec, g, w.shape[1], sweeps)
    pick = lambda t: t.squeeze(-1).gather(0, choice.unsqueeze(0)).squeeze(0)
    lo_c, hi_c = pick(lo).unsqueeze(-1), pick(hi).unsqueeze(-1)
    clipped = torch.maximum(torch.minimum(wg, hi_c), lo_c).reshape(out_f, -1)[:, : w.shape[1]]
    return clipped, pick(kept).float()


def _grouped(w: Tensor, spec: QSpec) -> tuple[Tensor, int, int]:
    """`w` ([out, in]) as [out, groups, g] (the last group zero-padded), the group size and the padding."""
    block = spec.block_size(w.shape)
    in_f = w.shape[1]
    g = in_f if block[1] == -1 else min(block[1], in_f)
    pad = -(-in_f // g) * g - in_f
    return torch.nn.functional.pad(w, (0, pad)).reshape(w.shape[0], -1, g), g, pad


def _descend(wg: Tensor, gp: Tensor, lo: Tensor, hi: Tensor, spec: QSpec, g: int, in_f: int,
             sweeps: int) -> Tensor:
    """Candidate index per (row, group) of a slice of rows: see :func:`clip_search`."""
    out_f, n_groups, _ = wg.shape
    d = torch.stack([(wg - torch.nn.functional.pad(fake_quantize_weight(
        torch.maximum(torch.minimum(wg, h), l).reshape(out_f, -1)[:, :in_f], spec), (0, n_groups * g - in_f))
        .reshape(wg.shape)).double() for l, h in zip(lo, hi)])               # [k, rows, groups, g]
    blocks = torch.stack([gp[j * g:(j + 1) * g, j * g:(j + 1) * g] for j in range(n_groups)])
    diag = torch.einsum("krng,ngh,krnh->krn", d, blocks, d)
    rows = torch.arange(out_f, device=wg.device)

    def take(c):                                                              # [rows, groups, g]
        return d.permute(1, 2, 0, 3)[rows[:, None], torch.arange(n_groups, device=wg.device)[None, :], c]

    def row_error(c):
        dc = take(c).reshape(out_f, -1)
        return ((dc @ gp) * dc).sum(-1)
    local, none = diag.argmin(0), torch.zeros_like(diag[0], dtype=torch.long)   # argmin: first on ties
    c = torch.where((row_error(local) < row_error(none))[:, None], local, none)
    resid = take(c).reshape(out_f, -1) @ gp                                  # d G, [rows, in]
    for _ in range(sweeps if n_groups > 1 else 0):
        for j in range(n_groups):
            cols = slice(j * g, (j + 1) * g)
            dj = d[:, :, j]                                                  # [k, rows, g]
            cur = dj[c[:, j], rows]
            cross = resid[:, cols] - cur @ blocks[j]
            err = torch.einsum("krg,gh,krh->kr", dj, blocks[j], dj) + 2 * (dj * cross).sum(-1)
            best = err.argmin(0)
            keep = err[best, rows] >= err[c[:, j], rows]                     # strict improvements only
            new = torch.where(keep, c[:, j], best)
            resid += (dj[new, rows] - cur) @ gp[cols]
            c[:, j] = new
    return c


__all__ = ["awq_scales", "scale_search", "clip_search", "clip_candidates", "fake_quantize_weight", "output_error"]
