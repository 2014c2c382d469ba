"""Binary-coding quantization (BCQ, LUT-GEMM's weight format; Park et al., ICLR 2024).

Per group of `g` weights along a row (per output channel when g = -1)::

    w ≈ Σ_{i=1..q} α_i b_i + z,    b_i ∈ {−1, +1},  α_i and z in fp16,  z the optional offset ("extended BCQ")

It is a codebook with 2^q entries per group: the code of a weight is its q sign bits (bit i of the code set
<=> b_i = +1, plane 0 the least significant bit) and the group's table is every signed sum
``table[c] = z + Σ_i α_i (2 bit_i(c) − 1)``. So BCQ runs as a learned-codebook quantizer
(``qpass.fake_quantize_ext`` with the table as its codebook and a scale of 1, nearest entry = the exhaustive
search over the 2^q sign combinations): every backend that lowers per-group codebooks runs it.

Formats (registered on import): ``bcq1``..``bcq8`` (no offset) and ``bcq1z``..``bcq8z`` (with offset). They
are codebooks (kind ``codebook``) whose storage is what a LUT-GEMM kernel keeps: q bits per weight and q α's
(+ z) per group in fp16; the 2^q-entry table is derived from them and the scale is a constant 1
(``table_values`` / ``stores_scale`` of the format, read by ``qpass.eval``'s bit accounting).

Fit (:func:`bcq_fit`): greedy (Guo et al. 2017, as LUT-GEMM's reference): r = w − z, then for each plane
b_i = sign(r), α_i = mean|r|, r −= α_i b_i; then alternating refinement (Xu et al. 2018): least squares for
(α, z) given B, then B given (α, z) by exhaustive search over the 2^q combinations, a few iterations. Each
step never increases the group's squared error (a step that would, through float rounding, is not taken).
:func:`from_uniform` converts a uniform INT-q grid with zero point to BCQ(q) with offset exactly (the paper's
sanity check; an optional start for the fit). Never imports torch.fx.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from qpass.primitives.formats import Codebook, nearest, register_format


@dataclass(frozen=True)
class BinaryCoding(Codebook):
    """BCQ with `bits` = q binary planes (and an offset when `offset`): a codebook of 2^q signed sums per block."""

    offset: bool = False

    @property
    def name(self) -> str:
        return f"bcq{self.bits}{'z' if self.offset else ''}"

    @property
    def table_values(self) -> int:
        """fp16 values stored per block: the q α's and the offset (the table is derived from them)."""
        return self.bits + int(self.offset)

    stores_scale = False          # the scale is 1: α and z are in weight units


for _q in range(1, 9):
    for _z in (False, True):
        register_format(BinaryCoding(_q, _z))


def format_name(q: int, offset: bool) -> str:
    return BinaryCoding(q, offset).name


def signs(q: int, dtype=torch.float32, device=None) -> Tensor:
    """[2^q, q] ±1: row c holds the sign of each plane for code c (bit i of c set <=> plane i is +1)."""
    c = torch.arange(2 ** q, device=device)
    bits = (c.unsqueeze(-1) >> torch.arange(q, device=device)) & 1
    return (2 * bits - 1).to(dtype)


def table(alpha: Tensor, z: Tensor | None) -> Tensor:
    """[..., q] α (and [...] z) -> [..., 2^q] the codebook of every signed sum (code order as `signs`)."""
    t = alpha @ signs(alpha.shape[-1], alpha.dtype, alpha.device).t()
    return t if z is None else t + z.unsqueeze(-1)


def encode(w: Tensor, alpha: Tensor, z: Tensor | None) -> Tensor:
    """[..., g] weights -> [..., g] codes (int64): the nearest signed sum, i.e. B given α by exhaustive search."""
    return nearest(w, table(alpha, z).unsqueeze(-2))


def decode(codes: Tensor, alpha: Tensor, z: Tensor | None) -> Tensor:
    t = table(alpha, z)
    return torch.gather(t, -1, codes.long())


def group_error(w: Tensor, alpha: Tensor, z: Tensor | None, codes: Tensor) -> Tensor:
    """[...] squared error of each group ([..., g] weights)."""
    return (w - decode(codes, alpha, z)).pow(2).sum(-1)


