"""Least-squares codebooks and scales against the exact solution on tiny shapes."""
import pytest
import torch

from vqdm.quantizer.layer.codebook_fit import fit_codebooks, fit_scales
from vqdm.vq_format import decode_groups

pytestmark = pytest.mark.usefixtures("one_thread")


def make_layer(n=20, d=16, g=4, k=2, q=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(300, d, generator=gen, dtype=torch.float64) @ (
        torch.eye(d, dtype=torch.float64) + 0.5 * torch.randn(d, d, generator=gen, dtype=torch.float64))
    h = x.T @ x / 300
    w = torch.randn(n, d, generator=gen, dtype=torch.float64)
    codes = torch.randint(0, q, (n, d // g, k), generator=gen)
    books = torch.randn(k, q, g, generator=gen, dtype=torch.float64)
    scales = 0.5 + torch.rand(n, generator=gen, dtype=torch.float64)
    return w, h, codes, books, scales


def loss(w, h, codes, books, scales):
    n, d = w.shape
    r = scales[:, None] * decode_groups(codes, books).reshape(n, d) - w
    return float(((r @ h) * r).sum())


def test_codebooks_reach_the_exact_least_squares_minimum():
    w, h, codes, books, scales = make_layer()
    n, d = w.shape
    k, q, g = books.shape
    chol = torch.linalg.cholesky(h)  # L = ‖(sU(C) − W)·chol‖²: a linear least-squares problem in C
    columns = []
    for i in range(k * q * g):
        unit = torch.zeros(k * q * g, dtype=torch.float64)
        unit[i] = 1
        columns.append(((scales[:, None] * decode_groups(codes, unit.view(k, q, g)).reshape(n, d)) @ chol).reshape(-1))
    design = torch.stack(columns, 1)
    exact = torch.linalg.lstsq(design, (w @ chol).reshape(-1, 1), driver="gelsd").solution.view(k, q, g)
    fitted = fit_codebooks(w, h, codes, books, scales, iters=200)
    assert loss(w, h, codes, fitted, scales) == pytest.approx(loss(w, h, codes, exact, scales), rel=1e-9)
    assert loss(w, h, codes, fit_codebooks(w, h, codes, books, scales, iters=3), scales) < loss(w, h, codes, books, scales)


def test_scales_are_the_per_row_optimum():
    w, h, codes, books, scales = make_layer(seed=1)
    fitted = fit_scales(w, h, codes, books, scales)
    base = loss(w, h, codes, books, fitted)
    for i in (0, 7, 13):
        for step in (1e-3, -1e-3):
            nudged = fitted.clone()
            nudged[i] += step
            assert loss(w, h, codes, books, nudged) > base


def test_quantize_weight_with_the_least_squares_fit_instead_of_adam():
    from vqdm.quantizer import AQConfig, quantize_weight, relative_error

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(512, 64, generator=gen) * torch.exp(torch.randn(64, generator=gen))
    h = x.T @ x / 512
    w = torch.randn(64, 64, generator=gen)
    qw = quantize_weight(w, h, AQConfig(num_codebooks=2, cg_iters=10, adam_steps=0, beam_size=2, max_rounds=2,
                                        kmeans_iters=5))
    assert qw.stats["seconds_by_phase"]["lsq"] > 0
    assert qw.rel_error < qw.stats["init_rel_error"]
    assert qw.rel_error == pytest.approx(relative_error(w, qw.dequantize(), h), rel=1e-5)
