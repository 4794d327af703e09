"""Full-reference image metrics, per image, in plain torch: PSNR and SSIM.

SSIM follows Wang et al. 2004: an 11-tap gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03,
"valid" filtering (no padding), population (co)variances, the SSIM map averaged over positions
and channels. For inputs smaller than the window, the window shrinks to the largest odd size that
fits (tiny test latents), and `ssim_window` says which size was used.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"expected two [N, C, H, W] tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float | torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB [N] of [N, C, H, W] images; inf where they are identical.

    `data_range`: a number, or one per image [N] (latents: the reference's max - min).
    """
    _check_pair(x, y)
    mse = ((x.double() - y.double()) ** 2).flatten(1).mean(1)
    peak = torch.as_tensor(data_range, dtype=torch.float64).expand_as(mse)
    out = 10 * torch.log10(peak**2 / mse)
    return torch.where(mse == 0, torch.full_like(out, math.inf), out)


def ssim_window(height: int, width: int, window: int = SSIM_WINDOW) -> int:
    size = min(window, height, width)
    return size if size % 2 else size - 1


def gaussian_window(size: int, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalised 1-D gaussian taps [size] (float64)."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-(r**2) / (2 * sigma**2))
    return w / w.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float | torch.Tensor, window: int = SSIM_WINDOW,
         sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Per-image mean SSIM [N] of [N, C, H, W] images (1 where identical)."""
    _check_pair(x, y)
    n, c, h, w = x.shape
    size = ssim_window(h, w, window)
    if size < 1:
        raise ValueError(f"images of {h}x{w} are too small for SSIM")
    g = gaussian_window(size, sigma).to(x.device)
    kh, kw = g.view(1, 1, size, 1).expand(c, 1, size, 1), g.view(1, 1, 1, size).expand(c, 1, 1, size)

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable gaussian, valid region, per channel
        return F.conv2d(F.conv2d(t, kh, groups=c), kw, groups=c)

    x, y = x.double(), y.double()
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    peak = torch.as_tensor(data_range, dtype=torch.float64, device=x.device).reshape(-1, 1, 1, 1)
    c1, c2 = (SSIM_K1 * peak) ** 2, (SSIM_K2 * peak) ** 2
    smap = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return smap.flatten(1).mean(1)
