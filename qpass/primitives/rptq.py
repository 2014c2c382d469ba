"""RPTQ's numerics (Yuan et al. 2023): cluster channels by their calibration (min, max) range, order the clusters.

``kmeans(points, k, seed)`` is Lloyd's algorithm on the 2-D (min, max) points with a seeded k-means++ start;
``cluster_ranges`` gives each cluster's (min, max), from which one static (scale, zero point) per cluster is
chosen; ``cluster_order`` lays the channels out cluster by cluster (clusters sorted by their centre), the
permutation RPTQ folds into the producer and the consumers. Pure tensor math; never imports torch.fx.
"""
from __future__ import annotations

import torch
from torch import Tensor


def kmeans(points: Tensor, k: int, seed: int = 0, iterations: int = 100) -> Tensor:
    """Labels in [0, k') (k' = min(k, distinct points)) of `points` [n, d] by k-means (squared Euclidean),
    k-means++ initialisation from a generator seeded with `seed`; every label in [0, k') is used."""
    x = points.detach().double().cpu()
    n = x.shape[0]
    distinct = torch.unique(x, dim=0)
    k = max(1, min(int(k), distinct.shape[0]))
    if k >= distinct.shape[0]:          # one cluster per distinct point: exact, no search
        return torch.unique(x, dim=0, return_inverse=True)[1]
    gen = torch.Generator().manual_seed(int(seed))
    centres = distinct[torch.randint(distinct.shape[0], (1,), generator=gen)]
    for _ in range(1, k):               # k-means++: next centre with probability ~ squared distance
        d2 = torch.cdist(distinct, centres).amin(1) ** 2
        centres = torch.cat([centres, distinct[torch.multinomial(d2 / d2.sum(), 1, generator=gen)]])
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iterations):
        new = torch.cdist(x, centres).argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = labels == j
            if members.any():
                centres[j] = x[members].mean(0)
            else:                       # an empty cluster takes the point farthest from its centre
                far = (x - centres[labels]).pow(2).sum(1).argmax()
                centres[j], labels[far] = x[far], j
    return _compact(labels)


def _compact(labels: Tensor) -> Tensor:
    return torch.unique(labels, return_inverse=True)[1]


def cluster_ranges(lo: Tensor, hi: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per cluster (min of the mins, max of the maxes), each [clusters]."""
    k = int(labels.max()) + 1 if labels.numel() else 0
    cmin = torch.full((k,), float("inf"), dtype=torch.float64).scatter_reduce(0, labels, lo.double(), "amin")
    cmax = torch.full((k,), float("-inf"), dtype=torch.float64).scatter_reduce(0, labels, hi.double(), "amax")
    return cmin, cmax


def cluster_order(lo: Tensor, hi: Tensor, labels: Tensor, blocks: list[Tensor]) -> Tensor:
    """A permutation (new channel i = old ``perm[i]``) that, inside each block of channel indices (the channels
    a permutation may move among themselves: everything, or one attention head), puts the channels cluster by
    cluster, clusters sorted by their centre ((min + max) / 2, then label), channels in order within a cluster."""
    cmin, cmax = cluster_ranges(lo, hi, labels)
    centre = (cmin + cmax) / 2
    rank = torch.empty_like(labels)
    rank[torch.tensor(sorted(range(centre.numel()), key=lambda j: (float(centre[j]), j)), dtype=torch.long)] = \
        torch.arange(centre.numel())
    perm = torch.arange(labels.numel())
    for b in blocks:
        b = b.long().sort().values
        key = rank[labels[b]] * labels.numel() + b          # cluster rank first, then the channel index
        perm[b] = b[key.argsort()]
    return perm


__all__ = ["kmeans", "cluster_ranges", "cluster_order"]
