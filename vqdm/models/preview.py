"""Cheap previews of a sampler's intermediate state, for streamed partial images.

A VAE decode per preview would cost about as much as the final decode (for SDXL at 1024², more than
a denoising step). Instead each model gets a linear map, fitted once by least squares from its own
VAE, from each latent cell's 3×3 neighbourhood (edges repeated; C·9 values and a 1) to the f×f RGB
block of pixels that cell decodes to (f: the VAE's downscale factor): in effect a one-layer linear
decoder. The fit data are the VAE's own decodes (the preview should predict what the VAE will draw,
not its input) of two sets of latents: a fixed set of colour, gradient and smooth-noise images it
encodes, and seeded unit-normal latents, the spread a sampler's estimate has. A per-cell map (C
values → one RGB) was tried first: on the shipped digits model its previews fell well short of the
correlation with the real decode that tests/models/test_preview.py asks for; this map meets it.

Applied to the scheduler's estimate of the clean latents (`clean_estimate`) it gives a soft,
roughly right image at the output size. `fit_latent_preview` runs the VAE (40 images of 8×8 latent
cells, once per model, at the first request for partial images); the rest is pure tensor math.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vqdm.models.vae import vae_decode

FIT_LATENT_SIDE = 8  # fit latents are 8×8 cells: 64² pixels for SDXL's VAE
_FIT_COLOURS = [(-1, -1, -1), (1, 1, 1), (0, 0, 0), (1, -1, -1), (-1, 1, -1), (-1, -1, 1), (1, 1, -1), (-1, 1, 1),
                (1, -1, 1), (0.5, 0, -0.5)]
_FIT_NOISE_IMAGES = 6
_FIT_RANDOM_LATENTS = 20


@dataclass(frozen=True)
class LatentPreview:
    """Pixels (RGB in [-1, 1]) of each latent cell's factor×factor block = [its 3×3 neighbourhood, 1] @
    weight, for latents as the pipeline's sampler holds them (normalised: scaled, and shifted where
    the VAE has latents_mean)."""

    weight: torch.Tensor  # [C·9 + 1, 3·factor·factor], float32
    factor: int


def fit_images(side: int) -> torch.Tensor:
    """[N, 3, side, side] in [-1, 1]: flat colours, gradients and seeded smooth noise (fixed for a side)."""
    flat = [torch.tensor(c, dtype=torch.float32).view(3, 1, 1).expand(3, side, side) for c in _FIT_COLOURS]
    ramp = torch.linspace(-1, 1, side)
    h, v = ramp.view(1, side).expand(side, side), ramp.view(side, 1).expand(side, side)
    gradients = [torch.stack([h, v, -h]), torch.stack([v, -h, h]), torch.stack([(h + v) / 2] * 3),
                 torch.stack([-v, v * h, h])]
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(_FIT_NOISE_IMAGES, 3, 4, 4, generator=g) * 2 - 1
    noise = F.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=False).clamp(-1, 1)
    return torch.cat([torch.stack(flat + gradients), noise])


def normalise_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """The VAE's raw latents as the SDXL pipeline's sampler holds them (the inverse of `vae_decode`'s
    first step)."""
    cfg = vae.config
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:
        mean = torch.tensor(mean).view(1, -1, 1, 1).to(z)
        std = torch.tensor(std).view(1, -1, 1, 1).to(z)
        return (z - mean) * cfg.scaling_factor / std
    return z * cfg.scaling_factor


def _neighbourhoods(latents: torch.Tensor) -> torch.Tensor:
    """[N·h·w, C·9 + 1]: each cell's 3×3 neighbourhood (edges repeated) and a 1, cells in row-major order."""
    n, c, h, w = latents.shape
    patches = F.unfold(F.pad(latents.float(), (1, 1, 1, 1), mode="replicate"), 3)  # [N, C·9, h·w]
    patches = patches.permute(0, 2, 1).reshape(n * h * w, c * 9)
    return torch.cat([patches, patches.new_ones(len(patches), 1)], dim=1)


