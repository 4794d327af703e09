"""What a failed batch means for its jobs and for the process: out-of-memory (free, split, retry),
a device error that poisons the CUDA context (the process must restart), or anything else (the
job fails; the server carries on). Clients get the short code, the log gets the trace.

`FailurePolicy` carries it out for a `Dispatcher`: every job ends with exactly one outcome. An
out-of-memory error frees memory and retries the batch's jobs one by one; only a job that fails
alone fails (`insufficient_memory`). A sticky device error or a stalled step (the watchdog) marks
the server unhealthy: its running and queued jobs fail at once (`worker_unhealthy`) and /healthz
turns 503 so the orchestrator restarts the process. Any other exception fails its jobs
(`generation_failed`, or `internal_error` outside the pipeline) and the worker carries on.
"""
from __future__ import annotations

import gc
import logging
from typing import TYPE_CHECKING

import torch

from vqdm.server import faults
from vqdm.server.faults import FaultInjector
from vqdm.server.jobs import Job, JobState, finish_cancelled, job_ids
from vqdm.server.watchdog import Watchdog, install_progress_hooks

if TYPE_CHECKING:
    from vqdm.server.batching import Dispatcher
    from vqdm.server.loader import ServedModel

log = logging.getLogger("vqdm.server")

# Job.error codes, each answered with a fixed short message (handling._outcome_error).
INSUFFICIENT_MEMORY = "insufficient_memory"
GENERATION_FAILED = "generation_failed"
WORKER_UNHEALTHY = "worker_unhealthy"
INTERNAL_ERROR = "internal_error"

# Substrings of errors after which a CUDA context cannot be trusted again (sticky errors).
_POISON_MARKERS = ("CUDA error", "cuDNN error", "CUBLAS_STATUS_EXECUTION_FAILED", "device-side assert",
                   "illegal memory access", "unspecified launch failure")


def is_out_of_memory(e: BaseException) -> bool:
    text = str(e).lower()
    # CUDA: torch.OutOfMemoryError; CPU: the default allocator's RuntimeError.
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def poisons_device(e: BaseException) -> bool:
    """A sticky device error: every later kernel on the context fails too, so only a restart helps."""
    if is_out_of_memory(e):
        return False
    accel = getattr(torch, "AcceleratorError", None)
    return (accel is not None and isinstance(e, accel)) or any(m in str(e) for m in _POISON_MARKERS)


def free_memory() -> None:
    """After an OOM: drop the failed batch's tensors (the traceback held them) and return cached
    blocks to the driver, so a smaller retry starts from a clean allocator."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class FailurePolicy:
    """The failure side of one `Dispatcher`: job failures, the watchdog, the unhealthy verdict, and
    the test-only fault injector. Event loop only, except `guarded` (the device's thread)."""

    def __init__(self, dispatcher: "Dispatcher") -> None:
        self.dispatcher = dispatcher  # to retry jobs alone and to evict the queue of a bad device
        self.unhealthy: str | None = None  # why the process must restart (/healthz says 503)
        self.faults: FaultInjector | None = None  # test-only (vqdm.server.faults)
        self.watchdog = Watchdog(dispatcher.settings.stall_timeout_s, self.on_stall)

    def install(self, models: dict[str, "ServedModel"]) -> None:
        """Progress hooks for the watchdog (and the test-only fault hook) on every replica."""
        if faults.enabled():
            log.warning("%s=1: test-only fault injection is ON; never run a real server like this", faults.ENV_VAR)
            self.faults = FaultInjector()
        for model in models.values():
            for device, replica in model.replicas.items():
                install_progress_hooks(replica.pipe, self.watchdog.hook_for(device))
                if self.faults is not None:
                    faults.install(replica.pipe, self.faults)

    def fail(self, job: Job, code: str) -> None:
        """End a job that did not succeed (a job already ended keeps its first outcome)."""
        if job.state.finished:
            return
        if job.cancelled:
            finish_cancelled(job, self.dispatcher.metrics)
        else:
            job.finish(JobState.FAILED, error=code)  # counted in vqdm_errors_total as its reply goes out

    def guarded(self, device: str, fn, replica, members, prompts):
        """Runs in the device's thread: the batch under the watchdog (and the test fault hook)."""
        self.watchdog.begin(device)
        try:
            if self.faults is not None:
                self.faults.arm(prompts)
            return fn(replica, members)
        finally:
            self.watchdog.end(device)

    async def batch_failed(self, device: str, batch: list[Job], e: Exception) -> None:
        if self.unhealthy:  # the watchdog already ended these jobs; this is the stuck call returning
            log.warning("batch %s on %s ended after the device was declared unhealthy: %s: %s",
                        job_ids(batch), device, type(e).__name__, e)
            return
        if is_out_of_memory(e):
            await self._out_of_memory(device, batch, e)
            return
        if poisons_device(e):
            log.critical("device %s is poisoned; marking the server unhealthy (batch %s)", device, job_ids(batch),
                         exc_info=e)
            self.mark_unhealthy(device, f"device error on {device}: restart needed")
            return
        log.error("batch %s failed on %s", job_ids(batch), device, exc_info=e)
        for job in batch:
            self.fail(job, GENERATION_FAILED)

    async def _out_of_memory(self, device: str, batch: list[Job], e: Exception) -> None:
        """Free memory, then retry each job of the batch alone; a job alone that runs out fails."""
        await self.dispatcher.run_on(device, free_memory)
        if len(batch) > 1:
            log.warning("out of memory in batch %s on %s; retrying its %d jobs one by one", job_ids(batch),
                        device, len(batch), exc_info=e)
            for job in batch:
                if job.cancelled or self.unhealthy:
                    self.fail(job, WORKER_UNHEALTHY)
                elif not job.state.finished:
                    # Its clients saw 'started' already.
                    await self.dispatcher.run_batch_on(device, [job])
            return
        log.error("out of memory running request %s alone on %s", batch[0].id, device, exc_info=e)
        self.fail(batch[0], INSUFFICIENT_MEMORY)

    def on_stall(self, device: str, seconds: float) -> None:
        log.critical("watchdog: the batch on %s made no progress for %.0fs (requests %s); marking the server "
                     "unhealthy", device, seconds, job_ids(self.dispatcher.running_on(device)))
        self.mark_unhealthy(device, f"worker on {device} made no progress for {seconds:.0f}s: restart needed")

    def mark_unhealthy(self, device: str, reason: str) -> None:
        """The device cannot be trusted again: its running jobs and every queued job end now (503), new
        ones are refused, and /healthz fails so that the orchestrator restarts the process."""
        if self.unhealthy is None:
            self.unhealthy = reason
        for job in self.dispatcher.evict(device):
            self.fail(job, WORKER_UNHEALTHY)

    def stuck_devices(self) -> list[str]:
        """Devices whose thread is still inside a batch after shutdown (a hung kernel)."""
        return self.watchdog.busy()
