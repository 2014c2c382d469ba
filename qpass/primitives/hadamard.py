"""Hadamard and random orthogonal matrices, and the fast Walsh-Hadamard transform (QuaRot, QuIP#).

A size ``n`` is split as ``n = m * p`` with ``p`` a power of two and ``m`` the order of a small Hadamard matrix
qpass can build: 1, or ``q + 1`` for a prime ``q = 3 (mod 4)`` (Paley's first construction: 12, 20, 24, 44, 48,
60, 68, 72, 84, ...). The normalised transform is then ``T = kron(H_m, H_p) / sqrt(n)``, applied to a row
vector as ``x T``: view ``x`` as ``[..., m, p]``, a fast Walsh-Hadamard transform over the last axis
(``p log p`` additions, no matrix), then ``H_mᵀ`` mixes the ``m`` axis. 256 = 1 x 256, 704 = 44 x 16,
192 = 12 x 16, 768 = 12 x 64. Sizes with no such split fall back to a seeded random orthogonal matrix (Haar, by
QR) as the small factor.

``randomized_hadamard(n, seed)`` is ``D T`` with D random signs (QuaRot's residual rotation); ``mean_preserving``
turns any orthogonal Q into one that fixes the all-ones vector (``Q 1 = 1``), so that a LayerNorm, which
subtracts the mean over channels, commutes with it (see passes/rotate.py).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

_SMALL_MAX = 256          # largest Paley order tried for the non-power-of-two factor


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def sylvester(n: int) -> Tensor:
    """The ±1 Sylvester Hadamard matrix of order n (a power of two), float64, symmetric."""
    if not is_pow2(n):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(math.isqrt(q)) + 1))


def paley(m: int) -> Tensor | None:
    """A ±1 Hadamard matrix of order m = q + 1, q prime and q = 3 (mod 4) (Paley I), float64; None otherwise."""
    q = m - 1
    if not (_is_prime(q) and q % 4 == 3):
        return None
    residues = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if i in residues else -1.0 for i in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q).view(1, q) - torch.arange(q).view(q, 1)) % q
    s = chi[idx]                                          # Jacobsthal matrix: S[i, j] = chi(j - i)
    h = torch.empty(m, m, dtype=torch.float64)
    h[0, :] = 1.0
    h[1:, 0] = -1.0
    h[1:, 1:] = s + torch.eye(q, dtype=torch.float64)
    return h


def split(n: int) -> tuple[int, int, Tensor | None]:
    """(m, p, H_m ±1 or None) with n = m * p, p the largest power of two for which m has a Hadamard matrix
    (H_1 = [[1]]); None with m = n / largest power of two when no split works."""
    p = n & -n
    while p >= 1:
        m = n // p
        if m == 1:
            return 1, p, torch.ones(1, 1, dtype=torch.float64)
        if m <= _SMALL_MAX and m % 4 == 0:
            h = paley(m)
            if h is not None:
                return m, p, h
        p //= 2
    p = n & -n
    return n // p, p, None


def random_orthogonal(n: int, seed: int) -> Tensor:
    """A Haar-random orthogonal [n, n] float64 matrix from `seed` (QR of a Gaussian, signs fixed)."""
    g = torch.Generator().manual_seed(int(seed))
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r)).view(1, n)).contiguous()


def small_factor(n: int, seed: int = 0) -> tuple[Tensor, str]:
    """The normalised [m, m] factor of size n's transform and its kind ("hadamard": H_m / sqrt(m), m = 1
    for powers of two; "random": a seeded random orthogonal matrix where no Hadamard split exists)."""
    m, _, h = split(n)
    if h is not None:
        return h / math.sqrt(m), "hadamard"
    return random_orthogonal(m, seed), "random"


def random_signs(n: int, seed: int) -> Tensor:
    """[n] float64 of ±1 from `seed` (the D of a randomized Hadamard)."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2 - 1


def transform_matrix(n: int, factor: Tensor) -> Tensor:
    """The dense [n, n] matrix of ``hadamard_transform(x, factor)``: kron(factor, H_p / sqrt(p))."""
    m = factor.shape[0]
    p = n // m
    return torch.kron(factor.double().contiguous(), sylvester(p) / math.sqrt(p))


_RADIX = 16          # butterfly stages are fused in groups of log2(16) = 4: one small matmul per group


def fwht(x: Tensor) -> Tensor:
    """Normalised fast Walsh-Hadamard transform over the last axis (a power of two p): ``x H_p / sqrt(p)``.
    Mixed radix: ``H_p = H_r1 ⊗ H_r2 ⊗ ...`` with every r <= 16, one batched [r, r] product per factor, so the
    cost is p * sum(r) multiply-adds (p log p for radix 2) in ceil(log2(p) / 4) calls, never a [p, p] matrix."""
    p = x.shape[-1]
    if not is_pow2(p):
        raise ValueError(f"the fast Walsh-Hadamard transform needs a power-of-two size, got {p}")
    shape = x.shape
    y = x.reshape(-1, p)
    inner = p
    while inner > 1:
        r = min(_RADIX, inner)
        inner //= r
        h = _sylvester_cached(r, x.dtype, x.device)
        y = torch.matmul(h, y.reshape(-1, r, inner)) if inner > 1 else torch.matmul(y.reshape(-1, r), h)
    return (y.reshape(shape) * (1.0 / math.sqrt(p))).to(x.dtype)


