"""`vqdm eval` settings: the sampling every model runs (by default the family's, `vqdm.models.Preset`)
and what is reported of it."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from vqdm.models import Preset
from vqdm.quantizer.sampling import SamplingConfig

NUM_PROMPTS = 8  # prompts sampled by default (--num-prompts)


def default_sampling(family: str) -> SamplingConfig:
    """`vqdm eval`'s sampling for `family`: its preset's steps, guidance and resolution (SDXL 30, 5,
    1024; Turbo 4, 0, 512) with its own scheduler, NUM_PROMPTS prompts one per call, seed 0."""
    p = Preset.from_name(family)
    return SamplingConfig(num_prompts=NUM_PROMPTS, steps=p.steps, guidance=p.guidance, resolution=p.resolution,
                          scheduler="native")


@dataclass
class EvalConfig:
    sampling: SamplingConfig  # every model samples these prompts and seeds this way
    grid_rows: int = 4  # prompts shown in grid.png
    chunk_prompts: int = 8  # prompts sampled by every model before metrics are accumulated
    unet_mse_prompts: int = 64  # prompts whose reference trajectory feeds the teacher-forced U-Net error

    @classmethod
    def for_family(cls, family: str, **overrides) -> "EvalConfig":
        """The family's default sampling with `overrides` (SamplingConfig and EvalConfig fields; None:
        the default), e.g. `EvalConfig.for_family("sdxl", num_prompts=16, grid_rows=2)`."""
        own = {f.name for f in dataclasses.fields(cls)}
        sampling = default_sampling(family).replace(**{k: v for k, v in overrides.items() if k not in own})
        return cls(sampling, **{k: v for k, v in overrides.items() if k in own and v is not None})

    def to_dict(self) -> dict:
        """Flat, with the keys eval_meta.json's "settings" has always had."""
        s = self.sampling
        return {"num_prompts": s.num_prompts, "steps": s.steps, "guidance": s.guidance, "resolution": s.resolution,
                "seed": s.seed, "prompts_file": s.prompts_file, "batch_size": s.batch_size,
                "grid_rows": self.grid_rows, "chunk_prompts": self.chunk_prompts,
                "unet_mse_prompts": self.unet_mse_prompts}