def greedy(w: Tensor, q: int, offset: bool) -> tuple[Tensor, Tensor | None, Tensor]:
    """Greedy BCQ of each group ([..., g] weights): (α [..., q], z [...] or None, codes [..., g]).
    z = the group mean (offset), then each plane takes the sign of the residual (0 -> +1) and α its mean |.|."""
    z = w.mean(-1) if offset else None
    r = w - z.unsqueeze(-1) if offset else w.clone()
    alphas, codes = [], torch.zeros(w.shape, dtype=torch.long, device=w.device)
    for i in range(q):
        pos = r >= 0
        b = torch.where(pos, 1.0, -1.0).to(w.dtype)
        a = r.abs().mean(-1)
        r = r - a.unsqueeze(-1) * b
        alphas.append(a)
        codes |= pos.long() << i
    return torch.stack(alphas, -1), z, codes


def least_squares(w: Tensor, codes: Tensor, q: int, offset: bool) -> tuple[Tensor, Tensor | None]:
    """(α, z) minimising each group's squared error for fixed planes (minimum-norm solution when B is rank
    deficient, e.g. two equal planes). Solved in float64."""
    # AᵀA and Aᵀw from each code's count and sum in the group (A's rows are the sign rows of the codes)
    sg = signs(q, torch.float64, w.device)
    if offset:
        sg = torch.cat([sg, torch.ones_like(sg[:, :1])], -1)
    shape = (*w.shape[:-1], 2 ** q)
    count = torch.zeros(shape, dtype=torch.float64, device=w.device).scatter_add_(
        -1, codes.long(), torch.ones_like(w, dtype=torch.float64))
    total = torch.zeros(shape, dtype=torch.float64, device=w.device).scatter_add_(-1, codes.long(), w.double())
    gram = torch.einsum("...c,ci,cj->...ij", count, sg, sg)    # integer: singular exactly or det >= 1
    rhs = (total @ sg).unsqueeze(-1)
    chol, info = torch.linalg.cholesky_ex(gram)
    piv = torch.diagonal(chol, dim1=-2, dim2=-1)
    bad = (info != 0) | (piv.pow(2) < 1e-9 * torch.diagonal(gram, dim1=-2, dim2=-1).amax(-1, keepdim=True)).any(-1)
    sol = torch.cholesky_solve(rhs, torch.where(bad[..., None, None], torch.eye(gram.shape[-1], dtype=gram.dtype),
                                                chol))
    if bad.any():                                      # rank deficient (equal planes, a constant plane): pinv
        sol[bad] = torch.linalg.pinv(gram[bad], hermitian=True) @ rhs[bad]
    sol = sol.squeeze(-1).to(w.dtype)
    return (sol[..., :q], sol[..., q]) if offset else (sol, None)


@dataclass
class BcqFit:
    alpha: Tensor            # [..., q]
    z: Tensor | None         # [...]
    codes: Tensor            # [..., g] int64
    error: Tensor            # [...] squared error per group

    @property
    def table(self) -> Tensor:
        return table(self.alpha, self.z)


def refine(w: Tensor, alpha: Tensor, z: Tensor | None, codes: Tensor, iterations: int) -> BcqFit:
    """Alternating refinement: least squares (α, z) given B, then B given (α, z) by exhaustive search; a group
    keeps its previous (α, z, B) wherever a step would raise its error (float rounding), so the error never
    increases."""
    q, offset = alpha.shape[-1], z is not None
    err = group_error(w, alpha, z, codes)
    for _ in range(iterations):
        a2, z2 = least_squares(w, codes, q, offset)
        c2 = encode(w, a2, z2)
        e2 = group_error(w, a2, z2, c2)
        better = e2 <= err
        alpha = torch.where(better.unsqueeze(-1), a2, alpha)
        z = torch.where(better, z2, z) if offset else None
        codes = torch.where(better.unsqueeze(-1), c2, codes)
        err = torch.minimum(e2, err)
    return BcqFit(alpha, z, codes, err)


def from_uniform(scale: Tensor, zero_point: Tensor | None, bits: int) -> tuple[Tensor, Tensor]:
    """A uniform grid ``s (c − zp)``, c = 0..2^bits − 1 (zp None: symmetric int codes −2^(b−1)..2^(b−1) − 1)
    as BCQ(q = bits) with offset, exactly: α_i = s 2^(i−1) (i = 0..q−1), z = s ((2^bits − 1)/2 − zp); the BCQ
    code is c. Returns (α [..., q], z)."""
    s = scale
    alpha = s.unsqueeze(-1) * (2.0 ** (torch.arange(bits, dtype=s.dtype, device=s.device) - 1))
    zp = zero_point.to(s.dtype) if zero_point is not None else torch.full_like(s, 2.0 ** (bits - 1))
    return alpha, s * ((2 ** bits - 1) / 2 - zp)


