"""The sampling loop shared by calibration, distillation and evaluation (SPEC §3.2), prompt by prompt.

The U-Net sees exactly what it sees in use: SDXL runs DDIM with classifier-free guidance (both
halves of the CFG batch reach the hooks), SDXL-Turbo runs its own scheduler without CFG at 1–4
steps. Only latents are produced (the VAE never runs here; `vqdm.models.vae` decodes them). Every random draw is seeded per prompt
from (seed, global prompt index), and batches are formed globally before ranks take their share,
so one process and N processes run the same U-Net calls and their statistics sum to the same H.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable

import torch

from vqdm.errors import ConfigError
from vqdm.models.schedulers import swapped_scheduler

DEFAULT_PROMPTS = "prompts.txt"  # packaged with vqdm.quantizer


@dataclass
class SamplingConfig:
    """Which prompts are sampled and how: calibration, distillation's teacher and evaluation.
    The per-family calibration defaults are in `vqdm.quantizer.recipes`; tests override them."""

    num_prompts: int
    steps: int
    guidance: float
    resolution: int
    scheduler: str = "native"  # "ddim": switch to DDIMScheduler.from_config (SDXL); "native": keep the folder's
    vary_steps: bool = False  # Turbo: batch b runs 1 + b % steps steps, covering the 1..steps schedules
    batch_size: int = 1  # prompts per pipeline call (CFG doubles the U-Net batch)
    seed: int = 0
    prompts_file: str | None = None  # None: the packaged default set
    max_rows_per_call: int | None = None  # cap on rows a layer records per U-Net call (None: all, as SPEC)

    def __post_init__(self) -> None:
        checks = [
            (self.num_prompts >= 1, f"--num-prompts must be at least 1, got {self.num_prompts}"),
            (self.steps >= 1, f"--steps must be at least 1, got {self.steps}"),
            (self.guidance >= 0, f"--guidance must be non-negative, got {self.guidance}"),
            (self.resolution >= 8 and self.resolution % 8 == 0,
             f"--resolution must be a positive multiple of 8, got {self.resolution}"),
            (self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}"),
            (self.scheduler in ("ddim", "native"), f"scheduler must be 'ddim' or 'native', got {self.scheduler!r}"),
            (self.max_rows_per_call is None or self.max_rows_per_call >= 1,
             f"--max-tokens-per-call must be at least 1, got {self.max_rows_per_call}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)

    @property
    def uses_cfg(self) -> bool:
        return self.guidance > 1.0  # diffusers' rule: CFG only above 1

    def replace(self, **overrides) -> "SamplingConfig":
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_prompts(path: str | Path | None = None) -> list[str]:
    """Prompts, one per non-blank line (surrounding whitespace stripped); None: the packaged set."""
    if path is None:
        text = resources.files("vqdm.quantizer").joinpath(DEFAULT_PROMPTS).read_text(encoding="utf-8")
        source = "the packaged prompt set"
    else:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: prompt file not found")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{p}: prompt file is not UTF-8 text") from None
        source = str(p)
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"{source}: prompt file has no prompts (expected one prompt per line)")
    return prompts


def prompts_digest(prompts: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()


@dataclass(frozen=True)
class Batch:
    index: int  # global batch index
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]  # one latent/noise seed per prompt
    steps: int


def plan_batches(cfg: SamplingConfig, prompts: list[str], rank: int = 0, world_size: int = 1) -> list[Batch]:
    """This rank's batches. Prompt i is prompts[i mod len] with seed (cfg.seed, i); batch b goes to rank b mod world."""
    out = []
    for b, start in enumerate(range(0, cfg.num_prompts, cfg.batch_size)):
        if b % world_size != rank:
            continue
        idx = range(start, min(cfg.num_prompts, start + cfg.batch_size))
        steps = 1 + b % cfg.steps if cfg.vary_steps else cfg.steps
        out.append(Batch(b, tuple(prompts[i % len(prompts)] for i in idx),
                         tuple(prompt_seed(cfg.seed, i) for i in idx), steps))
    return out


def prompt_seed(seed: int, index: int) -> int:
    # Distinct, reproducible per prompt; kept below 2**63 for torch.Generator.
    return (seed * 1_000_003 + index) % (2**63)


def named_seed(seed: int, name: str) -> int:
    """A seed from (run seed, name), e.g. a layer's: independent of order, rank and resume point."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


def unet_evaluations(cfg: SamplingConfig) -> int:
    """Image evaluations of the U-Net over the whole calibration (CFG halves counted)."""
    batches = plan_batches(cfg, ["x"])
    return sum(len(b.prompts) * b.steps for b in batches) * (2 if cfg.uses_cfg else 1)


@contextlib.contextmanager
def sampling_scheduler(pipe, kind: str):
    """The pipeline's scheduler switched to DDIM ("ddim", SDXL calibration/distillation), restored after."""
    if kind != "ddim":
        yield pipe
        return
    with swapped_scheduler(pipe, "DDIMScheduler"):
        yield pipe


def run_trajectories(pipe, cfg: SamplingConfig, batches: list[Batch],
                     before_batch: Callable[[Batch], None] | None = None, progress=None,
                     keep_latents: bool = False) -> torch.Tensor | None:
    """Sample every batch to latents with the pipeline; hooks on its U-Net see every step.

    `before_batch(batch)` runs first for each batch (the collector reseeds its row sampling there,
    the sample recorder learns the batch's prompts). `progress` is an optional tqdm-like object
    advanced by one per batch. With `keep_latents` the final latents [N, C, H, W] (CPU float32) of
    every prompt are returned in order, which evaluation needs and calibration does not.
    """
    check_resolution(pipe, cfg.resolution)
    out = []
    with sampling_scheduler(pipe, cfg.scheduler), torch.no_grad():
        for batch in batches:
            if before_batch is not None:
                before_batch(batch)
            # CPU generators: the same noise whatever the device, so runs are comparable across machines.
            gens = [torch.Generator("cpu").manual_seed(s) for s in batch.seeds]
            res = pipe(prompt=list(batch.prompts), num_inference_steps=batch.steps, guidance_scale=cfg.guidance,
                       height=cfg.resolution, width=cfg.resolution, generator=gens, output_type="latent")
            if keep_latents:
                out.append(res.images.detach().to("cpu", torch.float32))
            if progress is not None:
                progress.update(1)
    return torch.cat(out) if keep_latents else None


def check_resolution(pipe, resolution: int) -> None:
    """The latent must survive the U-Net's downsamplers evenly."""
    levels = len(pipe.unet.config.block_out_channels) - 1
    multiple = pipe.vae_scale_factor * 2**levels
    if resolution % multiple:
        raise ConfigError(f"--resolution {resolution} must be a multiple of {multiple} for this model")
