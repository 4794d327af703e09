"""What the job endpoints share (POST /v1/images/generations in `routes`, /v1/images/edits in
`edits`, AUTOMATIC1111's txt2img and img2img in `a1111`): who may call (API keys) and whether the
server takes work, then submitting a validated job and replying to it: waiting for it (cancelled
when the client goes away or the deadline passes) or streaming its events, and the body or error
it ends with."""
from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import time
from typing import Any, AsyncIterator

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse, ServerSentEvent

from vqdm.server import failures
from vqdm.server.batching import NotAccepting, QueueFull, Unhealthy
from vqdm.server.errors import APIError, error_payload
from vqdm.server.image_store import ImageLinks
from vqdm.server.imaging import encode_b64
from vqdm.server.jobs import Job, JobResult, JobState
from vqdm.server.state import ServerState

_DISCONNECT_POLL_S = 0.1


def get_state(request: Request) -> ServerState:
    return request.app.state.vqdm


def authorize(request: Request, state: ServerState) -> int | None:
    """Index of the request's API key; None when no keys are configured."""
    return key_index(request.headers.get("authorization", ""), state.settings.api_keys)


def key_index(header: str, keys: list[str]) -> int | None:
    """Index of the key an `Authorization: Bearer` header holds, or 401; None when `keys` is empty.
    Constant-time compares."""
    if not keys:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
    match = None
    for i, key in enumerate(keys):  # compare against every key so timing does not reveal which matched
        if hmac.compare_digest(token.encode(), key.encode()):
            match = i
    if match is None:
        raise APIError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return match


def _shutting_down() -> APIError:
    return APIError(503, "server is shutting down; retry (another replica will take it)",
                    code="server_shutting_down", reason="shutting_down", headers={"Retry-After": "5"})


def _unhealthy(reason: str) -> APIError:
    return APIError(503, f"server unhealthy ({reason}); retry (another replica will take it)",
                    code="worker_unhealthy", reason="unhealthy", headers={"Retry-After": "5"})


def require_ready(state: ServerState) -> None:
    if state.load_error:  # the reason is in the server log; /readyz is open to anyone
        raise APIError(503, "models failed to load; the server log says why", code="load_failed")
    if state.dispatcher.unhealthy:
        raise _unhealthy(state.dispatcher.unhealthy)
    if state.draining:
        raise _shutting_down()
    if not state.ready:
        raise APIError(503, f"not ready: {state.phase}", code="not_ready", headers={"Retry-After": "5"})


async def submit_and_reply(request: Request, state: ServerState, params, owner: int | None, *, stream: bool,
                           event_prefix: str = "image_generation", stream_format: str | None = None) -> Response:
    """Queue one validated job (generation or edit) and answer it: stream its events, or wait for it
    and reply with OpenAI's body."""
    job = submit(request, state, params, owner)
    if stream:
        events = _stream(request, state, job, event_prefix, stream_format or "openai")
        return EventSourceResponse(events, ping=15, send_timeout=30,
                                   shutdown_grace_period=state.settings.shutdown_timeout_s)
    await wait(request, state, job)
    links = None
    if params.response_format == "url":  # a stream's events carry base64, as OpenAI's do
        links = ImageLinks(state.image_store, state.settings.public_url or str(request.base_url).rstrip("/"))
    return JSONResponse(await success_body(job, links))


def submit(request: Request, state: ServerState, params, owner: int | None) -> Job:
    """Queue one validated job for the key `owner`: the job id is the server's, the client's
    X-Request-Id only a label among this key's own jobs. Every dialect's routes submit through here."""
    scope_state = request.scope["state"]
    label = scope_state.get("client_label")
    live = state.dispatcher.jobs.labelled(owner, label) if label else None  # only this key's own jobs
    if live is not None and not live.state.finished:
        raise APIError(409, f"X-Request-Id {label!r} belongs to a request of yours still in progress; use a new id",
                       code="duplicate_request_id")
    # The job id is always the server's; without a client label it is this request's id.
    job = Job(request.app.state.peers.new_job_id() if label else scope_state["request_id"], params, owner, label=label)
    try:
        state.dispatcher.submit(job)
    except QueueFull as e:
        raise APIError(429, f"{e}; retry in {e.retry_after}s", code="queue_full",
                       headers={"Retry-After": str(e.retry_after)}) from None
    except Unhealthy as e:
        raise _unhealthy(str(e)) from None
    except NotAccepting:
        raise _shutting_down() from None
    scope_state["vqdm_job_id"] = job.id
    scope_state["vqdm_admitted"] = True
    return job