def _blocks(images: torch.Tensor, factor: int) -> torch.Tensor:
    """[N·h·w, 3·factor²]: each latent cell's block of pixels of `images` [N, 3, h·factor, w·factor]."""
    blocks = F.unfold(images.float(), factor, stride=factor)  # [N, 3·factor², h·w]
    return blocks.permute(0, 2, 1).reshape(-1, blocks.shape[1])


def fit_linear_map(latents: torch.Tensor, images: torch.Tensor, factor: int) -> LatentPreview:
    """Least squares from latents [N, C, h, w] to images [N, 3, h·factor, w·factor]; cells with
    non-finite values (an fp16 VAE can overflow) are left out of the fit."""
    x, y = _neighbourhoods(latents), _blocks(images, factor)
    ok = torch.isfinite(x).all(1) & torch.isfinite(y).all(1)
    weight = torch.linalg.lstsq(x[ok], y[ok], driver="gelsd").solution
    return LatentPreview(weight=weight.contiguous(), factor=factor)


def fit_latent_preview(pipe) -> LatentPreview:
    """The preview map of `pipe`'s VAE (runs its encoder on 20 small images and its decoder on 40)."""
    vae, factor = pipe.vae, pipe.vae_scale_factor
    device, dtype = next(vae.parameters()).device, vae.dtype
    images = fit_images(FIT_LATENT_SIDE * factor).to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    channels = vae.config.latent_channels
    noise = torch.randn(_FIT_RANDOM_LATENTS, channels, FIT_LATENT_SIDE, FIT_LATENT_SIDE, generator=g)
    with torch.inference_mode():
        encoded = normalise_latents(vae, vae.encode(images).latent_dist.mean)
        latents = torch.cat([encoded, noise.to(encoded)])
        decoded = vae_decode(pipe, latents).float().clamp(-1, 1)
    return fit_linear_map(latents.float().cpu(), decoded.cpu(), factor)


def preview_rgb(latents: torch.Tensor, preview: LatentPreview) -> torch.Tensor:
    """uint8 [N, h·factor, w·factor, 3] on the CPU: the image the map predicts the VAE would decode."""
    n, _, h, w = latents.shape
    f = preview.factor
    blocks = _neighbourhoods(latents) @ preview.weight.to(latents.device)  # [N·h·w, 3·f²]
    blocks = blocks.reshape(n, h * w, -1).permute(0, 2, 1)
    rgb = F.fold(blocks, (h * f, w * f), f, stride=f)  # blocks do not overlap: fold just places them
    return ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def clean_estimate(scheduler, output) -> torch.Tensor | None:
    """The clean-latent estimate of the step that returned `output` (a scheduler output object):
    `pred_original_sample` where the scheduler reports it (Euler, Euler ancestral, DDIM); for the
    multistep solvers that predict data (DPM-Solver++, UniPC), the converted model output they keep;
    else None."""
    x0 = getattr(output, "pred_original_sample", None)
    if x0 is not None:
        return x0
    cfg = scheduler.config
    predicts_data = (getattr(cfg, "algorithm_type", "") in ("dpmsolver++", "sde-dpmsolver++")
                     or getattr(cfg, "predict_x0", False))
    outputs = getattr(scheduler, "model_outputs", None)
    return outputs[-1] if predicts_data and outputs and outputs[-1] is not None else None


def preview_steps(total_steps: int, count: int) -> list[int]:
    """The denoising steps (1-based) after which to send `count` partial images, evenly spaced and
    never the last step (the final image follows it): fewer when there are fewer earlier steps."""
    count = min(count, total_steps - 1)
    # With count < total_steps the spacing is at least one step, so the rounded steps are distinct.
    return [round((j + 1) * total_steps / (count + 1)) for j in range(max(count, 0))]
