"""Bounded job queue, batching, and one worker per device.

Admission: `submit` refuses with `QueueFull` (→ 429 + Retry-After) when `max_queue_size` jobs
already wait; running jobs do not count. Batching: a worker takes the oldest waiting job and every
later waiting job with the same `batch_key()` while the batch holds at most `max_batch_size`
images (a job is never split; one larger than the limit runs alone). Every model has a replica on
every device and all workers share one queue, so a second GPU simply takes the next batch.

The pipeline runs in a single-thread executor per device: the event loop keeps answering
/healthz, /metrics and progress polls while a batch runs, and a device never runs two batches at
once (on one GPU that would not add throughput, only memory).

Faults (docs/server.md, "Faults"): every job ends with exactly one outcome. An out-of-memory
error frees memory and retries the batch's jobs one by one; only a job that fails alone fails
(`insufficient_memory`). A sticky device error or a stalled step (watchdog) marks the dispatcher
unhealthy: its running and queued jobs fail at once (`worker_unhealthy`) and /healthz turns 503 so
the orchestrator restarts the process. Any other exception fails its jobs (`generation_failed`,
or `internal_error` outside the pipeline) and the worker carries on. Drain (`drain`) refuses new
jobs, waits for the rest up to a deadline, then ends what is left as `shutdown`.
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
from vqdm.server.faults import FaultInjector
from vqdm.server.jobs import GenerationParams, Job, JobResult, JobState
from vqdm.server.metrics import Metrics
from vqdm.server.settings import Settings
from vqdm.server.watchdog import Watchdog, install_progress_hooks

if TYPE_CHECKING:
    from vqdm.server.loader import ServedModel

log = logging.getLogger("vqdm.server")
_MAX_REMEMBERED_JOBS = 10_000


class QueueFull(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__(f"queue full, retry in {retry_after}s")
        self.retry_after = retry_after


class NotAccepting(Exception):
    """The server is shutting down (or not started)."""


class Unhealthy(Exception):
    """A device is stuck or poisoned; the process must be restarted."""


class WarmUpFailed(Exception):
    """The configured worst case does not run on this device."""


class Dispatcher:
    def __init__(self, settings: Settings, metrics: Metrics, devices: list[str]) -> None:
        self.settings = settings
        self.metrics = metrics
        self.devices = devices
        self.models: dict[str, "ServedModel"] = {}
        self.pending: collections.deque[Job] = collections.deque()
        self.jobs: dict[str, Job] = {}  # live and recently finished, for GET /v1/requests/{id}
        self.labels: dict[tuple[int | None, str], Job] = {}  # (owner, client X-Request-Id) -> latest job
        self.running: set[Job] = set()
        self.accepting = False
        self.unhealthy: str | None = None  # why the process must restart (/healthz says 503)
        self.faults: FaultInjector | None = None  # test-only (vqdm.server.faults)
        self.watchdog = Watchdog(settings.stall_timeout_s, self._on_stall)
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

    # -- admission and bookkeeping (event loop only) --------------------------------------------
    def submit(self, job: Job) -> None:
        if self.unhealthy:
            raise Unhealthy(self.unhealthy)
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

    def find(self, ref: str, owner: int | None) -> Job | None:
        """A job by its server-made id or by the client's label, only for the key that submitted it."""
        job = self.jobs.get(ref)
        if job is not None and job.owner == owner:
            return job
        return self.labels.get((owner, ref))

    def _remember(self, job: Job) -> None:
        self.jobs[job.id] = job
        if job.label is not None:
            self.labels[(job.owner, job.label)] = job
        if len(self.jobs) > _MAX_REMEMBERED_JOBS:
            for old_id, old in list(self.jobs.items()):
                if old.state.finished:
                    del self.jobs[old_id]
                    self._drop_label(old)
                    break

    def _forget_later(self, job: Job) -> None:
        loop = asyncio.get_running_loop()
        loop.call_later(self.settings.job_retention_s, self._forget, job)

    def _forget(self, job: Job) -> None:
        if self.jobs.get(job.id) is job:
            del self.jobs[job.id]
        self._drop_label(job)

    def _drop_label(self, job: Job) -> None:
        if job.label is not None and self.labels.get((job.owner, job.label)) is job:
            del self.labels[(job.owner, job.label)]

    def _fail(self, job: Job, code: str) -> None:
        """End a job that did not succeed (a job already ended keeps its first outcome)."""
        if job.state.finished:
            return
        if job.cancelled:
            self._finish_cancelled(job)
        else:
            job.finish(JobState.FAILED, error=code)  # counted in vqdm_errors_total as its reply goes out
        self._forget_later(job)

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
        """Take the loaded models: progress hooks for the watchdog (and the test-only fault hook)."""
        from vqdm.server import faults

        self.models = models
        if faults.enabled():
            log.warning("%s=1: test-only fault injection is ON; never run a real server like this", faults.ENV_VAR)
            self.faults = FaultInjector()
        for model in models.values():
            for device, replica in model.replicas.items():
                install_progress_hooks(replica.pipe, self.watchdog.hook_for(device))
                if self.faults is not None:
                    faults.install(replica.pipe, self.faults)

    def start(self) -> None:
        self.accepting = True
        self._workers = [asyncio.create_task(self._worker(d), name=f"vqdm-worker-{d}") for d in self.devices]
        if self.settings.stall_timeout_s > 0:
            self._workers.append(asyncio.create_task(self.watchdog.run(), name="vqdm-watchdog"))

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
                await self._run(device, batch)
            except Exception:  # never let one batch take the worker down, nor leave its clients waiting
                log.exception("worker %s: batch %s failed outside the pipeline", device, _ids(batch))
                for job in batch:
                    self._fail(job, failures.INTERNAL_ERROR)
            finally:
                self.running.difference_update(batch)
                self._running_on[device] = []
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
        log.info("batch of %d image(s) on %s: requests %s", rows, device, _ids(batch))
        self._running_on[device] = list(batch)
        t0 = time.perf_counter()
        try:
            outcome = await self.run_on(device, self._guarded, device, run_batch, model.replicas[device], members,
                                        [j.params.prompt for j in batch])
        except Exception as e:
            await self._batch_failed(device, batch, e)
            return
        finally:
            self.metrics.in_flight.dec(len(batch))
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * (time.perf_counter() - t0)
        for s in outcome.step_seconds:
            self.metrics.step_duration.labels(model.id).observe(s)
        if outcome.images and any(imgs is not None for imgs in outcome.images):
            self.metrics.vae_duration.labels(model.id).observe(outcome.vae_decode_s)
        timings = outcome.timings()
        if self.faults is not None:
            self.faults.after_batch([j.params.prompt for j in batch])
        for job, images, revised in zip(batch, outcome.images, outcome.revised_prompts):
            if job.state.finished:  # ended meanwhile (drain deadline, watchdog): it keeps that outcome
                continue
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

    def _guarded(self, device: str, fn, replica, members, prompts):
        """Runs in the device's thread: the batch under the watchdog (and the test fault hook)."""
        self.watchdog.begin(device)
        try:
            if self.faults is not None:
                self.faults.arm(prompts)
            return fn(replica, members)
        finally:
            self.watchdog.end(device)

    async def _batch_failed(self, device: str, batch: list[Job], e: Exception) -> None:
        if self.unhealthy:  # the watchdog already ended these jobs; this is the stuck call returning
            log.warning("batch %s on %s ended after the device was declared unhealthy: %s: %s",
                        _ids(batch), device, type(e).__name__, e)
            return
        if failures.is_out_of_memory(e):
            await asyncio.get_running_loop().run_in_executor(self._executors[device], failures.free_memory)
            if len(batch) > 1:
                log.warning("out of memory in batch %s on %s; retrying its %d jobs one by one", _ids(batch),
                            device, len(batch), exc_info=e)
                for job in batch:
                    if job.cancelled or self.unhealthy:
                        self._fail(job, failures.WORKER_UNHEALTHY)
                    elif not job.state.finished:
                        await self._run_alone(device, job)
                return
            log.error("out of memory running request %s alone on %s", batch[0].id, device, exc_info=e)
            self._fail(batch[0], failures.INSUFFICIENT_MEMORY)
            return
        if failures.poisons_device(e):
            log.critical("device %s is poisoned; marking the server unhealthy (batch %s)", device, _ids(batch),
                         exc_info=e)
            self.mark_unhealthy(device, f"device error on {device}: restart needed")
            return
        log.error("batch %s failed on %s", _ids(batch), device, exc_info=e)
        for job in batch:
            self._fail(job, failures.GENERATION_FAILED)

    async def _run_alone(self, device: str, job: Job) -> None:
        """Retry one job of a batch that ran out of memory. Its clients saw 'started' already."""
        await self._run(device, [job])

    def _on_stall(self, device: str, seconds: float) -> None:
        log.critical("watchdog: the batch on %s made no progress for %.0fs (requests %s); marking the server "
                     "unhealthy", device, seconds, _ids(self._running_on.get(device, [])))
        self.mark_unhealthy(device, f"worker on {device} made no progress for {seconds:.0f}s: restart needed")

    def mark_unhealthy(self, device: str, reason: str) -> None:
        """The device cannot be trusted again: its running jobs and every queued job end now (503), new
        ones are refused, and /healthz fails so that the orchestrator restarts the process."""
        if self.unhealthy is None:
            self.unhealthy = reason
        self.accepting = False
        stuck = list(self._running_on.get(device, []))
        queued = list(self.pending)
        self.pending.clear()
        for job in stuck + queued:
            self._fail(job, failures.WORKER_UNHEALTHY)
        self.running.difference_update(stuck)
        self._check_idle()
        self._wake.set()

    # -- warm-up and shutdown ---------------------------------------------------------------------
    def warmup_params(self, model: "ServedModel", device: str, steps: int) -> GenerationParams:
        """The configured worst case (max_batch_size images at the largest size the limits admit), or,
        with warmup_size=default or =auto on CPU, one image at the model's own size."""
        s = self.settings
        worst = s.warmup_size == "max" or (s.warmup_size == "auto" and not device.startswith("cpu"))
        if worst:
            side = min(s.max_side, math.isqrt(s.max_pixels)) // 8 * 8
            n, width, height = s.max_batch_size, side, side
        else:
            n, width, height = 1, model.default_width, model.default_height
        return GenerationParams(model=model.id, prompt="warm-up", negative_prompt=None, n=n, width=width,
                                height=height, steps=steps, guidance=model.default_guidance, scheduler="default", seed=0)

    async def warm_up(self, steps: int) -> None:
        """One generation per model and device, through the same runner as real requests. An
        out-of-memory error here fails start-up with the limits to lower."""
        from vqdm.server.runner import Member, run_batch

        for model in self.models.values():
            for device in self.devices:
                params = self.warmup_params(model, device, steps)
                t0 = time.perf_counter()
                try:
                    await self.run_on(device, run_batch, model.replicas[device], [Member(params)])
                except Exception as e:
                    if failures.is_out_of_memory(e):
                        raise WarmUpFailed(
                            f"the configured worst case ({params.n} x {params.width}x{params.height}) does not fit "
                            f"on {device}: lower --max-batch-size or --max-side/--max-pixels") from e
                    raise
                log.info("warmed up %s on %s with %d x %dx%d in %.2fs", model.id, device, params.n, params.width,
                         params.height, time.perf_counter() - t0)

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
                    self._finish_cancelled(job)
                    self._forget_later(job)
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
        if self.faults is not None:
            self.faults.release()
        for ex in self._executors.values():
            ex.shutdown(wait=False, cancel_futures=True)

    def stuck_devices(self) -> list[str]:
        """Devices whose thread is still inside a batch after shutdown (a hung kernel)."""
        return self.watchdog.busy()


def _ids(batch: list[Job]) -> str:
    return ",".join(j.id + (f" ({j.label})" if j.label else "") for j in batch)
