"""Scalar baselines: round-to-nearest (RTN) and GPTQ, per-group asymmetric, returned as dense fp32.

Both use the same quantizer per row and group of `group_size` consecutive inputs: 2^bits levels
spread from the group's min to its max, Ŵ = lo + step·clamp(round((W − lo)/step), 0, 2^bits − 1),
with `lo` and `step` rounded to fp16 because that is how they would be stored. The storage cost is
`bits + 32/group_size` bits per weight (`scalar_bits_per_weight`), which is what every report
compares AQ with.

GPTQ (Frantar et al., 2022) quantizes columns left to right and spreads each column's error over
the columns not yet quantized, using the Cholesky factor of H⁻¹ (H damped by 1% of its mean
diagonal). Group parameters are computed when the search reaches a group's first column, from
the already error-compensated weights, as in the reference implementation.
"""
from __future__ import annotations

import torch

from vqdm.quantizer.layer.cholesky import inverse_cholesky
from vqdm.quantizer.layer.error import check_weight_and_h

GPTQ_BLOCK = 128  # columns per lazy-update block (the reference implementation's choice)
GPTQ_DAMPING = 0.01  # fraction of mean(diag H) added to the diagonal


def scalar_bits_per_weight(bits: int, group_size: int) -> float:
    """Bits per weight of a grouped scalar format: the codes plus an fp16 step and an fp16 offset per group."""
    return bits + 32 / group_size


def _check(w: torch.Tensor, bits: int, group_size: int) -> None:
    if w.dim() != 2:
        raise ValueError(f"W must be a matrix [n, d], got shape {tuple(w.shape)}")
    if not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"bits={bits!r} is not supported: need an integer in [1, 16]")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size={group_size!r} is not supported: need an integer >= 1")


def group_params(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, step) per row of x [n, k] for an asymmetric min/max grid of 2^bits levels, fp16-rounded."""
    lo = x.min(1).values
    hi = x.max(1).values
    step = (hi - lo) / (2**bits - 1)
    lo16 = lo.half().float()
    step16 = step.half().float()
    # A constant group (hi == lo) or a step below fp16's range: any positive step reproduces lo exactly.
    step16 = torch.where(step16 > 0, step16, torch.ones_like(step16))
    return lo16, step16


def quantize_to_grid(x: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest grid point: x [n, k] (or [n]) with per-row lo, step [n]."""
    if x.dim() == 2:
        lo, step = lo[:, None], step[:, None]
    q = torch.clamp(torch.round((x - lo) / step), 0, 2**bits - 1)
    return lo + q * step


def rtn_quantize(w: torch.Tensor, bits: int = 4, group_size: int = 128) -> torch.Tensor:
    """Round-to-nearest per group of `group_size` inputs (the last group may be shorter): dense fp32 [n, d]."""
    _check(w, bits, group_size)
    w = w.detach().float()
    out = torch.empty_like(w)
    for c in range(0, w.shape[1], group_size):
        part = w[:, c:c + group_size]
        lo, step = group_params(part, bits)
        out[:, c:c + group_size] = quantize_to_grid(part, lo, step, bits)
    return out


def _extra_damping(h: torch.Tensor) -> list[float]:
    """Ridges for `inverse_cholesky` of the already damped H: none, then 1e-3·mean(diag H), growing tenfold."""
    mean_diag = float(torch.diagonal(h).mean())
    ridges = [0.0]
    for _ in range(5):
        ridges.append(max(ridges[-1] * 10, 1e-3 * mean_diag))
    return ridges


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, h: torch.Tensor, bits: int = 4, group_size: int = 128,
                  damping: float = GPTQ_DAMPING, block_size: int = GPTQ_BLOCK) -> torch.Tensor:
    """GPTQ with per-group asymmetric min/max grids: W [n, d], H [d, d] (mean x xᵀ) -> dense fp32 [n, d].

    Dead inputs (H_ii = 0: never active in calibration) get weight 0 in the search, as in the
    reference, and their column is quantized on that group's grid like any other.
    """
    _check(w, bits, group_size)
    check_weight_and_h(w, h)
    n, d = w.shape
    # The factorisation in float64 where it is cheap; fp32 (the reference's precision) for the widest convs.
    fdtype = torch.float64 if d <= 8192 else torch.float32
    hh = h.detach().to(w.device, fdtype).clone()
    hh = (hh + hh.T) * 0.5
    w = w.detach().float().clone()
    dead = torch.diagonal(hh) == 0
    hh[dead, dead] = 1.0
    w[:, dead] = 0.0
    hh.diagonal().add_(damping * float(torch.diagonal(hh).mean()))
    hinv = inverse_cholesky(hh, _extra_damping(hh)).float()  # [d, d] upper
    del hh
    # Blocks must start at group boundaries so a group's grid is set from up-to-date columns.
    block = max(group_size, (block_size // group_size) * group_size) if group_size <= block_size else group_size
    q_out = torch.empty_like(w)
    lo = step = None
    for b0 in range(0, d, block):
        b1 = min(b0 + block, d)
        w1 = w[:, b0:b1].clone()
        err1 = torch.empty_like(w1)
        hinv1 = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if col % group_size == 0:
                lo, step = group_params(w1[:, i:i + group_size], bits)
            wc = w1[:, i]
            qc = quantize_to_grid(wc, lo, step, bits)
            q_out[:, col] = qc
            e = (wc - qc) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, b1:] -= err1 @ hinv[b0:b1, b1:]
    return q_out
