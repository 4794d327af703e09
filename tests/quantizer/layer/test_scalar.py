"""Scalar baselines: RTN and GPTQ (per-group asymmetric min/max grids, fp16 grid parameters)."""
from __future__ import annotations

import pytest
import torch

from vqdm.quantizer import gptq_quantize, relative_error, rtn_quantize, scalar_bits_per_weight
from vqdm.quantizer.layer.scalar import group_params


pytestmark = pytest.mark.usefixtures("one_thread")


def correlated(n=96, d=256, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.eye(d) + 1.2 * torch.randn(d, d, generator=gen) / d**0.5
    x = torch.randn(3000, d, generator=gen) @ mix * torch.linspace(0.3, 3.0, d)
    return torch.randn(n, d, generator=gen), (x.T @ x / 3000).double()


def distinct_per_group(wq: torch.Tensor, group: int) -> int:
    return max(len(torch.unique(wq[i, c:c + group])) for i in range(wq.shape[0]) for c in range(0, wq.shape[1], group))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_rtn_is_nearest_on_a_min_max_grid(bits):
    w, _ = correlated(n=16, d=256)
    wq = rtn_quantize(w, bits=bits, group_size=64)
    assert wq.shape == w.shape and wq.dtype == torch.float32
    assert distinct_per_group(wq, 64) <= 2**bits
    for c in range(0, 256, 64):
        lo, step = group_params(w[:, c:c + 64], bits)
        part = w[:, c:c + 64]
        # each weight within half a step of its grid point (+ fp16 rounding of lo/step at the ends)
        assert ((wq[:, c:c + 64] - part).abs() <= step[:, None] * 0.5 + 1e-3 * part.abs().max()).all()
        # and the grid is the group's own: its extremes are (nearly) reproduced
        torch.testing.assert_close(wq[:, c:c + 64].min(1).values, part.min(1).values, atol=2e-3, rtol=2e-3)


def test_rtn_partial_last_group_and_constant_groups():
    w = torch.randn(4, 100)
    w[:, :32] = 0.25  # a constant group is reproduced (fp16-exact value)
    wq = rtn_quantize(w, bits=3, group_size=32)
    assert torch.equal(wq[:, :32], w[:, :32])
    assert distinct_per_group(wq[:, 96:], 4) <= 4


def test_gptq_with_identity_h_is_rtn():
    # H = I: H⁻¹ is diagonal, so no error is propagated and GPTQ reduces to round-to-nearest.
    w = torch.randn(32, 256)
    torch.testing.assert_close(gptq_quantize(w, torch.eye(256), bits=3, group_size=128),
                               rtn_quantize(w, bits=3, group_size=128), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_beats_rtn_on_correlated_inputs(bits):
    w, h = correlated()
    gptq = gptq_quantize(w, h, bits=bits, group_size=128)
    assert distinct_per_group(gptq, 128) <= 2**bits  # still a valid grouped scalar format
    e_gptq = relative_error(w, gptq, h)
    e_rtn = relative_error(w, rtn_quantize(w, bits=bits, group_size=128), h)
    assert e_gptq < 0.8 * e_rtn


def test_gptq_small_groups_and_block_alignment():
    w, h = correlated(n=16, d=192)
    for group in (32, 48, 192):  # groups smaller than, not dividing, and larger than the 128-column block
        wq = gptq_quantize(w, h, bits=4, group_size=group)
        assert distinct_per_group(wq, group) <= 16
        assert relative_error(w, wq, h) < relative_error(w, rtn_quantize(w, 4, group), h)


def test_gptq_dead_columns():
    w, h = correlated(n=8, d=128)
    h[5, :] = 0
    h[:, 5] = 0
    wq = gptq_quantize(w, h.float(), bits=4, group_size=128)
    assert torch.isfinite(wq).all()
    assert relative_error(w, wq, h) < 0.05


def test_bits_and_validation():
    assert scalar_bits_per_weight(4, 128) == 4.25
    assert scalar_bits_per_weight(3, 128) == 3.25
    with pytest.raises(ValueError, match="bits"):
        rtn_quantize(torch.randn(4, 8), bits=0)
    with pytest.raises(ValueError, match="group_size"):
        rtn_quantize(torch.randn(4, 8), bits=4, group_size=0)
    with pytest.raises(ValueError, match=r"H must be \[d, d\]"):
        gptq_quantize(torch.randn(4, 8), torch.eye(4))
