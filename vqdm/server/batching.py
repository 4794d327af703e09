"""Bounded job queue, batching, and one worker per device.

Admission: `submit` refuses with `QueueFull` (→ 429 + Retry-After) when `max_queue_size` jobs
already wait, or when the edits waiting would hold more than `max_queued_edit_pixels` pixels of
input; running jobs do not count. Batching: a worker takes the oldest waiting job and every
later waiting job with the same `batch_key()` while the batch holds at most `max_batch_size`
images (a job is never split; one larger than the limit runs alone). Every model has a replica on
every device and all workers share one queue, so a second GPU simply takes the next batch.

The pipeline runs in a single-thread executor per device: the event loop keeps answering
/healthz, /metrics and progress polls while a batch runs, and a device never runs two batches at
once (on one GPU that would not add throughput, only memory).

Every job ends with exactly one outcome. What a failed batch or a stalled device does is the
failure policy's (`vqdm.server.failures`, docs/server.md "Faults"); the job registry behind
GET /v1/requests/{id} is `vqdm.server.jobs.JobRegistry`, which forgets each job on its own
retention clock however it ended; warm-up is `vqdm.server.warmup`. Drain
(`drain`) refuses new jobs, waits for the rest up to a deadline, then ends what is left as
`shutdown`.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from vqdm.server import failures
from vqdm.server.failures import FailurePolicy
from vqdm.server.jobs import Job, JobRegistry, JobResult, JobState, finish_cancelled, job_ids
from vqdm.server.metrics import Metrics
from vqdm.server.runner import Member, run_batch
from vqdm.server.settings import Settings

if TYPE_CHECKING:
    from vqdm.server.loader import ServedModel

log = logging.getLogger("vqdm.server")


class QueueFull(Exception):
    """`str(e)` says which bound is full, for the 429's message."""

    def __init__(self, why: str, retry_after: int) -> None:
        super().__init__(why)
        self.retry_after = retry_after


class NotAccepting(Exception):
    """The server is shutting down (or not started)."""


class Unhealthy(Exception):
    """A device is stuck or poisoned; the process must be restarted."""


