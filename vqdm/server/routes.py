"""HTTP endpoints (SPEC §8) but POST /v1/images/edits (`edits`). State comes from
`request.app.state.vqdm`, built in the lifespan; what the job endpoints share is in `handling`."""
from __future__ import annotations

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError

from vqdm.server.errors import APIError, validation_error
from vqdm.server.handling import authorize, get_state, require_ready, submit_and_reply
from vqdm.server.image_store import FILES_PREFIX, MEDIA_TYPES
from vqdm.server.jobs import Job
from vqdm.server.replicas import FORWARDED_HEADER
from vqdm.server.schemas import ImageGenerationRequest, openapi_schema
from vqdm.server.state import ServerState
from vqdm.server.validation import resolve_model, validate

router = APIRouter()


# -- probes and metrics ---------------------------------------------------------------------------
@router.get("/healthz")
async def healthz(request: Request):
    # Open to anyone (probes carry no key): a status and a code, never the error's text, which can
    # name files and hosts. The text is in the server log ("start-up failed", "watchdog", "poisoned").
    state = get_state(request)
    if state.load_error:
        return JSONResponse({"status": "failed", "code": "load_failed"}, status_code=503)
    if state.dispatcher.unhealthy:  # a stuck or poisoned device: let the orchestrator restart us
        return JSONResponse({"status": "unhealthy", "code": "worker_unhealthy"}, status_code=503)
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request):
    state = get_state(request)
    require_ready(state)
    return {"status": "ready", "models": list(state.models), "devices": state.devices}


@router.get("/metrics")
async def metrics(request: Request):
    state = get_state(request)
    if state.settings.protect_metrics:
        authorize(request, state)
    return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


# -- models ---------------------------------------------------------------------------------------
def _card(state: ServerState, name: str, detail: bool = False) -> dict | None:
    """A served model's card with the aliases that name it, or an alias's: its model's card under the
    alias's id, with `alias_of` (OpenAI clients pick model ids from this list); None: neither."""
    aliases = state.settings.aliases()
    if name in state.models:
        return {**state.models[name].card(detail), "aliases": [a for a, t in aliases.items() if t == name]}
    if aliases.get(name) in state.models:
        return {**state.models[aliases[name]].card(detail), "id": name, "alias_of": aliases[name]}
    return None


@router.get("/v1/models")
async def list_models(request: Request):
    state = get_state(request)
    authorize(request, state)
    names = [*state.models, *(a for a, t in state.settings.aliases().items() if t in state.models)]
    return {"object": "list", "data": [_card(state, name) for name in names]}


@router.get("/v1/models/{model_id}")
async def get_model(model_id: str, request: Request):
    state = get_state(request)
    authorize(request, state)
    card = _card(state, model_id, detail=True)
    if card is None:
        raise APIError(404, f"model {model_id!r} is not served here; available: {', '.join(state.models) or 'none yet'}",
                       param="model", code="model_not_found")
    return card


# -- requests -------------------------------------------------------------------------------------
async def _own_job(request: Request, state: ServerState, request_id: str) -> Job | JSONResponse:
    """The job (by server id, or by the client's label) submitted with this request's key; a job of
    another replica is answered by that replica (server.replicas)."""
    owner = authorize(request, state)
    job = state.dispatcher.jobs.find(request_id, owner)
    if job is not None:
        return job
    if not request.headers.get(FORWARDED_HEADER):
        answer = await request.app.state.peers.forward(request.method, request_id, dict(request.headers),
                                                       state.metrics)
        if answer is not None:
            return JSONResponse(answer[1], status_code=answer[0])
    raise APIError(404, f"no request {request_id!r} (unknown, expired after "
                        f"{state.settings.job_retention_s:.0f}s, or submitted with another key)",
                   param="request_id", code="request_not_found")


@router.get("/v1/requests/{request_id}")
async def get_request(request_id: str, request: Request):
    state = get_state(request)
    job = await _own_job(request, state, request_id)
    if isinstance(job, JSONResponse):
        return job
    return job.describe(state.dispatcher.position(job))


@router.delete("/v1/requests/{request_id}")
async def cancel_request(request_id: str, request: Request):
    state = get_state(request)
    job = await _own_job(request, state, request_id)
    if isinstance(job, JSONResponse):
        return job
    if job.state.finished:
        raise APIError(409, f"request {request_id!r} already {job.state.value}; nothing to cancel",
                       param="request_id", code="request_finished")
    state.dispatcher.cancel(job, "deleted")
    body = job.describe(state.dispatcher.position(job))
    return JSONResponse(body, status_code=200 if job.state.finished else 202)


# -- image files (response_format url) -------------------------------------------------------------
_NO_FILE = "no such file (unknown, expired, or removed to keep the image store within its size cap)"


# `:path`: an id holding "/" (a traversal attempt) reaches this route and gets the same 404 too.
@router.get(FILES_PREFIX + "/{file_id:path}/content", response_class=Response, responses={200: {
    "description": "the image, as stored", "content": {t: {} for t in MEDIA_TYPES.values()}}})
async def get_file_content(file_id: str, request: Request):
    """An image a url reply links to. No API key: the id (128 random bits) is the credential, so
    the clients that fetch the link with a plain GET can (vqdm.server.image_store)."""
    state = get_state(request)
    image = await anyio.to_thread.run_sync(state.image_store.get, file_id)
    if image is None:  # malformed, unknown, expired or evicted: one answer, so none can be told apart
        raise APIError(404, _NO_FILE, param="file_id", code="file_not_found")
    return Response(image.data, media_type=image.media_type, headers={
        "Cache-Control": f"private, max-age={int(image.expires_in_s)}, immutable",
        "X-Content-Type-Options": "nosniff"})


# -- generation -----------------------------------------------------------------------------------
_SCHEMA = openapi_schema(ImageGenerationRequest)


@router.post("/v1/images/generations", openapi_extra={
    "requestBody": {"required": True, "content": {"application/json": {"schema": _SCHEMA}}}})
async def generate_images(request: Request):
    state = get_state(request)
    scope_state = request.scope["state"]
    owner = authorize(request, state)
    require_ready(state)
    try:
        req = ImageGenerationRequest.model_validate_json(await request.body())
    except ValidationError as e:
        raise validation_error(e) from None
    # The metric label is the served id, never the client's name for it (aliases, routed names).
    scope_state["vqdm_model"] = resolve_model(req.model, state.models, state.settings).id
    params = validate(req, state.models, state.settings)
    return await submit_and_reply(request, state, params, owner, stream=req.stream, stream_format=req.stream_format)


