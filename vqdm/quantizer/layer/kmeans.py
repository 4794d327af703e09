"""Euclidean k-means and the residual k-means initialisation of AQ codebooks (SPEC §3.4).

`residual_kmeans_init` cuts the scale-normalised rows W/s into g-vectors and runs K rounds; round m
fits 2^B centroids (codebook m) to what codebooks 0..m-1 left over. Plain torch, batched over all
points; distances are computed in chunks so millions of points (a 1280×11520 conv has 1.8 M
g-vectors) never materialise a [points, centroids] matrix at once.
"""
from __future__ import annotations

import torch

# Points per distance chunk: 262k × 256 centroids × 4 bytes = 256 MiB of scratch at most.
_POINT_CHUNK = 1 << 18
# k-means++ seeding runs on a random subsample of this many points per centroid (the usual
# trick for large data sets: seeding quality saturates long before it sees every point).
_SEED_POINTS_PER_CENTROID = 64


def nearest(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index of the nearest centroid [N] int64, squared distance to it [N]) for x [N, g]."""
    c_sq = centroids.square().sum(1)  # [k]
    idx = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    dist = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[0], _POINT_CHUNK):
        xs = x[start:start + _POINT_CHUNK]
        # ‖x−c‖² = ‖x‖² − 2 x·c + ‖c‖²; argmin does not need ‖x‖².
        part = torch.addmm(c_sq[None, :], xs, centroids.T, alpha=-2.0)  # [chunk, k]
        val, arg = part.min(1)
        idx[start:start + xs.shape[0]] = arg
        dist[start:start + xs.shape[0]] = (val + xs.square().sum(1)).clamp_min(0.0)
    return idx, dist


def kmeans_plusplus(x: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii) on a subsample of x [N, g] -> centroids [k, g]."""
    n = x.shape[0]
    sample = min(n, k * _SEED_POINTS_PER_CENTROID)
    if sample < n:
        x = x[torch.randperm(n, generator=generator, device="cpu")[:sample].to(x.device)]
    first = int(torch.randint(sample, (1,), generator=generator))
    centroids = [x[first]]
    d2 = (x - x[first]).square().sum(1)
    for _ in range(1, k):
        # Draw with probability ∝ d2 by inverting the cumulative sum: 8x cheaper per draw than
        # torch.multinomial, which dominated the init of small layers.
        cum = torch.cumsum(d2, 0)
        total = float(cum[-1])
        if total <= 0.0:  # fewer distinct points than centroids: the rest start on existing points
            pick = int(torch.randint(sample, (1,), generator=generator))
        else:
            u = torch.rand(1, generator=generator, dtype=torch.float64).item() * total
            pick = min(int(torch.searchsorted(cum, torch.tensor([u], dtype=cum.dtype, device=cum.device))), sample - 1)
        centroids.append(x[pick])
        d2 = torch.minimum(d2, (x - x[pick]).square().sum(1))
    return torch.stack(centroids)


def kmeans(
    x: torch.Tensor,
    k: int,
    iters: int = 100,
    tol: float = 1e-4,
    generator: torch.Generator | None = None,
    points_per_centroid: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's algorithm from k-means++ seeds: (centroids [k, g], assignment [N] int64).

    Stops after `iters` iterations or when the mean squared distance improves by less than `tol`
    (relative). An empty cluster is re-seeded on the point currently worst served, so all k
    centroids stay in use while there are at least k distinct points. With `points_per_centroid`
    > 0, Lloyd runs on a random subsample of k·points_per_centroid points (faiss's default is 256:
    centroids stop moving long before every point of a 1.8 M-point conv is seen) and every point is
    then assigned to its nearest centroid.
    """
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"k-means needs points [N, g] with N > 0, got shape {tuple(x.shape)}")
    if points_per_centroid < 0:
        raise ValueError(f"points_per_centroid must be >= 0 (0: every point), got {points_per_centroid}")
    sample = k * points_per_centroid
    if 0 < sample < x.shape[0]:
        pick = torch.randperm(x.shape[0], generator=generator, device="cpu")[:sample].to(x.device)
        centroids, _ = kmeans(x[pick], k, iters, tol, generator)
        return centroids, nearest(x, centroids)[0]
    centroids = kmeans_plusplus(x, k, generator)
    assign, dist = nearest(x, centroids)
    prev = float(dist.mean())
    for _ in range(iters):
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        nonempty = counts > 0
        centroids = torch.where(nonempty[:, None], sums / counts.clamp_min(1)[:, None].to(x.dtype), centroids)
        empty = (~nonempty).nonzero().flatten()
        if empty.numel():
            worst = dist.topk(min(empty.numel(), x.shape[0])).indices
            centroids[empty[:worst.numel()]] = x[worst]
        assign, dist = nearest(x, centroids)
        cur = float(dist.mean())
        if prev - cur <= tol * max(prev, 1e-30):
            break
        prev = cur
    return centroids, assign


def residual_kmeans_init(
    w_normed: torch.Tensor,
    num_codebooks: int,
    codebook_size: int,
    group_size: int,
    iters: int = 100,
    tol: float = 1e-4,
    generator: torch.Generator | None = None,
    points_per_centroid: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codebooks [K, 2^B, g] and codes [n, d/g, K] int64 for the scale-normalised weight [n, d].

    Round m fits codebook m to the residual left by rounds 0..m-1 (residual vector quantization),
    a good starting point for the joint (additive) optimisation that follows.
    """
    n, d = w_normed.shape
    residual = w_normed.reshape(n * (d // group_size), group_size).clone()  # [n·d/g, g]
    books, codes = [], []
    for _ in range(num_codebooks):
        c, a = kmeans(residual, codebook_size, iters, tol, generator, points_per_centroid)
        residual -= c[a]
        books.append(c)
        codes.append(a.reshape(n, d // group_size))
    return torch.stack(books), torch.stack(codes, dim=-1)