def _minmax_start(w: Tensor, q: int) -> tuple[Tensor, Tensor]:
    """The asymmetric min-max INT-q grid of each group (RTN's), as BCQ with offset (a start for the fit)."""
    lo, hi = w.amin(-1), w.amax(-1)
    s = ((hi - lo) / (2 ** q - 1)).clamp_min(torch.finfo(w.dtype).tiny)
    return from_uniform(s, -lo / s, q)      # unrounded zero point: the grid spans [lo, hi] exactly


def bcq_fit(w: Tensor, q: int, *, offset: bool = True, iterations: int = 15, init: str = "greedy",
            storage_dtype: torch.dtype | None = torch.float16) -> BcqFit:
    """BCQ of each group of `w` ([..., g]; the fit is per last-dim row): greedy start (init 'greedy', the paper),
    or also the min-max uniform grid converted exactly (init 'best': per group the start whose refined error is
    lower, so a group is never worse than RTN's min-max grid; needs the offset), then `iterations` rounds of
    alternating refinement. `storage_dtype` (fp16: what the kernel stores): α and z are rounded to it. The returned
    codes are always searched again (exhaustively) for the final α and z: the nearest entries of the table, as
    the codebook quantizer encodes (never a higher error than the refinement's)."""
    if not 1 <= q <= 8:
        raise ValueError(f"BCQ has 1..8 planes, got {q}")
    if init not in ("greedy", "best"):
        raise ValueError(f"init is 'greedy' or 'best', got {init!r}")
    if init == "best" and not offset:
        raise ValueError("init 'best' starts from the uniform grid, which needs the offset")
    w = w.float()
    fit = refine(w, *greedy(w, q, offset), iterations)
    if init == "best":
        a0, z0 = _minmax_start(w, q)
        alt = refine(w, a0, z0, encode(w, a0, z0), iterations)
        pick = alt.error < fit.error
        fit = BcqFit(torch.where(pick.unsqueeze(-1), alt.alpha, fit.alpha), torch.where(pick, alt.z, fit.z),
                     torch.where(pick.unsqueeze(-1), alt.codes, fit.codes), torch.minimum(alt.error, fit.error))
    alpha, z = fit.alpha, fit.z
    if storage_dtype is not None:
        alpha = alpha.to(storage_dtype).float()
        z = z.to(storage_dtype).float() if offset else None
    codes = encode(w, alpha, z)          # the nearest entries: what the codebook quantizer computes from the table
    return BcqFit(alpha, z, codes, group_error(w, alpha, z, codes))


def bcq_weight(w: Tensor, q: int, group_size: int, **kw) -> tuple[Tensor, BcqFit]:
    """BCQ of a weight [out, in] in groups of `group_size` input columns (-1: one group per row; a partial last
    group when `group_size` does not divide `in`, as the other quantizers' blocks): the per-group table
    [out, ceil(in / g), 2^q] and the fit (codes [out, in], error [out, ceil(in / g)])."""
    out, n = w.shape
    g = n if group_size == -1 else min(group_size, n)
    full = n // g * g
    rows = max(1, _CHUNK // max(n << q, 1))          # the exhaustive search holds [rows, n, 2^q]: bound it
    fits = []
    for r in range(0, out, rows):
        wr = w[r:r + rows]
        parts = [bcq_fit(wr[:, :full].reshape(wr.shape[0], n // g, g), q, **kw)]
        if full < n:
            parts.append(bcq_fit(wr[:, full:].reshape(wr.shape[0], 1, n - full), q, **kw))
        fits.append(_cat(parts, 1, wr.shape[0]))
    fit = _cat(fits, 0, None)
    return fit.table, fit


_CHUNK = 1 << 24


def _cat(fits: list[BcqFit], dim: int, rows: int | None) -> BcqFit:
    cat = lambda ts: torch.cat(ts, dim)   # noqa: E731
    codes = [f.codes.reshape(rows, -1) for f in fits] if rows is not None else [f.codes for f in fits]
    return BcqFit(cat([f.alpha for f in fits]), None if fits[0].z is None else cat([f.z for f in fits]),
                  cat(codes), cat([f.error for f in fits]))


__all__ = ["BinaryCoding", "BcqFit", "bcq_fit", "bcq_weight", "greedy", "refine", "least_squares", "encode",
           "decode", "table", "signs", "from_uniform", "format_name", "group_error"]
