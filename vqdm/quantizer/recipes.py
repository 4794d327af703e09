"""The SPEC recipes of each model family, in one registry: `recipe("sdxl").calibration` (§3.2) and
`recipe("sdxl-turbo").distill` (§4). Evaluation's sampling defaults are the architecture preset's
(`vqdm.models.Preset`: steps, guidance, resolution)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from vqdm.errors import ConfigError
from vqdm.quantizer.distill.config import DistillConfig
from vqdm.quantizer.sampling import SamplingConfig


@dataclass(frozen=True)
class Recipe:
    calibration: SamplingConfig  # `vqdm quantize`: the trajectories H is gathered on
    distill: DistillConfig  # `vqdm distill`: teacher trajectories and training


RECIPES: dict[str, Recipe] = {
    # SPEC §3.2. SDXL: 256 prompts x 50 DDIM steps x 2 CFG halves = 25,600 U-Net image evaluations
    # at 1024². Turbo: 10,240 prompts (the prompt file cycled with fresh seeds) at 1-4 steps (2.5 on
    # average) without CFG = 25,600 evaluations at 512², the same number of evaluations; each has a
    # quarter of the tokens, still >= 6.5 M rows for the lowest-resolution layers (d <= 23,040).
    # SPEC §4. SDXL: 4 rounds x 512 prompts, 50 DDIM steps, guidance 5, 1024², effective batch 64,
    # 1,600 steps = 102,400 samples = every sample of the 4 rounds once. Turbo: no CFG, its own
    # scheduler at 1-4 steps (2.5 on average): 10,240 prompts a round give the same 25,600 samples.
    "sdxl": Recipe(
        calibration=SamplingConfig(num_prompts=256, steps=50, guidance=5.0, resolution=1024, scheduler="ddim",
                                   batch_size=2),
        distill=DistillConfig(num_prompts=2048, rounds=4, steps=50, guidance=5.0, resolution=1024, scheduler="ddim",
                              vary_steps=False, train_steps=1600, batch_size=4, grad_accum=16, gen_batch_size=2,
                              val_prompts=16, test_prompts=16),
    ),
    "sdxl-turbo": Recipe(
        calibration=SamplingConfig(num_prompts=10_240, steps=4, guidance=0.0, resolution=512, scheduler="native",
                                   vary_steps=True, batch_size=8),
        distill=DistillConfig(num_prompts=40_960, rounds=4, steps=4, guidance=0.0, resolution=512,
                              scheduler="native", vary_steps=True, train_steps=1600, batch_size=8, grad_accum=8,
                              gen_batch_size=8, val_prompts=16, test_prompts=16),
    ),
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


def recipe(family: str, scale: str = "full") -> Recipe:
    """`recipe(family)` with the distillation learning rates of `scale` ('full' or 'tiny')."""
    base = _family(family)
    if scale not in DISTILL_LRS:
        raise ConfigError(f"unknown model scale {scale!r}: choose {' or '.join(DISTILL_LRS)}")
    return Recipe(calibration=base.calibration, distill=base.distill.replace(**DISTILL_LRS[scale]))


def detect_recipe(model_dir: str | Path, family: str | None = None) -> Recipe:
    """The recipe of a diffusers folder: its family (from the scheduler unless given) and its U-Net's scale."""
    from vqdm.models import detect_family

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "unet" / "config.json").read_text())
    return recipe(family or detect_family(model_dir), model_scale(config))


def _family(family: str) -> Recipe:
    """The recipe of `family` ('sdxl' / 'sdxl-turbo'); override fields with `.calibration.replace(...)`."""
    try:
        return RECIPES[family]
    except KeyError:
        raise ConfigError(f"unknown --preset {family!r}: choose {' or '.join(RECIPES)}") from None
