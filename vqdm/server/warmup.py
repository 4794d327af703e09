"""Warm-up: before /readyz turns 200, each U-Net compiled for its shape buckets when compiled serving
is on (vqdm.server.compiled), so no request pays for a compile; then one generation per model and
device through the same runner as real requests, at the configured worst case, so that a limit the
device cannot hold fails start-up (with the limits to lower) instead of the first large request."""
from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

from vqdm.server import failures
from vqdm.server.compiled import buckets_for, compile_plan, compile_replica
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


async def compile_models(dispatcher: "Dispatcher") -> None:
    """Compile every replica whose device's compile mode is not off, for its model's buckets, in the
    device's own thread. A failure fails start-up, naming the model, device and shapes."""
    s = dispatcher.settings
    for model in dispatcher.models.values():
        for device in dispatcher.devices:
            replica = model.replicas[device]
            mode, buckets = compile_plan(s.compile, device, replica.pipe.unet.dtype, buckets_for(s, model))
            if mode == "off":
                if s.compile == "auto":
                    log.info("compiled serving off for %s on %s: --compile auto compiles only the shapes where "
                             "compiling measured faster on this device type (vqdm.server.compiled.AUTO_MODE)",
                             model.id, device)
                continue
            shapes = ", ".join(map(str, buckets))
            t0 = time.perf_counter()
            try:
                compiled = await dispatcher.run_on(device, compile_replica, replica, mode,
                                                   s.compile_backend, buckets)
            except Exception as e:
                raise WarmUpFailed(f"compiling {model.id} on {device} (mode {mode}, backend {s.compile_backend}, "
                                   f"shapes {shapes}) failed: {type(e).__name__}: {e}; fewer --compile-shape "
                                   "buckets, or --compile off to serve eagerly") from e
            dispatcher.metrics.compiled_serving(mode)
            if compiled.skipped:
                log.warning("compiled serving skipped for %s on %s: %s; every step runs eagerly "
                            "(vqdm_compiled_steps_total fallback=%s)", model.id, device, compiled.blocker,
                            compiled.skipped)
            else:
                log.info("compiled %s on %s (mode %s, backend %s) for %s in %.1fs", model.id, device, mode,
                         s.compile_backend, shapes, time.perf_counter() - t0)
            if compiled.refused:
                log.warning("%d of %d compiled shapes of %s on %s would recompile on every call: they run "
                            "eagerly (vqdm_compiled_steps_total fallback=error; the warning above says why)",
                            len(compiled.refused), len(buckets), model.id, device)


async def warm_up(dispatcher: "Dispatcher", steps: int) -> None:
    """Compiled serving's graphs first (compile_models), then, unless warm-up is off, one generation
    per model and device, in the device's own thread. An out-of-memory error here fails start-up
    with the limits to lower."""
    await compile_models(dispatcher)
    if not dispatcher.settings.warmup:
        return
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
