"""One image-generation job: its validated parameters, its state machine and its progress.

A job lives in the event loop; the worker thread touches only `cancel_flag` (a threading.Event
it polls at every denoising step) and reports progress back through `loop.call_soon_threadsafe`.

    queued ──► running ──► succeeded
       │          ├──────► failed
       └──────────┴──────► cancelled      (DELETE, client gone, timeout, or shutdown deadline)

`JobRegistry` keeps live and recently finished jobs for GET/DELETE /v1/requests/{id}: by the
server's id and by (API key, client label). However a job ends (`Job.finish`, the one way to end
one), it drops its edit input at once and the registry forgets it `job_retention_s` later.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from vqdm.server.metrics import Metrics

log = logging.getLogger("vqdm.server")
MAX_REMEMBERED_JOBS = 10_000


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class GenerationParams:
    """A validated request, with every default resolved; image i uses seed + i."""

    model: str
    prompt: str
    negative_prompt: str | None
    n: int
    width: int
    height: int
    steps: int
    guidance: float
    scheduler: str
    seed: int
    output_format: str = "png"
    output_compression: int | None = None
    response_format: str = "b64_json"  # or "url": the reply links to stored files (vqdm.server.image_store)
    loras: tuple[tuple[str, float], ...] = ()  # (name, scale), sorted by name
    partial_images: int = 0  # previews per image sent while it is made (a streamed request's partial_images)
    edit: Any = field(default=None, compare=False)  # vqdm.server.edits.EditInput for POST /v1/images/edits
    # The asked size when the model generates at another (width x height, its trained size nearest the
    # asked one: vqdm.server.sizes) and the images are resized to it; None: they are generated as asked.
    resize_to: tuple[int, int] | None = None

    @property
    def edit_pixels(self) -> int:
        """Pixels of input an edit holds while it waits (its image, and mask, at the output size, and the
        full-size source A1111's "only masked" pastes into); 0 for a generation."""
        return self.edit.pixels if self.edit is not None else 0

    def size_fields(self) -> dict[str, str]:
        """The reply's `size` (the images' size), and `generated_size` when the model drew at another."""
        out = {"size": f"{self.width}x{self.height}"}
        if self.resize_to is not None:
            out = {"size": f"{self.resize_to[0]}x{self.resize_to[1]}", "generated_size": out["size"]}
        return out

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.n)]

    def batch_key(self) -> tuple:
        """Jobs with equal keys run in one pipeline call. Output format is not part of it: images
        are encoded per job after the batch. A negative prompt is: SDXL encodes "no negative
        prompt" as zeros, not as the empty string, and a pipeline call takes one or the other.
        The LoRA set is: one pipeline call runs with one set of adapters active. So are an edit's
        kind and strength: img2img and inpainting are different pipelines. The size is the generated
        one: requests resized to different sizes afterwards (`resize_to`) share a call."""
        return (self.model, self.width, self.height, self.steps, self.guidance, self.scheduler,
                self.negative_prompt is not None, self.loras, self.edit.batch_key() if self.edit else None)


@dataclass
class JobResult:
    images: list[Any]  # PIL images, one per seed
    revised_prompt: str | None
    timings: dict[str, float]
    batch_size: int
    prompt_tokens: int = 0  # CLIP tokens of the prompt the model read
    latent_cells: int = 0  # latent positions per image


