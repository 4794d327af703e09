"""Least-squares fit of the codebooks and scales of one layer with its codes fixed.

With the codes fixed, Ŵ = diag(s)·U(C) is linear in the codebooks C, so for fixed scales the loss
L(C) = tr((Ŵ − W) H (Ŵ − W)ᵀ)/n is a convex quadratic in C: its minimiser solves the normal
equations A·C = b with
    A·D = Σ_i s_i scatter(s_i·(U(D)_i H))     (one decode, one [n, d]×[d, d] GEMM, one scatter)
    b   = Σ_i s_i scatter(w_i H)
`fit_codebooks` solves them by conjugate gradients with a Jacobi preconditioner (diag A =
Σ over a codeword's uses of s_i² diag(H_JJ)); an iteration costs what one Adam step costs, and CG
reaches the minimiser that Adam only approaches. For fixed codebooks each scale has a closed form,
s_i = ⟨u_i, w_i⟩_H / ⟨u_i, u_i⟩_H (`fit_scales`, one GEMM).
"""
from __future__ import annotations

import torch

from vqdm.vq_format import decode_groups


def _scatter(per_group: torch.Tensor, flat_idx: list[torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """Sum [n·G, g] per-group vectors into the codewords they use: -> [K, 2^B, g]."""
    k, q, g = shape
    out = torch.zeros(k * q, g, dtype=per_group.dtype, device=per_group.device)
    for idx in flat_idx:
        out.index_add_(0, idx, per_group)
    return out.view(k, q, g)


def fit_codebooks(w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor,
                  scales: torch.Tensor, iters: int, tol: float = 1e-10) -> torch.Tensor:
    """Codebooks minimising L for these codes and scales: `iters` preconditioned CG steps from `codebooks`.

    Stops early once the preconditioned residual has fallen by `tol` (relative, squared).
    """
    n, d = w.shape
    shape = codebooks.shape
    g = shape[2]
    flat_idx = [(codes[..., m].long() + m * shape[1]).reshape(-1) for m in range(shape[0])]
    s = scales[:, None]

    def apply_a(dc: torch.Tensor) -> torch.Tensor:
        dw = s * decode_groups(codes, dc).reshape(n, d)
        return _scatter((s * (dw @ h)).reshape(-1, g), flat_idx, shape)

    resid = s * decode_groups(codes, codebooks).reshape(n, d) - w
    r = -_scatter((s * (resid @ h)).reshape(-1, g), flat_idx, shape)  # b − A·C
    diag_h = torch.diagonal(h).reshape(1, d // g, g)
    diag_a = _scatter(((s * s)[:, :, None] * diag_h).expand(n, d // g, g).reshape(-1, g), flat_idx, shape)
    inv_diag = torch.where(diag_a > 0, 1.0 / diag_a.clamp_min(torch.finfo(diag_a.dtype).tiny), torch.zeros_like(diag_a))
    x = codebooks.clone()
    z = r * inv_diag
    p = z.clone()
    rz = (r * z).sum()
    rz0 = float(rz)
    for _ in range(iters):
        if float(rz) <= tol * rz0:
            break
        ap = apply_a(p)
        curvature = (p * ap).sum()
        if curvature <= 0:
            break
        alpha = rz / curvature
        x += alpha * p
        r -= alpha * ap
        z = r * inv_diag
        rz, rz_old = (r * z).sum(), rz
        p = z + (rz / rz_old) * p
    return x


def fit_scales(w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor,
               scales: torch.Tensor) -> torch.Tensor:
    """Per-row scales minimising L for these codes and codebooks (rows with ⟨u, u⟩_H = 0 keep theirs)."""
    n, d = w.shape
    u = decode_groups(codes, codebooks).reshape(n, d)
    uh = u @ h
    num, den = (uh * w).sum(1), (uh * u).sum(1)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), scales)


def fit_codebooks_and_scales(w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor,
                             scales: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codebooks, then the exact scales for them, then the codebooks again (codes fixed): (codebooks, scales).

    Each fit is optimal for what it holds fixed, so in exact arithmetic the loss cannot rise.
    """
    books = fit_codebooks(w, h, codes, codebooks, scales, iters)
    scales = fit_scales(w, h, codes, books, scales)
    return fit_codebooks(w, h, codes, books, scales, iters), scales
