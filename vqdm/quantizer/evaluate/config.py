"""`vqdm eval` settings; unset sampling fields take the family's defaults (`vqdm.models.Preset`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from vqdm.models import Preset
from vqdm.quantizer.sampling import SamplingConfig


@dataclass
class EvalConfig:
    num_prompts: int = 8
    steps: int | None = None  # None: the family's default (SDXL 30, Turbo 4)
    guidance: float | None = None  # None: SDXL 5, Turbo 0
    resolution: int | None = None  # None: SDXL 1024, Turbo 512
    seed: int = 0
    prompts_file: str | None = None
    batch_size: int = 1  # prompts per pipeline call
    grid_rows: int = 4  # prompts shown in grid.png
    chunk_prompts: int = 8  # prompts sampled by every model before metrics are accumulated
    unet_mse_prompts: int = 64  # prompts whose reference trajectory feeds the teacher-forced U-Net error

    def resolved(self, family: str) -> "EvalConfig":
        p = Preset.from_name(family)
        return dataclasses.replace(self, steps=self.steps or p.steps,
                                   guidance=p.guidance if self.guidance is None else self.guidance,
                                   resolution=self.resolution or p.resolution)

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(num_prompts=self.num_prompts, steps=self.steps, guidance=self.guidance,
                                 resolution=self.resolution, scheduler="native", batch_size=self.batch_size,
                                 seed=self.seed, prompts_file=self.prompts_file)
