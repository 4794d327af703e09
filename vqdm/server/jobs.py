"""One image-generation job: its validated parameters, its state machine and its progress.

A job lives in the event loop; the worker thread touches only `cancel_flag` (a threading.Event
it polls at every denoising step) and reports progress back through `loop.call_soon_threadsafe`.

    queued ──► running ──► succeeded
       │          ├──────► failed
       └──────────┴──────► cancelled      (DELETE, client gone, timeout, or shutdown deadline)
"""
from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


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
    loras: tuple[tuple[str, float], ...] = ()  # (name, scale), sorted by name
    edit: Any = field(default=None, compare=False)  # vqdm.server.edits.EditInput for POST /v1/images/edits

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.n)]

    def batch_key(self) -> tuple:
        """Jobs with equal keys run in one pipeline call. Output format is not part of it: images
        are encoded per job after the batch. A negative prompt is: SDXL encodes "no negative
        prompt" as zeros, not as the empty string, and a pipeline call takes one or the other.
        The LoRA set is: one pipeline call runs with one set of adapters active. So are an edit's
        kind and strength: img2img and inpainting are different pipelines."""
        return (self.model, self.width, self.height, self.steps, self.guidance, self.scheduler,
                self.negative_prompt is not None, self.loras, self.edit.batch_key() if self.edit else None)


@dataclass
class JobResult:
    images: list[Any]  # PIL images, one per seed
    revised_prompt: str | None
    timings: dict[str, float]
    batch_size: int


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

    def finish(self, state: JobState, *, result: JobResult | None = None, error: str | None = None) -> None:
        if self.state.finished:
            return
        self.state = state
        self.result, self.error = result, error
        self.finished_at = time.perf_counter()
        self.publish(state.value)
        self.done.set()

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
            "size": f"{self.params.width}x{self.params.height}",
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