def _deadline(state: ServerState, job: Job) -> float:
    return job.enqueued_at + state.settings.request_timeout_s


def _outcome_error(job: Job) -> APIError:
    """The error for a job that did not succeed: a fixed short message per cause; the trace is in the
    log under the job's id (and the client's X-Request-Id)."""
    if job.state is JobState.FAILED:
        if job.error == failures.INSUFFICIENT_MEMORY:
            return APIError(503, "not enough device memory for this request even when run alone; use fewer "
                                 "images or a smaller size", code="insufficient_memory", reason="insufficient_memory",
                            headers={"x-should-retry": "false"})
        if job.error == failures.WORKER_UNHEALTHY:
            return APIError(503, "the server's worker failed and the server is restarting; retry", reason="unhealthy",
                            code="worker_unhealthy", headers={"Retry-After": "5"})
        return APIError(503, f"generation failed (request {job.id}; details in the server log)",
                        code="generation_failed", reason="generation_failed", headers={"x-should-retry": "false"})
    if job.cancel_reason == "timeout":
        return APIError(504, "request timed out and was cancelled", code="timeout")
    if job.cancel_reason == "shutdown":
        return APIError(503, "server shut down before the request finished; retry", code="server_shutting_down",
                        reason="shutting_down", headers={"Retry-After": "5"})
    return APIError(499, f"request cancelled ({job.cancel_reason})", code="request_cancelled")


async def _disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(_DISCONNECT_POLL_S)


async def wait(request: Request, state: ServerState, job: Job) -> None:
    """Until the job ends; cancels it when the client goes away or the deadline passes; an error for
    any outcome but success."""
    done = asyncio.create_task(job.done.wait())
    gone = asyncio.create_task(_disconnected(request))
    try:
        finished, _ = await asyncio.wait({done, gone}, timeout=max(0.0, _deadline(state, job) - time.perf_counter()),
                                         return_when=asyncio.FIRST_COMPLETED)
    finally:
        done.cancel()
        gone.cancel()
    if not job.state.finished:
        if gone in finished:
            state.dispatcher.cancel(job, "client_disconnected")
            raise APIError(499, "client closed the connection; request cancelled", code="request_cancelled")
        state.dispatcher.cancel(job, "timeout")
        raise APIError(504, f"request timed out after {state.settings.request_timeout_s:.0f}s and was cancelled",
                       code="timeout")
    if job.state is not JobState.SUCCEEDED:
        raise _outcome_error(job)


async def success_body(job: Job, links: ImageLinks | None = None) -> dict[str, Any]:
    """The reply to a job that succeeded: its images in base64, or, given `links` (response_format
    url), stored and linked."""
    p, res = job.params, job.result
    t0 = time.perf_counter()
    if links is None:
        b64 = await anyio.to_thread.run_sync(encode_b64, res.images, p.output_format, p.output_compression)
        images = [{"b64_json": b} for b in b64]
    else:
        urls = await anyio.to_thread.run_sync(links.save, res.images, p.output_format, p.output_compression)
        images = [{"url": u} for u in urls]
    res.images = []  # the job stays visible at /v1/requests/{id} for a while; its pixels need not
    timings = {"queue_s": round(job.started_at - job.enqueued_at, 6), **res.timings,
               "encode_s": round(time.perf_counter() - t0, 6), "total_s": round(time.perf_counter() - job.enqueued_at, 6)}
    return {
        "created": int(job.created), "id": job.id, "model": p.model,
        "data": [{**image, "revised_prompt": res.revised_prompt, "seed": s} for image, s in zip(images, p.seeds)],
        "seed": p.seed, "seeds": p.seeds, **p.size_fields(), "output_format": p.output_format,
        "batch_size": res.batch_size, "timings": timings,
    }


