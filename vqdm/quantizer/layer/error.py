"""The layer-output error every quantizer is judged by (SPEC §3): L(Ŵ) = tr((Ŵ−W) H (Ŵ−W)ᵀ)/n.

With H = mean x xᵀ over calibration inputs, L is the mean squared output error per output channel,
so L(Ŵ)/L(0) (L(0) = tr(W H Wᵀ)/n) is the relative output error of any method: AQ, RTN, GPTQ.
Computed in float64: H from real activations is ill-conditioned (outlier features), and the
quadratic form cancels badly in float32.
"""
from __future__ import annotations

import torch

# Rows per matmul chunk: bounds the float64 copies to ~chunk·d·16 bytes for the widest layers.
_ROW_CHUNK = 1024


def check_weight_and_h(w: torch.Tensor, h: torch.Tensor) -> None:
    """W [n, d] and H [d, d], or a ValueError naming the shapes (shared by every quantizer)."""
    if w.dim() != 2:
        raise ValueError(f"W must be a matrix [n, d], got shape {tuple(w.shape)} (convs: use weight_matrix)")
    d = w.shape[1]
    if h.shape != (d, d):
        raise ValueError(f"H must be [d, d] = [{d}, {d}] for W of shape {tuple(w.shape)}, got {tuple(h.shape)}")


def quadratic_loss(delta: torch.Tensor, h: torch.Tensor) -> float:
    """tr(Δ H Δᵀ)/n for Δ [n, d] and H [d, d], in float64."""
    check_weight_and_h(delta, h)
    h64 = h.to(torch.float64)
    total = torch.zeros((), dtype=torch.float64, device=delta.device)
    for rows in delta.split(_ROW_CHUNK):
        r = rows.to(h64.device, torch.float64)
        total += ((r @ h64) * r).sum()
    return float(total) / delta.shape[0]


def layer_loss(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """L(Ŵ) = tr((Ŵ−W) H (Ŵ−W)ᵀ)/n in float64."""
    if w.shape != w_hat.shape:
        raise ValueError(f"weight {tuple(w.shape)} and its approximation {tuple(w_hat.shape)} differ in shape")
    return quadratic_loss(w_hat.to(torch.float64) - w.to(torch.float64), h)


def relative_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ) / tr(W H Wᵀ): 0 is exact, 1 is as bad as a zero weight."""
    base = quadratic_loss(w, h)
    if base <= 0.0:
        raise ValueError("tr(W H Wᵀ) is 0 (zero weight or H): the relative error is undefined")
    return layer_loss(w, w_hat, h) / base


rel_err = relative_error  # short alias: rel_err(W, Ŵ, H)
