"""Sampler names a request may ask for, and the diffusers scheduler class each names (the runner
swaps it in per batch with `vqdm.models.schedulers`), with the name AUTOMATIC1111's API gives the
same sampler (its `sampler_name`, mapped by `vqdm.server.a1111_params`).

`stateless` marks schedulers whose step depends only on (model output, t, sample): a batch that
loses a cancelled member can drop its rows mid-run. Multistep solvers keep earlier outputs per
row, so with them a cancelled member's rows keep running and only its result is dropped.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sampler:
    name: str
    class_name: str  # a diffusers scheduler class
    stateless: bool
    about: str
    a1111: str  # AUTOMATIC1111's sampler_name for it


SAMPLERS: dict[str, Sampler] = {s.name: s for s in (
    Sampler("euler", "EulerDiscreteScheduler", True, "Euler (SDXL's default)", "Euler"),
    Sampler("euler_a", "EulerAncestralDiscreteScheduler", True, "Euler ancestral (SDXL-Turbo's default)", "Euler a"),
    Sampler("ddim", "DDIMScheduler", True, "DDIM, eta 0", "DDIM"),
    Sampler("dpmpp_2m", "DPMSolverMultistepScheduler", False, "DPM-Solver++ 2M", "DPM++ 2M"),
    Sampler("unipc", "UniPCMultistepScheduler", False, "UniPC multistep", "UniPC"),
)}
DEFAULT = "default"
_BY_CLASS = {s.class_name: s for s in SAMPLERS.values()}


def sampler_names() -> list[str]:
    return [DEFAULT, *SAMPLERS]


def resolve(name: str | None, default_class: str) -> Sampler:
    """The sampler for a request's `scheduler` field; None/'default' is the model's own."""
    if name is None or name == DEFAULT:
        return _BY_CLASS.get(default_class) or Sampler(DEFAULT, default_class, False, "the model's own", "")
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(sampler_names())}") from None

