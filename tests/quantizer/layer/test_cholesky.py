"""The one inverse Cholesky (GPTQ's and the sequential pass's): a factor of H⁻¹, and the ridge rule."""
from __future__ import annotations

import pytest
import torch

from vqdm.quantizer.layer.cholesky import inverse_cholesky

pytestmark = pytest.mark.usefixtures("one_thread")


def correlated_h(d=48, seed=0):
    """A positive definite float64 H with correlated, unequal channels."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(500, d, generator=gen, dtype=torch.float64) @ (
        torch.eye(d, dtype=torch.float64) + 0.4 * torch.randn(d, d, generator=gen, dtype=torch.float64))
    x *= torch.exp(torch.randn(d, generator=gen, dtype=torch.float64))
    return x.T @ x / 500


def test_inverse_cholesky_factors_the_inverse_and_survives_a_singular_h():
    h = correlated_h()
    u = inverse_cholesky(h)
    torch.testing.assert_close(u.T @ u, torch.linalg.inv(h), rtol=1e-8, atol=1e-8)
    assert torch.equal(u, torch.triu(u))
    x = torch.randn(5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    singular = x.T @ x  # rank 5 of 16
    u = inverse_cholesky(singular)
    assert torch.isfinite(u).all() and torch.equal(u, torch.triu(u))


def test_the_first_ridge_that_works_is_the_one_used():
    x = torch.randn(5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    singular = x.T @ x  # rank 5 of 16: a zero ridge fails, 0.5 works
    u = inverse_cholesky(singular, [0.0, 0.5, 2.0])
    torch.testing.assert_close(u.T @ u, torch.linalg.inv(singular + 0.5 * torch.eye(16, dtype=torch.float64)),
                               rtol=1e-8, atol=1e-8)
    with pytest.raises(ValueError, match="not positive definite"):
        inverse_cholesky(singular, [0.0])
