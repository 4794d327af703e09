"""k-means and the residual k-means initialisation of AQ codebooks."""
from __future__ import annotations

import pytest
import torch

from vqdm.quantizer import AQConfig, quantize_weight, relative_error
from vqdm.quantizer.layer.kmeans import kmeans, nearest, residual_kmeans_init


pytestmark = pytest.mark.usefixtures("one_thread")


def test_nearest_matches_cdist():
    gen = torch.Generator().manual_seed(0)
    x, c = torch.randn(1000, 8, generator=gen), torch.randn(37, 8, generator=gen)
    idx, dist = nearest(x, c)
    full = torch.cdist(x, c).square()
    assert torch.equal(idx, full.argmin(1))
    torch.testing.assert_close(dist, full.min(1).values, rtol=1e-4, atol=1e-5)


def test_recovers_separated_clusters():
    gen = torch.Generator().manual_seed(1)
    centers = 10 * torch.randn(16, 4, generator=gen)
    labels = torch.arange(16).repeat_interleave(50)
    x = centers[labels] + 0.05 * torch.randn(800, 4, generator=gen)
    c, a = kmeans(x, 16, iters=50, generator=torch.Generator().manual_seed(0))
    # each true cluster maps to exactly one centroid, and the centroids sit on the true centers
    pairs = torch.unique(torch.stack([labels, a]), dim=1)
    assert pairs.shape[1] == 16
    err = torch.cdist(c, centers).min(1).values
    assert float(err.max()) < 0.05


def test_no_empty_clusters_with_enough_distinct_points():
    # 300 points on only 40 distinct locations, some heavily repeated, 32 centroids: every centroid
    # must end up owning points (empty clusters are re-seeded).
    gen = torch.Generator().manual_seed(2)
    spots = torch.randn(40, 8, generator=gen)
    x = spots[torch.cat([torch.zeros(200, dtype=torch.long), torch.randint(0, 40, (100,), generator=gen)])]
    c, a = kmeans(x, 32, iters=100, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(c).all()
    assert (torch.bincount(a, minlength=32) > 0).all()


def test_residual_rounds_reduce_the_error():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(128, 64, generator=gen)
    books, codes = residual_kmeans_init(w, 3, 32, 8, iters=30, generator=torch.Generator().manual_seed(0))
    assert books.shape == (3, 32, 8) and codes.shape == (128, 8, 3)
    errs = []
    for k in range(1, 4):
        approx = sum(books[m][codes[..., m]] for m in range(k)).reshape(128, 64)
        errs.append(float((approx - w).square().sum() / w.square().sum()))
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 0.6 * errs[0]


def test_kmeans_init_beats_random_codes():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2000, 128, generator=gen) * torch.linspace(0.2, 2.0, 128)
    h = (x.T @ x / 2000).double()
    w = torch.randn(64, 128, generator=gen) @ (torch.eye(128) + 0.1 * torch.randn(128, 128, generator=gen))
    qw = quantize_weight(w, h, AQConfig(num_codebooks=2, max_rounds=0, kmeans_iters=30))
    init = relative_error(w, qw.dequantize(), h)
    assert qw.rounds == 0
    assert init == pytest.approx(qw.stats["init_rel_error"], rel=1e-6)
    # random codes into the same codebooks, same scales
    rand_codes = torch.randint(0, 256, qw.codes.shape, generator=gen, dtype=torch.uint8)
    from vqdm.kernels.reference import dequantize
    rand = relative_error(w, dequantize(rand_codes, qw.codebooks, qw.scales), h)
    assert init < 0.3 * rand


def test_subsampled_lloyd_assigns_every_point_to_its_nearest_centroid():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 8, generator=gen)
    centroids, assign = kmeans(x, 16, iters=20, generator=gen, points_per_centroid=32)  # Lloyd on 512 points
    assert centroids.shape == (16, 8) and assign.shape == (20000,)
    assert torch.equal(assign, torch.cdist(x, centroids).argmin(1))
    full, _ = kmeans(x, 16, iters=20, generator=torch.Generator().manual_seed(0))
    mse = lambda c: float(torch.cdist(x, c).min(1).values.square().mean())  # noqa: E731
    assert mse(centroids) < 1.1 * mse(full)  # a subsample is enough to place 16 centroids
    with pytest.raises(ValueError, match="points_per_centroid"):
        kmeans(x, 16, points_per_centroid=-1)
