"""Warm-up: before /readyz turns 200, one generation per model and device through the same runner
as real requests, at the configured worst case, so that a limit the device cannot hold fails
start-up (with the limits to lower) instead of the first large request."""
from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

from vqdm.server import failures
from vqdm.server.jobs import GenerationParams
from vqdm.server.runner import Member, run_batch
from vqdm.server.settings import Settings

if TYPE_CHECKING:
    from vqdm.server.batching import Dispatcher
    from vqdm.server.loader import ServedModel

log = logging.getLogger("vqdm.server")


class WarmUpFailed(Exception):
    """The configured worst case does not run on this device."""


def warmup_params(settings: Settings, model: "ServedModel", device: str, steps: int) -> GenerationParams:
    """The configured worst case (max_batch_size images at the largest size the limits admit), or,
    with warmup_size=default or =auto on CPU, one image at the model's own size."""
    s = settings
    worst = s.warmup_size == "max" or (s.warmup_size == "auto" and not device.startswith("cpu"))
    if worst:
        side = min(s.max_side, math.isqrt(s.max_pixels)) // 8 * 8
        n, width, height = s.max_batch_size, side, side
    else:
        n, width, height = 1, model.default_width, model.default_height
    return GenerationParams(model=model.id, prompt="warm-up", negative_prompt=None, n=n, width=width,
                            height=height, steps=steps, guidance=model.default_guidance, scheduler="default", seed=0)


async def warm_up(dispatcher: "Dispatcher", steps: int) -> None:
    """One generation per model and device, in the device's own thread. An out-of-memory error here
    fails start-up with the limits to lower."""
    for model in dispatcher.models.values():
        for device in dispatcher.devices:
            params = warmup_params(dispatcher.settings, model, device, steps)
            t0 = time.perf_counter()
            try:
                await dispatcher.run_on(device, run_batch, model.replicas[device], [Member(params)])
            except Exception as e:
                if failures.is_out_of_memory(e):
                    raise WarmUpFailed(
                        f"the configured worst case ({params.n} x {params.width}x{params.height}) does not fit "
                        f"on {device}: lower --max-batch-size or --max-side/--max-pixels") from e
                raise
            log.info("warmed up %s on %s with %d x %dx%d in %.2fs", model.id, device, params.n, params.width,
                     params.height, time.perf_counter() - t0)
