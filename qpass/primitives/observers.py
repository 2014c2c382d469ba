"""Observers: accumulate statistics over calibration batches, then give static (scale, zero_point).

    obs = OBSERVERS["minmax"](spec)        # or MinMaxObserver(spec, reduce_dims=(0, 1))
    for x in batches: obs.update(x)
    scale, zero_point = obs.qparams()      # shaped for obs.block_size

Contract
--------
* The block size is ``spec.block_size(x.shape)`` of the first update, with every dim in ``reduce_dims``
  set to -1 (reduced). Statistics and qparams have the scale shape of that block size (same rank as x).
  For activations [batch, seq, hidden] the usual static granularities already reduce batch and seq:
  ``PerTensor`` -> (1, 1, 1), ``PerChannel(axis=-1)`` -> (1, 1, hidden), ``PerHead()`` on
  [batch, heads, seq, head_dim] -> (1, heads, 1, 1). Granularities that put block 1 on batch/seq dims
  (``PerToken``, ``PerGroup`` on activations) need ``reduce_dims=(0, 1)`` for static qparams; otherwise an
  update whose batch/seq sizes differ raises (the stats would not line up).
* Later updates must give the same block size and scale shape (seq length may vary where it is reduced).
* ``update`` raises QuantizationError on inf/NaN (saying how many); empty tensors are ignored.
  ``qparams`` raises QuantizationError before any (non-empty) update.
* ``obs.block_size`` is what the quantize op must be given together with the qparams.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from qpass.errors import QuantizationError
from qpass.primitives import quant
from qpass.primitives.spec import QSpec


class Observer:
    """Base class: block-size bookkeeping and checks. Subclasses implement `_observe` and `_minmax`."""

    def __init__(self, spec: QSpec, *, reduce_dims: Sequence[int] = ()):
        self.spec = spec
        self.reduce_dims = tuple(reduce_dims)
        self.block_size: tuple[int, ...] | None = None
        self.scale_shape: tuple[int, ...] | None = None

    def _block_size_for(self, shape) -> tuple[int, ...]:
        bs = list(self.spec.block_size(shape))
        for d in self.reduce_dims:
            if not -len(shape) <= d < len(shape):
                raise QuantizationError(f"reduce_dims {self.reduce_dims} out of range for shape {tuple(shape)}")
            bs[d % len(shape)] = -1
        return tuple(bs)

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Add the statistics of one calibration tensor."""
        x = x.detach()
        quant.check_finite(x, f"{type(self).__name__}.update")
        if x.numel() == 0:
            return
        bs = self._block_size_for(x.shape)
        shape = quant.scale_shape(x.shape, bs)
        if self.block_size is None:
            self.block_size, self.scale_shape = bs, shape
        elif (bs, shape) != (self.block_size, self.scale_shape):
            raise QuantizationError(
                f"{type(self).__name__}: input shape {tuple(x.shape)} gives block size {bs} and scale shape "
                f"{shape}, but earlier inputs gave {self.block_size} and {self.scale_shape}",
                fix="use a granularity whose block is -1 on batch/sequence dims (per_tensor, per_channel on "
                "the last axis), or pass reduce_dims=(0, 1) to reduce them",
            )
        self._observe(x.float())

    def qparams(self) -> tuple[Tensor, Tensor | None]:
        """(scale float32, zero_point int32 or None), shaped `self.scale_shape`."""
        if self.block_size is None:
            raise QuantizationError(f"{type(self).__name__}.qparams() called before any update",
                                    fix="run calibration data through the model first")
        mn, mx = self._minmax()
        return quant.qparams_from_minmax(mn.reshape(self.scale_shape), mx.reshape(self.scale_shape), self.spec)

    def _observe(self, x: Tensor) -> None:
        raise NotImplementedError

    def _minmax(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class MinMaxObserver(Observer):
    """Running per-block min and max over all updates."""

    min_val: Tensor | None = None
    max_val: Tensor | None = None

    def _observe(self, x):
        mn, mx = quant.block_minmax(x, self.block_size)
        if self.min_val is None:
            self.min_val, self.max_val = mn.clone(), mx.clone()
        else:
            self.min_val, self.max_val = torch.minimum(self.min_val, mn), torch.maximum(self.max_val, mx)

    def _minmax(self):
        return self.min_val, self.max_val


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average of per-batch min and max: the first batch sets them, then
    ``v += averaging_constant * (batch_v - v)``."""

    def __init__(self, spec: QSpec, averaging_constant: float = 0.01, *, reduce_dims: Sequence[int] = ()):
        super().__init__(spec, reduce_dims=reduce_dims)
        if not 0.0 < averaging_constant <= 1.0:
            raise QuantizationError(f"averaging_constant must be in (0, 1], got {averaging_constant}")
        self.averaging_constant = averaging_constant

    def _observe(self, x):
        mn, mx = quant.block_minmax(x, self.block_size)
        if self.min_val is None:
            self.min_val, self.max_val = mn.clone(), mx.clone()
        else:
            c = self.averaging_constant
            self.min_val = self.min_val + c * (mn - self.min_val)
            self.max_val = self.max_val + c * (mx - self.max_val)


def _block_counts(shape, block_size, device) -> Tensor:
    """Number of real elements in each block (partial last blocks are smaller), flattened."""
    counts = torch.ones((), dtype=torch.float64, device=device)
    for n, b in zip(shape, block_size):
        bb = n if b == -1 else b
        nb = quant.scale_shape((n,), (b,))[0]
        c = torch.full((nb,), float(bb), dtype=torch.float64, device=device)
        c[-1] = n - (nb - 1) * bb
        counts = (counts.unsqueeze(-1) * c)
    return counts.reshape(-1)


class PercentileObserver(Observer):
    """Per-block percentile instead of min/max: clips the rarest outliers.

    Symmetric: the `percentile` of |x| is the absmax. Asymmetric: the (100 - p) and p percentiles are the
    min and max. Interpolation as ``torch.quantile`` (linear). Memory: per block it keeps only the largest
    (and smallest) values seen, at most ``max_values // num_blocks`` of them (``max_values`` = 2^20 per
    tail by default), plus the element count. That is exact while the percentile's rank from the top,
    ``(1 - p/100) * (count - 1)``, stays within the kept values (99.99 %: up to ~10^10 values per-tensor,
    ~2.5 * 10^6 per block with 4096 blocks); beyond it, the smallest kept value is used (less clipping).
    """

    def __init__(self, spec: QSpec, percentile: float = 99.99, *, max_values: int = 2**20,
                 reduce_dims: Sequence[int] = ()):
        super().__init__(spec, reduce_dims=reduce_dims)
        if not 0.0 < percentile <= 100.0:
            raise QuantizationError(f"percentile must be in (0, 100], got {percentile}")
        self.percentile, self.max_values = percentile, max_values
        self._top: Tensor | None = None  # [blocks, k] largest values (of |x| if symmetric), descending
        self._bottom: Tensor | None = None  # [blocks, k] smallest values (asymmetric only), ascending
        self._count: Tensor | None = None  # [blocks]

    def _observe(self, x):
        vals = quant.blocks(x, self.block_size, fill=torch.nan).flatten(0, -2)
        k = max(1, self.max_values // vals.shape[0])
        counts = _block_counts(x.shape, self.block_size, x.device)
        self._count = counts if self._count is None else self._count + counts
        hi = vals.abs() if self.spec.symmetric else vals
        self._top = _keep(self._top, hi.nan_to_num(-torch.inf), k, largest=True)
        if not self.spec.symmetric:
            self._bottom = _keep(self._bottom, vals.nan_to_num(torch.inf), k, largest=False)

    def _minmax(self):
        hi = self._tail_value(self._top)
        if self.spec.symmetric:
            return -hi, hi
        return self._tail_value(self._bottom), hi

    def _tail_value(self, tail: Tensor) -> Tensor:
        """Linear-interpolated percentile from the sorted tail (index 0 = the extreme value)."""
        pos = (1.0 - self.percentile / 100.0) * (self._count - 1)
        j0 = pos.floor().clamp(max=tail.shape[1] - 1)
        j1 = torch.minimum(j0 + 1, (self._count - 1).clamp(max=tail.shape[1] - 1))
        v0 = tail.gather(1, j0.long()[:, None])[:, 0]
        v1 = tail.gather(1, j1.long()[:, None])[:, 0]
        return v0 + (pos - j0).clamp(0, 1) * (v1 - v0)


def _keep(kept: Tensor | None, new: Tensor, k: int, largest: bool) -> Tensor:
    both = new if kept is None else torch.cat([kept, new], dim=1)
    return both.topk(min(k, both.shape[1]), dim=1, largest=largest, sorted=True).values


class MseObserver(MinMaxObserver):
    """Min-max range shrunk by the clipping ratio (of a grid, `grid` points from 1.0 down to `min_ratio`)
    that minimizes the fake-quant mean squared error, per block.

    Keeps the running per-block min/max plus a uniform random sample of each block's elements (whole
    positions within blocks, at most ``max_samples // num_blocks`` per block, chosen by reservoir keys from
    a seeded generator; all data while it fits). The error is measured on that sample. Ties keep the
    larger ratio, so the result is never worse than min-max on the sample.
    """

    def __init__(self, spec: QSpec, *, grid: int = 100, min_ratio: float = 0.2, max_samples: int = 2**18,
                 seed: int = 0, reduce_dims: Sequence[int] = ()):
        super().__init__(spec, reduce_dims=reduce_dims)
        if grid < 1 or not 0.0 < min_ratio <= 1.0:
            raise QuantizationError(f"need grid >= 1 and 0 < min_ratio <= 1, got {grid}, {min_ratio}")
        self.ratios = torch.linspace(1.0, min_ratio, grid)
        self.max_samples = max_samples
        self._gen = torch.Generator().manual_seed(seed)
        self._sample: Tensor | None = None  # [blocks, m], NaN where a partial block has no element
        self._keys: Tensor | None = None  # [m]

    def _observe(self, x):
        super()._observe(x)
        vals = quant.blocks(x, self.block_size, fill=torch.nan).flatten(0, -2)
        keys = torch.rand(vals.shape[1], generator=self._gen)
        if self._sample is not None:
            vals, keys = torch.cat([self._sample, vals], dim=1), torch.cat([self._keys, keys])
        m = max(1, self.max_samples // vals.shape[0])
        if vals.shape[1] > m:
            idx = keys.topk(m, largest=False).indices
            vals, keys = vals[:, idx], keys[idx]
        self._sample, self._keys = vals, keys

    def _minmax(self):
        mn, mx = self.min_val.reshape(-1, 1), self.max_val.reshape(-1, 1)
        valid = ~self._sample.isnan()
        sample = self._sample.nan_to_num(0.0)
        best_err = torch.full_like(mn, torch.inf)
        best_ratio = torch.ones_like(mn)
        for r in self.ratios:
            err = self._error(sample, valid, r * mn, r * mx)
            better = err < best_err
            best_err, best_ratio = torch.where(better, err, best_err), torch.where(better, r, best_ratio)
        return best_ratio * mn, best_ratio * mx

    def _error(self, sample, valid, mn, mx) -> Tensor:
        scale, zp = quant.qparams_from_minmax(mn, mx, self.spec)
        fq = quant.fake_quantize(sample, scale, zp, (1, -1), self.spec.format.name)
        return (((fq - sample) ** 2) * valid).sum(-1, keepdim=True) / valid.sum(-1, keepdim=True).clamp(min=1)


OBSERVERS = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MseObserver,
}