_CACHE: dict = {}


def _sylvester_cached(r: int, dtype, device) -> Tensor:
    key = (r, dtype, str(device))
    if key not in _CACHE:
        _CACHE[key] = sylvester(r).to(dtype=dtype, device=device)
    return _CACHE[key]


def hadamard_transform(x: Tensor, factor: Tensor, signs: Tensor | None = None) -> Tensor:
    """``(x * signs) @ kron(factor, H_p / sqrt(p))`` over the last axis (n = m * p, factor [m, m], signs [n] of ±1 or
    None): a fast Walsh-Hadamard transform of each of the m blocks of p channels, then the m blocks mixed by
    ``factorᵀ`` (skipped for m = 1). The signs keep a common mode (all-positive inputs, e.g. after ReLU) from
    landing on the first output channel, which Hadamard's all-ones first column would make one huge outlier."""
    if signs is not None:
        x = x * signs.to(x.dtype)
    n, m = x.shape[-1], factor.shape[0]
    if factor.dim() != 2 or factor.shape[1] != m or n % m or not is_pow2(n // m):
        raise ValueError(f"hadamard transform of size {n} with a [{m}, {factor.shape[-1]}] factor: the size must be "
                         "the factor's order times a power of two")
    if m == 1:
        return fwht(x) * factor.reshape(()).to(x.dtype)
    z = fwht(x.reshape(*x.shape[:-1], m, n // m))
    return torch.matmul(factor.t().to(x.dtype), z).reshape(x.shape)


def randomized_hadamard(n: int, seed: int) -> tuple[Tensor, str]:
    """QuaRot's residual rotation ``Q = D T``: random signs (from `seed`) times the normalised transform of size
    n ("hadamard"), whose small factor is random orthogonal where n has no Hadamard split ("hadamard_random")."""
    factor, kind = small_factor(n, seed)
    signs = random_signs(n, seed)
    return signs.view(n, 1) * transform_matrix(n, factor), ("hadamard" if kind == "hadamard" else "hadamard_random")


def mean_preserving(q: Tensor) -> Tensor:
    """``M Q`` with M the Householder reflection taking ``Q u`` to ``u = 1 / sqrt(n)``: orthogonal, and
    ``(M Q) 1 = 1``, so ``mean(x M Q) = mean(x)`` and centring commutes with it."""
    n = q.shape[0]
    u = torch.full((n,), 1.0 / math.sqrt(n), dtype=torch.float64)
    w = q.double() @ u
    v = w - u
    norm = float(v.norm())
    if norm < 1e-12:
        return q.double()
    v = v / norm
    return q.double() - 2.0 * torch.outer(v, v @ q.double())


# ------------------------------------------------------------------------------------ the graph op


def _register() -> None:
    @torch.library.custom_op("qpass::hadamard", mutates_args=())
    def hadamard(x: Tensor, factor: Tensor, signs: Optional[Tensor] = None) -> Tensor:
        """``hadamard_transform(x, factor, signs)``: the online Hadamard of the rotate pass (one node per use)."""
        return hadamard_transform(x, factor, signs).contiguous()

    @hadamard.register_fake
    def _(x, factor, signs=None):
        if factor.dim() != 2 or (signs is not None and signs.dim() != 1):
            raise ValueError("qpass::hadamard takes a [m, m] factor and optional [n] signs")
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    def _backward(ctx, grad):
        g = hadamard_transform(grad, ctx.factor.t())        # (x S T)' = grad Tᵀ S; Tᵀ = kron(Fᵀ, H_p)
        return (g if ctx.signs is None else g * ctx.signs.to(g.dtype)), None, None

    def _setup(ctx, inputs, output):
        ctx.factor, ctx.signs = inputs[1], inputs[2] if len(inputs) > 2 else None

    hadamard.register_autograd(_backward, setup_context=_setup)


def _registered() -> bool:
    try:
        torch.ops.qpass.hadamard.default
    except (AttributeError, RuntimeError):
        return False
    return True


if not _registered():
    _register()

HADAMARD = torch.ops.qpass.hadamard.default     # the node target passes insert and backends match


__all__ = ["HADAMARD", "is_pow2", "sylvester", "paley", "split", "random_orthogonal", "small_factor", "random_signs",
           "transform_matrix", "fwht", "hadamard_transform", "randomized_hadamard", "mean_preserving"]
