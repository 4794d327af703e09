"""Prometheus metrics (SPEC §9). Names are a contract with deploy/ (Grafana dashboard, alerts,
queue-depth autoscaling): change one only together with those files.

Each app gets its own CollectorRegistry (no module globals), so several apps in one process
(tests) do not share counters. Labels never carry prompts, seeds or users: `model` is a served
model id or "unknown", `status` an HTTP status code, `reason` and `stage` fixed words.

What counts as what:
- vqdm_requests_total{model,status}: every POST /v1/images/generations (and the other routes that
  submit jobs: middleware.JOB_PATHS) by final status, 499 for a
  request cancelled by its client (disconnect or DELETE). A streamed request counts the status
  its job ended with, even though the stream itself began with 200.
- vqdm_request_duration_seconds{model}: arrival to response, for requests admitted to the queue
  that were not cancelled (rejections like 400/429 would pull the percentiles down to zero).
- vqdm_queue_wait_seconds{model}: admission to the start of the job's batch.
- vqdm_denoise_step_duration_seconds{model}: one observation per denoising step of a batch
  (U-Net call + scheduler step; on CUDA timed by events on the device stream, read after the batch).
- vqdm_vae_decode_duration_seconds{model}: the batch's VAE decode.
- vqdm_weight_decode_duration_seconds{model}: seconds spent decoding VQ weights into dense ones
  during a request, measured by the weight cache (vqdm.models.weight_cache); observed only when
  a cache policy (request, budget=...) is active. With policy `none` the kernels decode inside
  each layer call, which cannot be separated from the matmul without slowing it, so the metric
  is registered but gets no observations.
- vqdm_in_flight_requests: jobs inside a running batch; vqdm_queue_depth: jobs waiting.
- vqdm_lora_requests_total{model,lora}: requests that succeeded with that adapter active (`lora`
  is a name configured with --lora, never user input).
- vqdm_image_edits_total{model,kind}: edits that succeeded, `kind` img2img or inpaint. Edits also
  count in vqdm_requests_total and the duration histograms, like generations.
- vqdm_peer_errors_total{reason}: peer replicas skipped while looking for a job held elsewhere
  (server.replicas), `reason` one of PEER_ERROR_REASONS; never a peer's address.
- vqdm_compiled_steps_total{mode,fallback}: U-Net calls of served batches on replicas with compiled
  serving on (vqdm.server.compiled), `mode` the compile mode, `fallback` "none" when the compiled
  graph ran, else why the eager U-Net ran instead (one of COMPILE_FALLBACKS). Warm-up is not counted.
- vqdm_image_store_bytes, vqdm_image_store_files: what the image store (vqdm.server.image_store) holds
  after its last sweep, over the whole folder when replicas share it;
  vqdm_image_store_evictions_total{reason}: files this replica removed, `reason` "size" (over the
  cap, oldest first) or "expired" (past the TTL).
- vqdm_event_loop_lag_seconds: how late the event loop ran a 100 ms metronome (vqdm.server.loop_lag),
  one observation per tick of a fixed schedule: how long anything on the loop waited behind whatever
  held it (a long stall is every tick it delayed).
"""
from __future__ import annotations

import resource
import sys
from typing import TYPE_CHECKING, Callable

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, disable_created_metrics,
                               generate_latest)

if TYPE_CHECKING:
    from vqdm.server.jobs import GenerationParams
    from vqdm.server.runner import BatchOutcome

# 1 ms (a tiny-model step) .. 10 min (SDXL on CPU at 1024²); 10/60/180 s are alert thresholds.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0,
                    60.0, 120.0, 180.0, 300.0, 600.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
# Why a peer replica gave no usable answer (server.replicas): timed out, connection failed, a 5xx
# or redirect, a body that is no vqdm reply, a dns: peer entry that did not resolve.
PEER_ERROR_REASONS = ("timeout", "unreachable", "bad_status", "malformed", "unresolved")
# Why a served U-Net call ran eagerly on a replica with compiled graphs ("none": it did not):
# vqdm.server.compiled says what each means.
COMPILE_FALLBACKS = ("none", "lora", "cache", "shrink", "shape", "error")
IMAGE_EVICTION_REASONS = ("size", "expired")
# A quiet loop is late by well under 1 ms; 250 ms is the /healthz p99 the server promises under load.
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _peak_rss_bytes() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB


def _cuda(stat: str) -> Callable[[], float]:
    def read() -> float:
        torch = sys.modules.get("torch")  # never import torch (or initialise CUDA) just for a scrape
        if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return 0.0
        fn = getattr(torch.cuda, stat)
        return float(sum(fn(i) for i in range(torch.cuda.device_count())))

    return read