@dataclass(eq=False)
class Job:
    id: str
    params: GenerationParams
    owner: int | None = None  # index of the API key that submitted it (None: no keys configured)
    label: str | None = None  # the client's X-Request-Id: a correlation label, never the job's identity
    state: JobState = JobState.QUEUED
    created: float = field(default_factory=time.time)
    enqueued_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    finished_at: float | None = None
    step: int = 0
    total_steps: int = 0
    batch_size: int = 0
    cancel_reason: str | None = None  # "client_disconnected" | "deleted" | "timeout" | "shutdown"
    cancel_stage: str | None = None  # "queued" | "running"
    error: str | None = None  # a short code (vqdm.server.failures), never exception text
    result: JobResult | None = None
    cancel_flag: threading.Event = field(default_factory=threading.Event)
    on_end: Callable[["Job"], None] | None = None  # called once, when the job ends (JobRegistry's retention)
    latest_preview: Any = None  # the newest partial image (PIL, output size) of any of its images, while it runs
    previews_sent: set = field(default_factory=set)  # (image index, partial image index) published

    def __post_init__(self) -> None:
        self.total_steps = self.params.steps
        self.done: asyncio.Event = asyncio.Event()
        self.events: asyncio.Queue = asyncio.Queue()  # progress events for a streaming client

    # -- event-loop side ----------------------------------------------------------------------
    def publish(self, kind: str, **data: Any) -> None:
        self.events.put_nowait((kind, data))

    def mark_running(self, batch_size: int) -> None:
        self.state = JobState.RUNNING
        self.started_at = time.perf_counter()
        self.batch_size = batch_size
        self.publish("started", batch_size=batch_size)

    def set_progress(self, step: int, total: int) -> None:
        if self.state is JobState.RUNNING and step > self.step:
            self.step, self.total_steps = step, total
            self.publish("progress", step=step, total_steps=total)

    def add_preview(self, index: int, partial_index: int, image: Any) -> None:
        """A partial image of image `index` (0-based within the job) arrived from the worker. Published
        once: a job retried alone after its batch ran out of memory makes its previews again."""
        if self.state is JobState.RUNNING and (index, partial_index) not in self.previews_sent:
            self.previews_sent.add((index, partial_index))
            self.latest_preview = image
            self.publish("partial_image", index=index, partial_image_index=partial_index, image=image)

    def finish(self, state: JobState, *, result: JobResult | None = None, error: str | None = None) -> None:
        if self.state.finished:
            return
        self.state = state
        self.result, self.error = result, error
        self.finished_at = time.perf_counter()
        # The edit's pixels are needed no more. A batch still running holds its own reference to them
        # (a job ended by the drain deadline or the watchdog), so only the job's is dropped.
        self.params = dataclasses.replace(self.params, edit=None)
        self.latest_preview = None
        self.publish(state.value)
        self.done.set()
        if self.on_end is not None:
            self.on_end(self)

    def request_cancel(self, reason: str) -> None:
        """Ask for cancellation; the queue or the worker carries it out and finishes the job."""
        if self.state.finished or self.cancel_flag.is_set():
            return
        self.cancel_reason = reason
        self.cancel_stage = "running" if self.state is JobState.RUNNING else "queued"
        self.cancel_flag.set()

    @property
    def cancelled(self) -> bool:
        return self.cancel_flag.is_set()

    def describe(self, queue_position: int | None) -> dict[str, Any]:
        """GET /v1/requests/{id}."""
        now = time.perf_counter()
        end = self.finished_at or now
        out: dict[str, Any] = {
            "id": self.id,
            "object": "image_generation.request",
            "state": "cancelling" if self.cancelled and not self.state.finished else self.state.value,
            "model": self.params.model,
            "created": int(self.created),
            "n": self.params.n,
            **self.params.size_fields(),
            "queue_position": queue_position,
            "step": self.step,
            "total_steps": self.total_steps,
            "progress": self.step / self.total_steps if self.total_steps else 0.0,
            "batch_size": self.batch_size or None,
            "queued_seconds": round((self.started_at or end) - self.enqueued_at, 4),
            "running_seconds": round(end - self.started_at, 4) if self.started_at else None,
        }
        if self.label is not None:
            out["label"] = self.label
        if self.cancel_reason:
            out["cancel_reason"] = self.cancel_reason
        if self.error:
            out["error"] = self.error
        return out


def finish_cancelled(job: Job, metrics: "Metrics") -> None:
    """End a job whose cancellation was asked for: counted by where it was, logged with its step."""
    job.finish(JobState.CANCELLED)
    metrics.cancelled.labels(job.params.model, job.cancel_stage or "running").inc()
    log.info("request %s cancelled (%s, while %s) at step %d/%d", job.id, job.cancel_reason,
             job.cancel_stage, job.step, job.total_steps)


def job_ids(batch: list[Job]) -> str:
    """The jobs of a batch for a log line: server ids, each with its client label."""
    return ",".join(j.id + (f" ({j.label})" if j.label else "") for j in batch)


class JobRegistry:
    """Live and recently finished jobs (event loop only). A job is forgotten `retention_s` seconds
    after it ends, whatever way it ended (it tells the registry itself: `Job.on_end`); past
    `max_jobs` the oldest finished one goes at once."""

    def __init__(self, retention_s: float, max_jobs: int = MAX_REMEMBERED_JOBS) -> None:
        self.retention_s = retention_s
        self.max_jobs = max_jobs
        self._by_id: dict[str, Job] = {}
        self._by_label: dict[tuple[int | None, str], Job] = {}  # (owner, client X-Request-Id) -> latest job

    def __getitem__(self, job_id: str) -> Job:
        return self._by_id[job_id]

    def __len__(self) -> int:
        return len(self._by_id)

    def remember(self, job: Job) -> None:
        job.on_end = self._forget_later
        self._by_id[job.id] = job
        if job.label is not None:
            self._by_label[(job.owner, job.label)] = job
        if len(self._by_id) > self.max_jobs:
            for old_id, old in list(self._by_id.items()):
                if old.state.finished:
                    del self._by_id[old_id]
                    self._drop_label(old)
                    break

    def find(self, ref: str, owner: int | None) -> Job | None:
        """A job by its server-made id or by the client's label, only for the key that submitted it."""
        job = self._by_id.get(ref)
        if job is not None and job.owner == owner:
            return job
        return self._by_label.get((owner, ref))

    def live(self, owner: int | None) -> list[Job]:
        """This key's queued and running jobs, oldest first (AUTOMATIC1111's progress and interrupt)."""
        return [j for j in self._by_id.values() if j.owner == owner and not j.state.finished]

    def labelled(self, owner: int | None, label: str) -> Job | None:
        """The latest job this key submitted under the client label `label`."""
        return self._by_label.get((owner, label))

    def _forget_later(self, job: Job) -> None:
        """A job just ended: it stays visible for the retention time."""
        asyncio.get_running_loop().call_later(self.retention_s, self.forget, job)

    def forget(self, job: Job) -> None:
        if self._by_id.get(job.id) is job:
            del self._by_id[job.id]
        self._drop_label(job)

    def _drop_label(self, job: Job) -> None:
        if job.label is not None and self._by_label.get((job.owner, job.label)) is job:
            del self._by_label[(job.owner, job.label)]
