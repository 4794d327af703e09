"""The SPEC calibration recipe of each model family, in one registry: `recipe("sdxl")` (§3.2) is the
SamplingConfig `vqdm quantize` gathers H on. Distillation's recipes are its own
(`vqdm.quantizer.distill.recipes`); evaluation's sampling defaults are the architecture preset's
(`vqdm.models.Preset`: steps, guidance, resolution)."""
from __future__ import annotations

from vqdm.errors import ConfigError
from vqdm.quantizer.sampling import SamplingConfig

# SPEC §3.2. SDXL: 256 prompts x 50 DDIM steps x 2 CFG halves = 25,600 U-Net image evaluations
# at 1024². Turbo: 10,240 prompts (the prompt file cycled with fresh seeds) at 1-4 steps (2.5 on
# average) without CFG = 25,600 evaluations at 512², the same number of evaluations; each has a
# quarter of the tokens, still >= 6.5 M rows for the lowest-resolution layers (d <= 23,040).
RECIPES: dict[str, SamplingConfig] = {
    "sdxl": SamplingConfig(num_prompts=256, steps=50, guidance=5.0, resolution=1024, scheduler="ddim", batch_size=2),
    "sdxl-turbo": SamplingConfig(num_prompts=10_240, steps=4, guidance=0.0, resolution=512, scheduler="native",
                                 vary_steps=True, batch_size=8),
}
FAMILIES = tuple(RECIPES)


def check_family(family: str) -> str:
    """`family` if it is one of FAMILIES, else a ConfigError naming them."""
    if family not in RECIPES:
        raise ConfigError(f"unknown --preset {family!r}: choose {' or '.join(RECIPES)}")
    return family


def recipe(family: str) -> SamplingConfig:
    """The calibration recipe of `family` ('sdxl' / 'sdxl-turbo'); override fields with `.replace(...)`."""
    return RECIPES[check_family(family)]
