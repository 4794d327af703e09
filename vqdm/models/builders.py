"""Build SDXL-architecture U-Nets and whole pipelines from presets, with seeded random weights."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from vqdm.models.configs import Preset
from vqdm.models.tokenizers import build_clip_tokenizer


def _preset(preset: str | Preset) -> Preset:
    return preset if isinstance(preset, Preset) else Preset.from_name(preset)


def _device_ctx(device: str | torch.device):
    # Constructing under the meta device allocates nothing: a 2.6 B-parameter plan costs no RAM.
    return torch.device(device) if str(device) == "meta" else contextlib.nullcontext()


def build_unet(preset: str | Preset, seed: int = 0, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32):
    """A diffusers UNet2DConditionModel with the preset's config; seeded default init."""
    from diffusers import UNet2DConditionModel  # deferred: seconds to import; the CLI parser loads vqdm.models

    p = _preset(preset)
    torch.manual_seed(seed)
    with _device_ctx(device):
        unet = UNet2DConditionModel.from_config(p.unet)
    if str(device) != "meta" and (torch.device(device).type != "cpu" or dtype != torch.float32):
        unet = unet.to(device=device, dtype=dtype)
    return unet.eval()


def build_pipeline(preset: str | Preset, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A complete StableDiffusionXLPipeline (both text encoders, tokenizers, VAE, scheduler)."""
    # deferred: diffusers and transformers take seconds to import, vqdm.models loads with the CLI parser
    from diffusers import (AutoencoderKL, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                           StableDiffusionXLPipeline)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    p = _preset(preset)
    unet = build_unet(p, seed=seed, dtype=dtype)
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(CLIPTextConfig(**p.text_encoder)).eval()
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**p.text_encoder_2)).eval()
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL.from_config(p.vae).eval()
    sched_cls = {"EulerDiscreteScheduler": EulerDiscreteScheduler,
                 "EulerAncestralDiscreteScheduler": EulerAncestralDiscreteScheduler}[p.scheduler["_class_name"]]
    scheduler = sched_cls.from_config({k: v for k, v in p.scheduler.items() if k != "_class_name"})
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=build_clip_tokenizer(num_merges=p.bpe_merges),
        tokenizer_2=build_clip_tokenizer(pad_token="!", num_merges=p.bpe_merges),
        unet=unet, scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    return pipe


def make_model(preset: str, out: str | Path, seed: int = 0) -> Path:
    """Write a diffusers folder (safetensors) for `preset` with seeded random weights."""
    out = Path(out)
    pipe = build_pipeline(preset, seed=seed)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def make_single_file(preset: str, out: str | Path, seed: int = 0, dtype: torch.dtype = torch.float16,
                     include_vae: bool = True, metadata: bool = True) -> Path:
    """Write `preset` with seeded random weights as one original-layout .safetensors file: the same
    weights as `make_model(preset, seed=seed)`'s folder, in `dtype`. Built in `dtype` and written one
    tensor at a time, so a full-size SDXL needs about its fp32 U-Net (10 GB) at the peak, not two copies."""
    from vqdm.models.single_file import write_single_file

    p = _preset(preset)
    pipe = build_pipeline(p, seed=seed, dtype=dtype)
    return write_single_file(pipe, out, dtype=dtype, family=p.family, include_vae=include_vae, metadata=metadata)
