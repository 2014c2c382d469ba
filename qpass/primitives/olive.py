"""OliVe's outlier-victim pair (OVP) encoding (Guo et al., ISCA 2023) as registered formats ``olive4`` .. ``olive8``.

An emulation of a hardware number format: the numerics are exact, the storage is one ``b``-bit code per value
(held in a uint8 here), and nothing runs faster on a CPU or GPU (the paper's decoder lives in a systolic array).

Values are in *code units* (``x / scale``), so the normal grid is the integers. Adjacent values along the last
axis form pairs ``(2k, 2k+1)``. Per value, ``b`` bits::

    normal value   symmetric int in [-(2^(b-1)-1), 2^(b-1)-1], two's complement (int4: -7..7)
    identifier     2^(b-1) (int4: 0b1000, the unused "-8"): marks the *victim*, the pair's pruned value (0)
    abfloat        sign bit + E2 + M(b-3) magnitude code c in 1..2^(b-1)-1 (c = E * 2^M + m; c = 0 is not a
                   value: with the sign set it would be the identifier), magnitude 2^(E + bias) * (1 + m / 2^M)
                   with bias = b - 1, so the smallest outlier 2^(b-1) lies just above the normal maximum

    int4 (E2M1): outliers +-{12, 16, 24, 32, 48, 64, 96} next to normals -7..7 (the paper's bias-2 E2M1
    abfloat, (2 + m) << (E + 2), without its 8: the reserved code);  int8 (E2M5): +-132 .. +-2016 next to -127..127.

Encoding (the paper's, and its reference code's): each value is rounded to the nearest point of the union of
both grids; a value that lands on the abfloat grid is an outlier (int4: |y| > 9.5). In a pair with one outlier the
other value is the victim: pruned to 0 and coded as the identifier, and the outlier takes the abfloat code. If both
are outliers the larger magnitude keeps the slot (ties: the first) and the other is pruned (the reference code
keeps the first one). Beyond the largest abfloat value outliers saturate. A last value without a partner (odd
length) has no victim to give and is clamped to the normal grid. Decoding needs no side information: a pair
holding the identifier is (abfloat, 0) or (0, abfloat), any other pair is two ints. So the bit count is exactly
``b`` per value plus the scales (no index lists, no extra marker bits): the memory-aligned property the paper is
about.

Scales are the caller's choice; :func:`search_scale` is the paper's: the normal maximum is a multiple of the
``3 sigma`` bound of the block (``max |mean +- 3 std|``), the multiple chosen on a grid by the encoded MSE, with
plain min-max (no outliers at all) as one more candidate. :class:`OliveObserver` does the same for static
per-tensor activation scales from calibration data (a sample of whole rows, so pairs stay pairs).
Never imports torch.fx.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from qpass.errors import QuantizationError
from qpass.primitives import quant
from qpass.primitives.formats import FormatCodec, register_format
from qpass.primitives.observers import Observer
from qpass.primitives.spec import QSpec

SIGMAS = 3.0     # the paper's base range: mean +- 3 std


@dataclass(frozen=True)
class Olive(FormatCodec):
    """The OVP format of ``bits`` bits per value (4..8); see the module doc."""

    bits: int
    kind: ClassVar[str] = "olive"

    def __post_init__(self):
        if not (isinstance(self.bits, int) and 4 <= self.bits <= 8):
            raise ValueError(f"olive formats have 4..8 bits (sign + 2 exponent bits + a mantissa), got {self.bits!r}")

    @property
    def name(self) -> str:
        return f"olive{self.bits}"

    @property
    def nmax(self) -> int:
        """Largest normal value (code units)."""
        return 2 ** (self.bits - 1) - 1

    @property
    def identifier(self) -> int:
        return 2 ** (self.bits - 1)

    def outlier_values(self, like: Tensor | None = None) -> Tensor:
        """Abfloat magnitudes of codes 1..2^(b-1)-1, ascending (code c is entry c - 1)."""
        m = self.bits - 3
        vals = [2.0 ** (e + self.bits - 1) * (1 + j / 2 ** m) for e in range(4) for j in range(2 ** m)][1:]
        kw = {} if like is None else {"dtype": like.dtype, "device": like.device}
        return torch.tensor(vals, **kw)

    def qrange(self, symmetric: bool):
        return -float(self.nmax), float(self.nmax)

    def _classify(self, y: Tensor):
        """(|y|, abfloat magnitudes, keeps the abfloat slot, is the victim) of values in code units."""
        mags = self.outlier_values(y)
        a = y.abs()
        outlier = a > (self.nmax + mags[0]) / 2                     # nearest point of the union is an abfloat
        if y.shape[-1] % 2:                                          # no partner for the last value
            outlier[..., -1] = False
        keep, victim = _pair_roles(outlier, a)
        return a, mags, keep, victim

    def encode(self, y: Tensor, zero_point: Tensor | None, table: Tensor | None) -> Tensor:
        if zero_point is not None:
            raise QuantizationError(f"{self.name} is symmetric only, but a zero point was given", fix="pass None")
        a, mags, keep, victim = self._classify(y)
        normal = y.round().clamp(-self.nmax, self.nmax).to(torch.int16) & (2 ** self.bits - 1)
        code = torch.bucketize(a.clamp(max=mags[-1]), (mags[1:] + mags[:-1]) / 2) + 1   # 1..nmax, ties: lower
        abf = code.to(torch.int16) | (y < 0).to(torch.int16) * self.identifier
        out = torch.where(keep, abf, normal)
        return out.masked_fill_(victim, self.identifier).to(torch.uint8)

    def roundtrip(self, y: Tensor) -> Tensor:
        """decode(encode(y)) in y's dtype without codes (the same values: fake-quant and the scale search)."""
        a, mags, keep, victim = self._classify(y)
        idx = torch.bucketize(a.clamp(max=mags[-1]), (mags[1:] + mags[:-1]) / 2)
        out = torch.where(keep, mags[idx].copysign(y), y.round().clamp(-self.nmax, self.nmax))
        return out.masked_fill_(victim, 0.0)

    def decode(self, codes: Tensor, zero_point: Tensor | None, table: Tensor | None, dtype: torch.dtype) -> Tensor:
        c = codes.to(torch.int64)
        ident = c == self.identifier
        partner = torch.zeros_like(ident)                           # my partner holds the identifier
        n = c.shape[-1] - c.shape[-1] % 2
        pair = ident[..., :n].unflatten(-1, (n // 2, 2))
        partner[..., :n] = pair.flip(-1).flatten(-2)
        normal = torch.where(c >= self.identifier, c - 2 ** self.bits, c).to(dtype)
        mags = torch.cat([self.outlier_values().to(dtype=dtype, device=c.device).new_zeros(1),
                          self.outlier_values().to(dtype=dtype, device=c.device)])
        sign = 1 - 2 * (c >> (self.bits - 1)).to(dtype)
        abf = sign * mags[c & self.nmax]
        out = torch.where(partner, abf, normal)
        return torch.where(ident, torch.zeros_like(out), out)


def _pair_roles(outlier: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """(keeps the abfloat slot, is the pruned victim) per value, for pairs along the last axis."""
    n = outlier.shape[-1] - outlier.shape[-1] % 2
    pairs = lambda t: t[..., :n].unflatten(-1, (n // 2, 2))   # noqa: E731  (a view)
    o, m = pairs(outlier), pairs(a)
    first = o[..., 0] & (~o[..., 1] | (m[..., 0] >= m[..., 1]))   # value 0 keeps the slot
    second = o[..., 1] & ~first
    keep, victim = torch.zeros_like(outlier), torch.zeros_like(outlier)
    k, v = pairs(keep), pairs(victim)
    k[..., 0], k[..., 1], v[..., 0], v[..., 1] = first, second, second, first
    return keep, victim


for _b in range(4, 9):
    register_format(Olive(_b))


def get_olive(name: str) -> Olive:
    from qpass.primitives.formats import get_format

    f = get_format(name)
    if not isinstance(f, Olive):
        raise QuantizationError(f"{name} is not an OliVe format", fix="use olive4 .. olive8")
    return f


# -------------------------------------------------------------------------------------------- scales


def candidate_scales(blocks: Tensor, fmt: Olive, ratios: Sequence[float]) -> list[Tensor]:
    """Scales to try per block (`blocks` is [*scale_shape, K]): ratio * the 3-sigma bound, then min-max."""
    mean, std = blocks.mean(-1), blocks.std(-1, correction=0)
    base = torch.maximum((mean + SIGMAS * std).abs(), (mean - SIGMAS * std).abs())
    absmax = blocks.abs().amax(-1)
    return [(r * base).clamp(min=quant.SCALE_FLOOR) / fmt.nmax for r in ratios] + \
           [absmax.clamp(min=quant.SCALE_FLOOR) / fmt.nmax]


def search_scale(x: Tensor, block: Sequence[int], fmt_name: str, ratios: Sequence[float]) -> Tensor:
    """Per block of `block`, the candidate scale (:func:`candidate_scales`) whose OVP fake-quant of `x` has the
    smallest squared error (ties: the earlier candidate). float32, scale-shaped."""
    fmt = get_olive(fmt_name)
    x = x.float()
    cands = candidate_scales(quant.blocks(x, block), fmt, ratios)
    best, best_err = cands[-1], None
    for s in cands:
        se = quant.expand_to(s, block, x.shape)
        err = quant.reduce_blocks((fmt.roundtrip(x / se) * se - x) ** 2, block)
        if best_err is None:
            best, best_err = s, err
        else:
            better = err < best_err
            best, best_err = torch.where(better, s, best), torch.where(better, err, best_err)
    return best.float()


class OliveObserver(Observer):
    """Static per-tensor activation scale for an OliVe format: a seeded uniform sample of whole rows (last axis:
    pairs stay pairs), then :func:`search_scale` on the sample. Per-tensor only."""

    def __init__(self, spec: QSpec, *, ratios: Sequence[float], max_rows: int = 2048, seed: int = 0):
        super().__init__(spec)
        self.ratios, self.max_rows = tuple(ratios), max_rows
        self._gen = torch.Generator().manual_seed(seed)
        self._rows: Tensor | None = None
        self._keys: Tensor | None = None

    def _observe(self, x: Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1])
        keys = torch.rand(rows.shape[0], generator=self._gen)
        if self._rows is not None:
            rows, keys = torch.cat([self._rows, rows]), torch.cat([self._keys, keys])
        if rows.shape[0] > self.max_rows:
            idx = keys.topk(self.max_rows, largest=False).indices
            rows, keys = rows[idx], keys[idx]
        self._rows, self._keys = rows, keys

    def qparams(self) -> tuple[Tensor, None]:
        if self._rows is None:
            raise QuantizationError("OliveObserver.qparams() called before any update",
                                    fix="run calibration data through the model first")
        if any(b != -1 for b in self.block_size):
            raise QuantizationError("OliVe activation scales are per tensor", fix="use granularity: per_tensor")
        s = search_scale(self._rows, (-1, -1), self.spec.format.name, self.ratios)
        return s.reshape(self.scale_shape), None


__all__ = ["Olive", "OliveObserver", "search_scale", "candidate_scales", "get_olive", "SIGMAS"]
