"""The one VAE decode of final latents, shared by evaluation and the server."""
from __future__ import annotations

import torch


def vae_decode(pipe, latents: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Images [N, 3, H, W] in about [-1, 1] on the VAE's device, from final latents, in `dtype` (default:
    the VAE's). Undoes the latent normalisation as the SDXL pipeline does: with the VAE's
    latents_mean / latents_std when it has them, else by its scaling factor. No grad-mode
    handling: callers run it under no_grad / inference_mode."""
    vae = pipe.vae
    cfg = vae.config
    z = latents.to(device=next(vae.parameters()).device, dtype=dtype or vae.dtype)
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:
        mean = torch.tensor(mean).view(1, -1, 1, 1).to(z)
        std = torch.tensor(std).view(1, -1, 1, 1).to(z)
        z = z * std / cfg.scaling_factor + mean
    else:
        z = z / cfg.scaling_factor
    return vae.decode(z, return_dict=False)[0]