class Metrics:
    def __init__(self) -> None:
        disable_created_metrics()  # no `*_created` series: dashboards never read them (process-wide switch)
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes, cpu seconds, open fds
        self.requests = Counter("vqdm_requests_total", "Image generation requests by final HTTP status",
                                ["model", "status"], registry=r)
        self.request_duration = Histogram("vqdm_request_duration_seconds", "Arrival to response, admitted requests",
                                          ["model"], buckets=DURATION_BUCKETS, registry=r)
        self.queue_wait = Histogram("vqdm_queue_wait_seconds", "Admission to the start of the job's batch",
                                    ["model"], buckets=DURATION_BUCKETS, registry=r)
        self.step_duration = Histogram("vqdm_denoise_step_duration_seconds", "One denoising step of a batch",
                                       ["model"], buckets=DURATION_BUCKETS, registry=r)
        self.vae_duration = Histogram("vqdm_vae_decode_duration_seconds", "VAE decode of a batch",
                                      ["model"], buckets=DURATION_BUCKETS, registry=r)
        self.weight_decode_duration = Histogram(
            "vqdm_weight_decode_duration_seconds", "VQ weight decoding during a request (weight cache active)",
            ["model"], buckets=DURATION_BUCKETS, registry=r)
        self.queue_depth = Gauge("vqdm_queue_depth", "Jobs waiting for a worker", registry=r)
        self.in_flight = Gauge("vqdm_in_flight_requests", "Jobs inside a running batch", registry=r)
        self.images = Counter("vqdm_images_generated_total", "Images returned to clients", ["model"], registry=r)
        self.batch_size = Histogram("vqdm_batch_size", "Images per pipeline call", buckets=BATCH_BUCKETS, registry=r)
        self.errors = Counter("vqdm_errors_total", "Error responses and failed jobs by reason", ["reason"], registry=r)
        self.cancelled = Counter("vqdm_requests_cancelled_total", "Jobs cancelled, by where they were",
                                 ["model", "stage"], registry=r)
        self.weight_bytes = Gauge("vqdm_model_weight_bytes", "U-Net weight bytes as held and as dense fp16",
                                  ["model", "kind"], registry=r)
        peak = Gauge("vqdm_process_peak_rss_bytes", "Peak resident set size of the server process", registry=r)
        peak.set_function(_peak_rss_bytes)
        for name, stat, doc in (("allocated", "memory_allocated", "allocated by tensors"),
                                ("reserved", "memory_reserved", "reserved by the caching allocator"),
                                ("peak", "max_memory_allocated", "peak allocated")):
            Gauge(f"vqdm_cuda_memory_{name}_bytes", f"CUDA memory {doc}, all devices (0 without CUDA)",
                  registry=r).set_function(_cuda(stat))
        self.build_info = Gauge("vqdm_build_info", "Always 1; labels say what is running",
                                ["version", "backend", "device"], registry=r)
        self.ready = Gauge("vqdm_ready", "1 when models are loaded and warmed up", registry=r)
        self.lora_uses = Counter("vqdm_lora_requests_total", "Finished requests that used a LoRA, per adapter",
                                 ["model", "lora"], registry=r)
        self.edits = Counter("vqdm_image_edits_total", "Finished POST /v1/images/edits requests by kind",
                             ["model", "kind"], registry=r)
        self.peer_errors = Counter("vqdm_peer_errors_total", "Peer replicas skipped during a job lookup, by reason",
                                   ["reason"], registry=r)
        for reason in PEER_ERROR_REASONS:  # every series exists from the start: rate() sees the first error
            self.peer_errors.labels(reason)
        self.compiled_steps = Counter("vqdm_compiled_steps_total",
                                      "U-Net calls with compiled serving on, by mode and fallback (none: compiled)",
                                      ["mode", "fallback"], registry=r)
        self.image_store_bytes = Gauge("vqdm_image_store_bytes", "Bytes of image files kept for url replies",
                                       registry=r)
        self.image_store_files = Gauge("vqdm_image_store_files", "Image files kept for url replies", registry=r)
        self.image_store_evictions = Counter("vqdm_image_store_evictions_total",
                                             "Image files removed, over the size cap or past the TTL",
                                             ["reason"], registry=r)
        for reason in IMAGE_EVICTION_REASONS:
            self.image_store_evictions.labels(reason)
        self.loop_lag = Histogram("vqdm_event_loop_lag_seconds",
                                  "How late the event loop ran each tick of a 100 ms metronome",
                                  buckets=LAG_BUCKETS, registry=r)

    # -- what a batch and its jobs add (the dispatcher calls these) -------------------------------
    def batch_started(self, model_id: str, queued_since: list[float], rows: int, now: float) -> None:
        """A batch of jobs (admitted at `queued_since`, perf_counter) starts with `rows` images."""
        for t in queued_since:
            self.queue_wait.labels(model_id).observe(now - t)
        self.in_flight.inc(len(queued_since))
        self.batch_size.observe(rows)

    def batch_ran(self, model_id: str, outcome: "BatchOutcome") -> None:
        for s in outcome.step_seconds:
            self.step_duration.labels(model_id).observe(s)
        if outcome.images and any(imgs is not None for imgs in outcome.images):
            self.vae_duration.labels(model_id).observe(outcome.vae_decode_s)
        for fallback, calls in outcome.compiled_steps.items():
            self.compiled_steps.labels(outcome.compile_mode, fallback).inc(calls)

    def compiled_serving(self, mode: str) -> None:
        """A replica serves with compiled graphs in `mode`: every series exists from the start."""
        for fallback in COMPILE_FALLBACKS:
            self.compiled_steps.labels(mode, fallback)

    def job_succeeded(self, model_id: str, params: "GenerationParams", images: int,
                      weight_decode_s: float | None) -> None:
        if weight_decode_s is not None:
            self.weight_decode_duration.labels(model_id).observe(weight_decode_s)
        self.images.labels(model_id).inc(images)
        if params.edit is not None:
            self.edits.labels(model_id, params.edit.kind).inc()
        for name, _ in params.loras:
            self.lora_uses.labels(model_id, name).inc()

    def set_model(self, model_id: str, weight_bytes: dict[str, int]) -> None:
        for kind in ("stored", "dense_fp16"):
            self.weight_bytes.labels(model_id, kind).set(weight_bytes[kind])

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
