"""Beam search over AQ codes: the delta formula, the fast pass, and its guarantees, against brute force."""
from __future__ import annotations

import itertools

import pytest
import torch

from vqdm.quantizer.layer.beam_search import beam_search_pass, candidate_losses
from vqdm.vq_format import decode_groups


pytestmark = pytest.mark.usefixtures("one_thread")


def make_layer(n=12, d=16, g=4, k=2, q=16, seed=0, dtype=torch.float64):
    """A random layer with a correlated (ill-conditioned but PD) H and random codes/codebooks."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(400, d, generator=gen, dtype=torch.float64) @ (
        torch.eye(d, dtype=torch.float64) + 0.5 * torch.randn(d, d, generator=gen, dtype=torch.float64))
    h = (x.T @ x / 400).to(dtype)
    w = torch.randn(n, d, generator=gen, dtype=dtype)
    books = 0.5 * torch.randn(k, q, g, generator=gen, dtype=dtype)
    codes = torch.randint(0, q, (n, d // g, k), generator=gen)
    scales = 0.5 + torch.rand(n, generator=gen, dtype=dtype)
    return w, h, codes, books, scales


def row_losses(w, h, codes, books, scales):
    """Brute force: ℓ_i = (w_i − ŵ_i) H (w_i − ŵ_i)ᵀ from a full float64 decode."""
    n, d = w.shape
    r = w.double() - decode_groups(codes, books.double()).reshape(n, d) * scales.double()[:, None]
    return ((r @ h.double()) * r).sum(1)


def test_delta_formula_equals_brute_force_for_every_single_change():
    w, h, codes, books, scales = make_layer()
    n, groups, k = codes.shape
    q = books.shape[1]
    for j, m in [(0, 0), (1, 1), (3, 0), (2, 1)]:
        pred = candidate_losses(w, h, codes, books, scales, j, m)  # [n, q]
        assert pred.shape == (n, q)
        for cand in range(q):
            changed = codes.clone()
            changed[:, j, m] = cand
            torch.testing.assert_close(pred[:, cand], row_losses(w, h, changed, books, scales), rtol=1e-10, atol=1e-10)
    # the current code reproduces the current loss
    cur = candidate_losses(w, h, codes, books, scales, 1, 0).gather(1, codes[:, 1, 0:1].long())[:, 0]
    torch.testing.assert_close(cur, row_losses(w, h, codes, books, scales), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("beam", [1, 3, 8])
def test_pass_gain_equals_true_loss_change_and_never_increases(beam):
    w, h, codes, books, scales = make_layer(n=20, d=24, g=4, k=3, seed=beam)
    before = row_losses(w, h, codes, books, scales)
    new, gain = beam_search_pass(w, h, codes, books, scales, beam, torch.Generator().manual_seed(0))
    after = row_losses(w, h, new, books, scales)
    assert new.shape == codes.shape and new.dtype == torch.int64
    torch.testing.assert_close(after - before, gain, rtol=1e-8, atol=1e-9)  # float64 run: exact bookkeeping
    assert (after <= before + 1e-12).all()  # every row, not just the total
    assert after.sum() < 0.8 * before.sum()  # random codes leave a lot to gain


def test_pass_in_float32_tracks_the_loss_and_never_increases():
    w, h, codes, books, scales = make_layer(n=64, d=32, g=8, k=2, q=256, seed=3, dtype=torch.float32)
    before = row_losses(w, h, codes, books, scales)
    new, gain = beam_search_pass(w, h, codes, books, scales, 8, torch.Generator().manual_seed(1))
    after = row_losses(w, h, new, books, scales)
    assert (after <= before * (1 + 1e-5)).all()
    torch.testing.assert_close(after - before, gain, rtol=1e-3, atol=1e-3 * float(before.mean()))


def test_greedy_single_step_picks_the_argmin_of_the_formula():
    # One group, one codebook: the pass is a single (j, m) step, so greedy must take the best candidate.
    w, h, codes, books, scales = make_layer(n=30, d=4, g=4, k=1, q=16, seed=5)
    new, _ = beam_search_pass(w, h, codes, books, scales, 1, torch.Generator().manual_seed(0))
    best = candidate_losses(w, h, codes, books, scales, 0, 0).argmin(1)
    assert torch.equal(new[:, 0, 0], best)


def test_full_width_beam_is_exhaustive_over_one_group():
    # K = 2 codebooks and beam = 2^B: the first step keeps every codeword of one codebook, the second
    # scores all 2^B × 2^B pairs, so the result must be the brute-force optimum of the group.
    q = 16
    w, h, codes, books, scales = make_layer(n=10, d=4, g=4, k=2, q=q, seed=7)
    new, _ = beam_search_pass(w, h, codes, books, scales, q, torch.Generator().manual_seed(0))
    got = row_losses(w, h, new, books, scales)
    best = torch.full((10,), float("inf"), dtype=torch.float64)
    for a, b in itertools.product(range(q), range(q)):
        trial = torch.tensor([a, b]).expand(10, 1, 2)
        best = torch.minimum(best, row_losses(w, h, trial, books, scales))
    torch.testing.assert_close(got, best, rtol=1e-10, atol=1e-12)


def test_row_chunks_and_blocks_do_not_change_the_result():
    w, h, codes, books, scales = make_layer(n=24, d=32, g=4, k=2, seed=9)
    a, ga = beam_search_pass(w, h, codes, books, scales, 4, torch.Generator().manual_seed(2))
    b, gb = beam_search_pass(w, h, codes, books, scales, 4, torch.Generator().manual_seed(2), block_groups=3, max_rows=7)
    assert torch.equal(a, b)
    torch.testing.assert_close(ga, gb)


def test_same_generator_seed_same_codes():
    w, h, codes, books, scales = make_layer(n=16, d=32, g=4, k=3, seed=4)
    a, _ = beam_search_pass(w, h, codes, books, scales, 4, torch.Generator().manual_seed(123))
    b, _ = beam_search_pass(w, h, codes, books, scales, 4, torch.Generator().manual_seed(123))
    assert torch.equal(a, b)