class Dispatcher:
    def __init__(self, settings: Settings, metrics: Metrics, devices: list[str]) -> None:
        self.settings = settings
        self.metrics = metrics
        self.devices = devices
        self.models: dict[str, "ServedModel"] = {}
        self.pending: collections.deque[Job] = collections.deque()
        self.jobs = JobRegistry(settings.job_retention_s)  # live and recently finished, for GET /v1/requests/{id}
        self.running: set[Job] = set()
        self.accepting = False
        self.failures = FailurePolicy(self)
        self._running_on: dict[str, list[Job]] = {d: [] for d in devices}
        self._drained = False
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = False
        self._workers: list[asyncio.Task] = []
        self._executors = {d: ThreadPoolExecutor(1, thread_name_prefix=f"vqdm-{d}") for d in devices}
        self._batch_seconds = 1.0  # running mean of batch wall time, for Retry-After
        metrics.queue_depth.set_function(lambda: len(self.pending))

    @property
    def unhealthy(self) -> str | None:
        """Why the process must restart (/healthz says 503), or None."""
        return self.failures.unhealthy

    # -- admission (event loop only) --------------------------------------------------------------
    def submit(self, job: Job) -> None:
        if self.unhealthy:
            raise Unhealthy(self.unhealthy)
        if not self.accepting:
            raise NotAccepting()
        s = self.settings
        if len(self.pending) >= s.max_queue_size:
            raise QueueFull(f"queue full ({s.max_queue_size} requests waiting)", self.retry_after())
        if job.params.edit_pixels:
            held = sum(j.params.edit_pixels for j in self.pending)
            if held + job.params.edit_pixels > s.max_queued_edit_pixels:
                raise QueueFull(f"edit queue full: the edits waiting hold {held} pixels of input and this one "
                                f"{job.params.edit_pixels}, over this server's max_queued_edit_pixels of "
                                f"{s.max_queued_edit_pixels}", self.retry_after())
        self.pending.append(job)
        self.jobs.remember(job)
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
            finish_cancelled(job, self.metrics)
            self._check_idle()

    def running_on(self, device: str) -> list[Job]:
        return self._running_on.get(device, [])

    def evict(self, device: str) -> list[Job]:
        """Stop admitting; take every queued job and those running on `device` off the queue (the
        failure policy ends them: the device cannot be trusted again)."""
        self.accepting = False
        stuck = list(self._running_on.get(device, []))
        queued = list(self.pending)
        self.pending.clear()
        self.running.difference_update(stuck)
        self._check_idle()
        self._wake.set()
        return stuck + queued

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
    def install(self, models: dict[str, "ServedModel"]) -> None:
        """Take the loaded models (the failure policy hooks its watchdog into them)."""
        self.models = models
        self.failures.install(models)

    def start(self) -> None:
        self.accepting = True
        self._workers = [asyncio.create_task(self._worker(d), name=f"vqdm-worker-{d}") for d in self.devices]
        if self.settings.stall_timeout_s > 0:
            self._workers.append(asyncio.create_task(self.failures.watchdog.run(), name="vqdm-watchdog"))

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
            if self.unhealthy:
                return  # a stuck or poisoned device takes no more work; the process restarts
            batch = self._take_batch()
            try:
                await self.run_batch_on(device, batch)
            except Exception:  # never let one batch take the worker down, nor leave its clients waiting
                log.exception("worker %s: batch %s failed outside the pipeline", device, job_ids(batch))
                for job in batch:
                    self.failures.fail(job, failures.INTERNAL_ERROR)
            finally:
                self.running.difference_update(batch)
                self._running_on[device] = []
                self._check_idle()

    async def run_batch_on(self, device: str, batch: list[Job]) -> None:
        """Run one batch on `device`'s thread and end each of its jobs (a failure: the failure policy)."""
        loop = asyncio.get_running_loop()
        model = self.models[batch[0].params.model]
        rows = sum(j.params.n for j in batch)
        now = time.perf_counter()
        for job in batch:
            job.mark_running(rows)
            self.running.add(job)
        self.metrics.batch_started(model.id, [j.enqueued_at for j in batch], rows, now)
        members = [Member(job.params, job.cancel_flag.is_set,
                          lambda s, t, job=job: loop.call_soon_threadsafe(job.set_progress, s, t),
                          (lambda i, k, image, job=job: loop.call_soon_threadsafe(job.add_preview, i, k, image))
                          if job.params.partial_images else None) for job in batch]
        log.info("batch of %d image(s) on %s: requests %s", rows, device, job_ids(batch))
        self._running_on[device] = list(batch)
        t0 = time.perf_counter()
        try:
            outcome = await self.run_on(device, self.failures.guarded, device, run_batch, model.replicas[device],
                                        members, [j.params.prompt for j in batch])
        except Exception as e:
            await self.failures.batch_failed(device, batch, e)
            return
        finally:
            self.metrics.in_flight.dec(len(batch))
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * (time.perf_counter() - t0)
        self.metrics.batch_ran(model.id, outcome)
        timings = outcome.timings()
        if self.failures.faults is not None:
            self.failures.faults.after_batch([j.params.prompt for j in batch])
        for job, images, revised, tokens in zip(batch, outcome.images, outcome.revised_prompts, outcome.prompt_tokens):
            if job.state.finished:  # ended meanwhile (drain deadline, watchdog): it keeps that outcome
                continue
            if images is None or job.cancelled:
                finish_cancelled(job, self.metrics)
            else:
                self.metrics.job_succeeded(model.id, job.params, len(images), outcome.weight_decode_s)
                job.finish(JobState.SUCCEEDED, result=JobResult(images, revised, dict(timings), rows, tokens,
                                                                outcome.latent_cells))

    # -- shutdown ---------------------------------------------------------------------------------
    async def drain(self, timeout: float) -> None:
        """Refuse new work; let queued and running jobs finish for up to `timeout` seconds; then end
        every job left as cancelled ("shutdown", answered 503) without waiting for its device.
        Idempotent: the signal handler drains first, the lifespan's shutdown finds nothing left."""
        self.accepting = False
        if self._drained:
            return
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            left = list(self.pending) + list(self.running)
            log.warning("drain: %d queued and %d running job(s) unfinished after %.0fs; answering them 503",
                        len(self.pending), len(self.running), timeout)
            self.pending.clear()
            for job in left:
                if not job.state.finished:
                    job.request_cancel("shutdown")
                    finish_cancelled(job, self.metrics)
            self.running.clear()
            self._check_idle()
        self._drained = True

    async def shutdown(self, timeout: float) -> None:
        """Drain, then stop the workers. A device thread still inside a call is left behind."""
        await self.drain(timeout)
        self._stopping = True
        self._wake.set()
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        if self.failures.faults is not None:
            self.failures.faults.release()
        for ex in self._executors.values():
            ex.shutdown(wait=False, cancel_futures=True)
