"""The SPEC §4 distillation recipe of each model family, with learning rates by model scale:
`recipe("sdxl")`, `recipe("sdxl", "tiny")`, or `detect_recipe(folder)` for a diffusers folder."""
from __future__ import annotations

from pathlib import Path

from vqdm.errors import ConfigError
from vqdm.models import SingleFileOptions, detect_family, read_unet_config
from vqdm.quantizer.distill.config import DistillConfig
from vqdm.quantizer.recipes import check_family
from vqdm.quantizer.sampling import SamplingConfig

# SPEC §4. SDXL: 4 rounds x 512 prompts, 50 DDIM steps, guidance 5, 1024², effective batch 64,
# 1,600 steps = 102,400 samples = every sample of the 4 rounds once. Turbo: no CFG, its own
# scheduler at 1-4 steps (2.5 on average): 10,240 prompts a round give the same 25,600 samples.
RECIPES: dict[str, DistillConfig] = {
    "sdxl": DistillConfig(
        teacher=SamplingConfig(num_prompts=2048, steps=50, guidance=5.0, resolution=1024, scheduler="ddim",
                               vary_steps=False, batch_size=2),
        rounds=4, train_steps=1600, batch_size=4, grad_accum=16, val_prompts=16, test_prompts=16),
    "sdxl-turbo": DistillConfig(
        teacher=SamplingConfig(num_prompts=40_960, steps=4, guidance=0.0, resolution=512, scheduler="native",
                               vary_steps=True, batch_size=8),
        rounds=4, train_steps=1600, batch_size=8, grad_accum=8, val_prompts=16, test_prompts=16),
}


# Distillation learning rates per model scale (codebooks, scales, other parameters), applied on
# top of the family's recipe. Adam moves every element by about lr per step whatever its gradient,
# so the rate that helps depends on how far the student is from the teacher and how many
# elements share each codeword; see docs/distill.md "Why lr 3e-4 made students worse".
# "full": SPEC §4's 1e-6 for the non-quantized parameters; codebooks and scales 1e-5, AQLM's
# fine-tuning rate for codebooks (not measured on SDXL here: no GPU run of distillation yet).
# "tiny": measured on the tiny random-weight SDXL / Turbo (benchmarks/distill_sensitivity.py): 3e-4
# for a K = 2 student (validation error ≈ 0.2), scaled down for closer students (K = 3, ≈ 0.03–0.06,
# wants 3e-5..1e-4; at 3e-4 it got worse): lr_reference_error. The trained digits model's students
# are 15-70x closer in output error yet wanted 10-30x the scaled rate (lr panel): the scaling stops
# at lr_min_scale. Not set for "full" (not measured).
DISTILL_LRS = {
    "full": {"lr": 1e-6, "lr_codebooks": 1e-5, "lr_scales": 1e-5},
    "tiny": {"lr": 3e-4, "lr_codebooks": 3e-4, "lr_scales": 3e-4, "lr_reference_error": 0.2, "lr_min_scale": 0.25},
}
TINY_MAX_WIDTH = 160  # U-Nets whose widest block is narrower than this are "tiny" (SDXL: 1280)


def model_scale(unet_config: dict) -> str:
    """'tiny' for the test-size SDXL-architecture U-Nets, else 'full'."""
    return "tiny" if max(unet_config.get("block_out_channels", [1280])) < TINY_MAX_WIDTH else "full"


def recipe(family: str, scale: str = "full") -> DistillConfig:
    """The distillation recipe of `family` with the learning rates of `scale` ('full' or 'tiny')."""
    base = RECIPES[check_family(family)]
    if scale not in DISTILL_LRS:
        raise ConfigError(f"unknown model scale {scale!r}: choose {' or '.join(DISTILL_LRS)}")
    return base.replace(**DISTILL_LRS[scale])


def detect_recipe(model_dir: str | Path, family: str | None = None,
                  single_file: SingleFileOptions | None = None) -> DistillConfig:
    """The recipe of a diffusers folder or single file: its family (detected unless given) and its U-Net's scale."""
    config = read_unet_config(model_dir, single_file)
    return recipe(family or detect_family(model_dir, single_file), model_scale(config))
