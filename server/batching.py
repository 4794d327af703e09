"""Bounded job queue, batching, and one worker per device.

Admission: `submit` refuses with `QueueFull` (→ 429 + Retry-After) when `max_queue_size` jobs
already wait; running jobs do not count. Batching: a worker takes the oldest waiting job and every
later waiting job with the same `batch_key()` while the batch holds at most `max_batch_size`
images (a job is never split; one larger than the limit runs alone). Every model has a replica on
every device and all workers share one queue, so a second GPU simply takes the next batch.

The pipeline runs in a single-thread executor per device: the event loop keeps answering
/healthz, /metrics and progress polls while a batch runs, and a device never runs two batches at
once (on one GPU that would not add throughput, only memory).
"""
from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from vqdm.server.jobs import GenerationParams, Job, JobResult, JobState
from vqdm.server.metrics import Metrics
from vqdm.server.settings import Settings

if TYPE_CHECKING:
    from vqdm.server.registry import ServedModel

log = logging.getLogger("vqdm.server")
_MAX_REMEMBERED_JOBS = 10_000


class QueueFull(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__(f"queue full, retry in {retry_after}s")
        self.retry_after = retry_after


class NotAccepting(Exception):
    """The server is shutting down (or not started)."""


class Dispatcher:
    def __init__(self, settings: Settings, metrics: Metrics, devices: list[str]) -> None:
        self.settings = settings
        self.metrics = metrics
        self.devices = devices
        self.models: dict[str, "ServedModel"] = {}
        self.pending: collections.deque[Job] = collections.deque()
        self.jobs: dict[str, Job] = {}  # live and recently finished, for GET /v1/requests/{id}
        self.running: set[Job] = set()
        self.accepting = False
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = False
        self._workers: list[asyncio.Task] = []
        self._executors = {d: ThreadPoolExecutor(1, thread_name_prefix=f"vqdm-{d}") for d in devices}
        self._batch_seconds = 1.0  # running mean of batch wall time, for Retry-After
        metrics.queue_depth.set_function(lambda: len(self.pending))

    # -- admission and bookkeeping (event loop only) --------------------------------------------
    def submit(self, job: Job) -> None:
        if not self.accepting:
            raise NotAccepting()
        if len(self.pending) >= self.settings.max_queue_size:
            raise QueueFull(self.retry_after())
        self.pending.append(job)
        self._remember(job)
        self._idle.clear()
        self._wake.set()

    def retry_after(self) -> int:
        batches_ahead = len(self.pending) / self.settings.max_batch_size + 1
        return max(1, math.ceil(self._batch_seconds * batches_ahead / len(self.devices)))

    def position(self, job: Job) -> int | None:
        try:
            return self.pending.index(job)
        except ValueError:
            return None

    def cancel(self, job: Job, reason: str) -> None:
        """Queued: dropped now. Running: the worker stops its rows at the next denoising step."""
        if job.state.finished:
            return
        job.request_cancel(reason)
        if job.state is JobState.QUEUED:
            self.pending.remove(job)
            self._finish_cancelled(job)
            self._check_idle()

    def _finish_cancelled(self, job: Job) -> None:
        job.finish(JobState.CANCELLED)
        self.metrics.cancelled.labels(job.params.model, job.cancel_stage or "running").inc()
        log.info("request %s cancelled (%s, while %s) at step %d/%d", job.id, job.cancel_reason,
                 job.cancel_stage, job.step, job.total_steps)

    def _remember(self, job: Job) -> None:
        self.jobs[job.id] = job
        if len(self.jobs) > _MAX_REMEMBERED_JOBS:
            for old_id, old in list(self.jobs.items()):
                if old.state.finished:
                    del self.jobs[old_id]
                    break

    def _forget_later(self, job: Job) -> None:
        loop = asyncio.get_running_loop()
        loop.call_later(self.settings.job_retention_s, lambda: self.jobs.get(job.id) is job and self.jobs.pop(job.id))

    def _check_idle(self) -> None:
        if not self.pending and not self.running:
            self._idle.set()

    # -- batching ---------------------------------------------------------------------------------
    def _take_batch(self) -> list[Job]:
        head = self.pending[0]
        key, limit = head.params.batch_key(), self.settings.max_batch_size
        batch, images = [head], head.params.n
        for job in list(self.pending)[1:]:
            if images >= limit:
                break
            if job.params.batch_key() == key and images + job.params.n <= limit:
                batch.append(job)
                images += job.params.n
        for job in batch:
            self.pending.remove(job)
        return batch

    # -- workers ----------------------------------------------------------------------------------
    def start(self) -> None:
        self.accepting = True
        self._workers = [asyncio.create_task(self._worker(d), name=f"vqdm-worker-{d}") for d in self.devices]

    async def run_on(self, device: str, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executors[device], fn, *args)

    async def _worker(self, device: str) -> None:
        while not self._stopping:
            if not self.pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            if self.settings.batch_wait_ms > 0 and not self.running:
                await asyncio.sleep(self.settings.batch_wait_ms / 1000)  # let batch mates arrive
                if not self.pending:
                    continue
            batch = self._take_batch()
            try:
                await self._run(device, batch)
            except Exception:  # never let one batch take the worker down
                log.exception("worker %s: batch failed outside the pipeline", device)
            finally:
                self.running.difference_update(batch)
                self._check_idle()

    async def _run(self, device: str, batch: list[Job]) -> None:
        from vqdm.server.runner import Member, run_batch

        loop = asyncio.get_running_loop()
        model = self.models[batch[0].params.model]
        rows = sum(j.params.n for j in batch)
        now = time.perf_counter()
        for job in batch:
            job.mark_running(rows)
            self.running.add(job)
            self.metrics.queue_wait.labels(model.id).observe(now - job.enqueued_at)
        self.metrics.in_flight.inc(len(batch))
        self.metrics.batch_size.observe(rows)
        members = [Member(job.params, job.cancel_flag.is_set,
                          lambda s, t, job=job: loop.call_soon_threadsafe(job.set_progress, s, t)) for job in batch]
        log.info("batch of %d image(s) on %s: requests %s", rows, device, ",".join(j.id for j in batch))
        t0 = time.perf_counter()
        try:
            outcome = await self.run_on(device, run_batch, model.replicas[device], members)
        except Exception as e:
            oom = type(e).__name__ == "OutOfMemoryError"
            log.exception("batch %s failed", ",".join(j.id for j in batch))
            if oom:
                import torch

                torch.cuda.empty_cache()
            for job in batch:
                if job.cancelled:
                    self._finish_cancelled(job)
                else:
                    job.finish(JobState.FAILED, error=("out_of_memory: " if oom else "generation_failed: ")
                               + f"{type(e).__name__}: {e}")
                self._forget_later(job)
            return
        finally:
            self.metrics.in_flight.dec(len(batch))
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * (time.perf_counter() - t0)
        for s in outcome.step_seconds:
            self.metrics.step_duration.labels(model.id).observe(s)
        if outcome.images and any(imgs is not None for imgs in outcome.images):
            self.metrics.vae_duration.labels(model.id).observe(outcome.vae_decode_s)
        timings = outcome.timings()
        for job, images, revised in zip(batch, outcome.images, outcome.revised_prompts):
            if images is None or job.cancelled:
                self._finish_cancelled(job)
            else:
                if outcome.weight_decode_s is not None:
                    self.metrics.weight_decode_duration.labels(model.id).observe(outcome.weight_decode_s)
                self.metrics.images.labels(model.id).inc(len(images))
                if job.params.edit is not None:
                    self.metrics.edits.labels(model.id, job.params.edit.kind).inc()
                for name, _ in job.params.loras:
                    self.metrics.lora_uses.labels(model.id, name).inc()
                job.finish(JobState.SUCCEEDED, result=JobResult(images, revised, dict(timings), rows))
            self._forget_later(job)

    # -- warm-up and shutdown ---------------------------------------------------------------------
    async def warm_up(self, steps: int) -> None:
        """One small generation per model and device, through the same runner as real requests."""
        from vqdm.server.runner import Member, run_batch

        for model in self.models.values():
            params = GenerationParams(model=model.id, prompt="warm-up", negative_prompt=None, n=1,
                                      width=model.default_width, height=model.default_height, steps=steps,
                                      guidance=model.default_guidance, scheduler="default", seed=0)
            for device in self.devices:
                t0 = time.perf_counter()
                await self.run_on(device, run_batch, model.replicas[device], [Member(params)])
                log.info("warmed up %s on %s in %.2fs", model.id, device, time.perf_counter() - t0)

    async def shutdown(self, timeout: float) -> None:
        """Refuse new work, let queued and running jobs finish for up to `timeout`, cancel the rest."""
        self.accepting = False
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            log.warning("shutdown: %d queued and %d running job(s) still unfinished after %.0fs; cancelling",
                        len(self.pending), len(self.running), timeout)
            for job in list(self.pending) + list(self.running):
                self.cancel(job, "shutdown")
            try:
                await asyncio.wait_for(self._idle.wait(), 30)
            except asyncio.TimeoutError:
                pass
        self._stopping = True
        self._wake.set()
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        for ex in self._executors.values():
            ex.shutdown(wait=False, cancel_futures=True)
