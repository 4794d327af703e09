"""Sequential code pass with error feedback: the Cholesky fast path against the textbook OBS update."""
from __future__ import annotations

import itertools

import pytest
import torch

from vqdm.quantizer.layer import sequential_pass
from vqdm.quantizer.layer.sequential_pass import group_order, sequential_code_pass
from vqdm.vq_format import decode_groups

pytestmark = pytest.mark.usefixtures("one_thread")


def make_layer(n=10, d=48, g=4, k=2, q=8, seed=0):
    """Random float64 layer with a correlated PD H, random codebooks and codes."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(500, d, generator=gen, dtype=torch.float64) @ (
        torch.eye(d, dtype=torch.float64) + 0.4 * torch.randn(d, d, generator=gen, dtype=torch.float64))
    x *= torch.exp(torch.randn(d, generator=gen, dtype=torch.float64))  # unequal channels: act-order matters
    h = x.T @ x / 500
    w = torch.randn(n, d, generator=gen, dtype=torch.float64)
    books = 0.3 * torch.randn(k, q, g, generator=gen, dtype=torch.float64)
    codes = torch.randint(0, q, (n, d // g, k), generator=gen)
    scales = 0.5 + torch.rand(n, generator=gen, dtype=torch.float64)
    return w, h, codes, books, scales


def mean_row_loss(w, h, codes, books, scales):
    n, d = w.shape
    r = w - decode_groups(codes, books).reshape(n, d) * scales[:, None]
    return float(((r @ h) * r).sum()) / n


def reference_pass(w, h, books, scales):
    """Plain OBS, no Cholesky: exhaustive choice of each group's K codes, explicit inverses.

    For the free columns F (group J first among them), with S = (H_FF)⁻¹: the cost of fixing
    J is ‖w_J − ŵ_J‖² under (S_JJ)⁻¹ and the rest of F moves by −(w_J − ŵ_J)(S_JJ)⁻¹ S_{J,F∖J}.
    """
    n, d = w.shape
    k, q, g = books.shape
    combos = list(itertools.product(range(q), repeat=k))
    vecs = torch.stack([sum(books[m, c[m]] for m in range(k)) for c in combos])  # [q^K, g]
    work = w.clone()
    codes = torch.zeros(n, d // g, k, dtype=torch.long)
    order = group_order(h, g).tolist()
    for t, j in enumerate(order):
        free = [c for jj in order[t:] for c in range(jj * g, (jj + 1) * g)]
        s_inv = torch.linalg.inv(h[free][:, free])
        metric = torch.linalg.inv(s_inv[:g, :g])
        diff = work[:, None, j * g:(j + 1) * g] - scales[:, None, None] * vecs[None]  # [n, q^K, g]
        best = ((diff @ metric) * diff).sum(-1).argmin(1)
        codes[:, j] = torch.tensor(combos)[best]
        err = work[:, j * g:(j + 1) * g] - scales[:, None] * vecs[best]
        rest = free[g:]
        work[:, rest] -= err @ metric @ s_inv[:g, g:]
    return codes


def test_matches_the_textbook_update_with_an_exhaustive_choice():
    w, h, codes, books, scales = make_layer()
    q = books.shape[1]
    # K = 2 and beam ≥ 2^B: the beam keeps every first-codebook choice, so it is exhaustive
    fast, _ = sequential_code_pass(w, h, codes, books, scales, beam_size=q, generator=torch.Generator().manual_seed(0))
    assert torch.equal(fast, reference_pass(w, h, books, scales))


def test_loss_is_the_sum_of_group_errors(monkeypatch):
    # W − Ŵ = E·U, so Σ‖E‖² is the exact loss; also across row chunks and feedback blocks
    monkeypatch.setattr(sequential_pass, "BLOCK_GROUPS", 5)
    w, h, codes, books, scales = make_layer(n=13, d=64, g=4, k=3, q=8, seed=1)
    new, loss = sequential_code_pass(w, h, codes, books, scales, beam_size=4,
                                     generator=torch.Generator().manual_seed(0), max_rows=4)
    assert loss == pytest.approx(mean_row_loss(w, h, new, books, scales), rel=1e-9)
    # a pass from scratch beats the random codes it started from by far
    assert loss < 0.5 * mean_row_loss(w, h, codes, books, scales)