def _event(seq: int, kind: str, data: dict) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps({"type": kind, **data}), event=kind, id=str(seq))


def _image_fields(p) -> dict[str, Any]:
    """What OpenAI's partial and completed image events say about the request. vqdm's images have
    no alpha channel (background "opaque") and no quality tiers (steps and guidance decide)."""
    return {"created_at": int(time.time()), **p.size_fields(), "output_format": p.output_format,
            "background": "opaque", "quality": "auto"}


def _usage(result: JobResult, edit: bool) -> dict[str, Any]:
    """OpenAI's token usage for one image, in a diffusion model's units: text tokens = the CLIP tokens
    of the prompt the model read (each image's rows encode it); image tokens = latent cells of the
    encoded source (edits only); output tokens = latent cells of the image made."""
    image = result.latent_cells if edit else 0
    given = result.prompt_tokens + image
    return {"input_tokens": given, "input_tokens_details": {"text_tokens": result.prompt_tokens, "image_tokens": image},
            "output_tokens": result.latent_cells, "total_tokens": given + result.latent_cells}


async def _stream(request: Request, state: ServerState, job: Job, prefix: str = "image_generation",
                  stream_format: str = "openai") -> AsyncIterator[ServerSentEvent]:
    """Server-sent events in OpenAI's shapes (`prefix` is "image_edit" for edits): a
    `{prefix}.partial_image` per preview, then one `{prefix}.completed` per image, or one `error`
    event, which OpenAI's client raises as an APIError. `stream_format` "vqdm" adds vqdm's
    `{prefix}.queued`, `.started` and `.progress` (step 1..N). A client that goes away cancels the job."""
    scope_state = request.scope["state"]
    rich = stream_format == "vqdm"
    p = job.params
    seq = itertools.count()
    try:
        if rich:
            yield _event(next(seq), f"{prefix}.queued",
                         {"id": job.id, "queue_position": state.dispatcher.position(job)})
        while True:
            try:
                kind, data = await asyncio.wait_for(job.events.get(), _deadline(state, job) - time.perf_counter())
            except (asyncio.TimeoutError, ValueError):
                state.dispatcher.cancel(job, "timeout")
                job.cancel_reason = job.cancel_reason or "timeout"
                kind, data = "cancelled", {}
            if kind in ("started", "progress"):
                if rich:
                    yield _event(next(seq), f"{prefix}.{kind}", {"id": job.id, **data})
            elif kind == "partial_image":
                (b64,) = await anyio.to_thread.run_sync(encode_b64, [data["image"]], p.output_format,
                                                        p.output_compression)
                yield _event(next(seq), f"{prefix}.partial_image", {
                    "b64_json": b64, "partial_image_index": data["partial_image_index"], **_image_fields(p),
                    "id": job.id, "index": data["index"]})
            elif kind == JobState.SUCCEEDED.value:
                usage = _usage(job.result, edit=prefix == "image_edit")
                body = await success_body(job)
                for i, item in enumerate(body["data"]):
                    yield _event(next(seq), f"{prefix}.completed", {
                        "b64_json": item["b64_json"], **_image_fields(p), "usage": usage,
                        "id": job.id, "index": i, "seed": item["seed"], "revised_prompt": item["revised_prompt"],
                        "model": body["model"], "timings": body["timings"]})
                scope_state["vqdm_final_status"] = 200
                return
            elif kind in (JobState.FAILED.value, JobState.CANCELLED.value):
                err = _outcome_error(job)
                scope_state["vqdm_final_status"] = err.status
                scope_state["vqdm_error_reason"] = err.reason
                yield _event(next(seq), "error", {"id": job.id, "status": err.status, **error_payload(
                    err.message, err.type, err.param, err.code)})
                return
    finally:
        if not job.state.finished:  # the client went away mid-stream
            state.dispatcher.cancel(job, "client_disconnected")
            scope_state["vqdm_final_status"] = 499
        elif job.result is not None:
            job.result.images = []
