"""AUTOMATIC1111's API (`/sdapi/v1/*`), the dialect `webuiapi`, Open WebUI's and SillyTavern's
"AUTOMATIC1111" engines speak, on vqdm's one pipeline: txt2img and img2img are translated
(`a1111_params`) into the same `validate`d GenerationParams as the OpenAI routes and go through
the same `handling.submit` / `wait`: queue, batching, API keys, metrics, timeouts and drain.

Keys: A1111's `--api-auth` is HTTP basic auth, which its clients send (`webuiapi.set_auth(user,
password)`, Open WebUI's and SillyTavern's "user:password" fields): here the password is the API
key and the user name is not read; `Authorization: Bearer <key>` works too. Everything per key is
per API key (with no keys configured, the server is one tenant): the model chosen with POST
options, the job progress reports on, the jobs interrupt stops.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import time
from functools import partial
from typing import Any

import anyio
import pydantic_core
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from PIL import ImageOps
from pydantic import BaseModel, ValidationError

from vqdm import __version__
from vqdm.server import samplers
from vqdm.server.a1111_inpaint import inpaint_input
from vqdm.server.a1111_params import (CHECKPOINT_OPTION, FIXED_OPTIONS, SCHEDULERS, a1111_sampler, check_eta,
                                      check_option, check_supported, denoising_strength, generation_request,
                                      in_a1111_terms, mask_blur, model_for)
from vqdm.server.a1111_schemas import A1111Request, Img2ImgRequest, ImageResponse, ProgressResponse, Txt2ImgRequest
from vqdm.server.edit_pipeline import mask_from
from vqdm.server.edits import edit_params
from vqdm.server.errors import APIError, bad_request, validation_error
from vqdm.server.handling import get_state, key_index, require_ready, submit, success_body, wait
from vqdm.server.jobs import GenerationParams, Job
from vqdm.server.schemas import openapi_schema
from vqdm.server.state import ServerState
from vqdm.server.validation import resolve_model, validate

PREFIX = "/sdapi/v1"
IMG2IMG_PATH = f"{PREFIX}/img2img"
router = APIRouter(prefix=PREFIX, tags=["AUTOMATIC1111"])


def authorize_a1111(request: Request, state: ServerState) -> int | None:
    """The caller's key index from basic auth (the password is the key) or a bearer token; None
    when no keys are set."""
    keys = state.settings.api_keys
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if keys and scheme.lower() == "basic":
        try:
            password = base64.b64decode(value.strip(), validate=True).decode().partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            password = ""
        header = f"Bearer {password}"
    elif keys and not header:
        raise APIError(401, "missing API key: send it as the password of HTTP basic auth (webuiapi: "
                            "api.set_auth('any-user', KEY)) or as 'Authorization: Bearer <key>'",
                       code="missing_api_key", headers={"WWW-Authenticate": 'Basic realm="vqdm"'})
    return key_index(header, keys)


def _body_schema(model: type[BaseModel]) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": openapi_schema(model)}}}}


_REPLY = {200: {"model": ImageResponse, "description": "A1111's shape"}}


def _json(raw: bytes) -> Any:
    """A JSON body by pydantic's parser: bounded nesting (no RecursionError on a body of brackets),
    and no NaN or Infinity, which A1111's lax fields would otherwise carry into the reply."""
    try:
        return pydantic_core.from_json(raw, allow_inf_nan=False)
    except ValueError as e:
        raise bad_request(f"request body is not valid JSON: {e}", None, "invalid_json") from None


async def _read(request: Request, model: type[A1111Request]) -> A1111Request:
    try:
        return model.model_validate(_json(await request.body()))
    except ValidationError as e:
        raise validation_error(e) from None


def _params(request: Request, state: ServerState, owner: int | None, body: A1111Request) -> GenerationParams:
    """The validated job an A1111 body asks for, or the 400 that names the A1111 field at fault."""
    check_supported(body)
    try:
        model = resolve_model(model_for(body, state.a1111_checkpoints.get(owner)), state.models, state.settings)
        request.scope["state"]["vqdm_model"] = model.id
        params = validate(generation_request(body, model, state.settings.max_n), state.models, state.settings)
    except APIError as e:
        raise in_a1111_terms(e) from None
    check_eta(body.eta, params.scheduler)
    return params


def _sampler(state: ServerState, params: GenerationParams) -> str:
    model = state.models[params.model]
    return a1111_sampler(samplers.resolve(params.scheduler, next(iter(model.replicas.values())).scheduler_class))


def _infotext(prompt: str, p: GenerationParams, sampler: str, seed: int, strength: float | None) -> str:
    """The text A1111 writes under a picture (and into its PNG): prompt, negative prompt, settings."""
    lines = [prompt]
    if p.negative_prompt:
        lines.append(f"Negative prompt: {p.negative_prompt}")
    settings = [f"Steps: {p.steps}", f"Sampler: {sampler}", f"Schedule type: {SCHEDULERS[0]}", f"CFG scale: {p.guidance:g}",
                f"Seed: {seed}", f"Size: {p.width}x{p.height}", f"Model: {p.model}"]
    if strength is not None:
        settings.append(f"Denoising strength: {strength:g}")
    if p.loras:
        settings.append("Lora weights: " + ", ".join(f"{n}: {s:g}" for n, s in p.loras))
    settings.append(f"Version: vqdm {__version__}")
    return "\n".join([*lines, ", ".join(settings)])


async def _reply(state: ServerState, job: Job, body: A1111Request) -> dict[str, Any]:
    """A1111's reply: images, the request as read, and `info` (JSON text) with the seeds and settings
    used; vqdm's own reply (job id, timings, ...) but its images is under info's "vqdm"."""
    p = job.params
    out = await success_body(job)
    images = [item["b64_json"] for item in out.pop("data")] if body.send_images else []
    sampler = _sampler(state, p)
    # txt2img: A1111's denoising_strength is hires fix's, which is off
    strength = denoising_strength(body) if isinstance(body, Img2ImgRequest) else None
    negative = p.negative_prompt or ""
    info = {
        "prompt": body.prompt, "all_prompts": [body.prompt] * p.n, "negative_prompt": negative,
        "all_negative_prompts": [negative] * p.n, "seed": p.seed, "all_seeds": p.seeds,
        "subseed": body.subseed if body.subseed is not None else -1,
        "all_subseeds": [body.subseed if body.subseed is not None else -1] * p.n, "subseed_strength": 0,
        "width": p.width, "height": p.height, "sampler_name": sampler, "scheduler": SCHEDULERS[0],
        "cfg_scale": p.guidance, "steps": p.steps, "batch_size": body.batch_size, "n_iter": body.n_iter,
        "restore_faces": False, "face_restoration_model": None, "sd_model_name": p.model, "sd_model_hash": None,
        "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": strength, "extra_generation_params": {}, "index_of_first_image": 0,
        "infotexts": [_infotext(body.prompt, p, sampler, s, strength) for s in p.seeds], "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)), "clip_skip": 1,
        "is_using_inpainting_conditioning": False, "version": f"vqdm {__version__}", "vqdm": out,
    }
    parameters = body.model_dump()
    if isinstance(body, Img2ImgRequest) and not body.include_init_images:
        parameters["init_images"], parameters["mask"] = None, None
    return {"images": images, "parameters": parameters, "info": json.dumps(info)}


# -- generation -----------------------------------------------------------------------------------
async def _accept(request: Request, model: type[A1111Request]) -> tuple[ServerState, int | None, A1111Request]:
    """What both generation routes do first: the caller's key, a ready server, the body."""
    state = get_state(request)
    owner = authorize_a1111(request, state)
    require_ready(state)
    return state, owner, await _read(request, model)


async def _answer(request: Request, state: ServerState, owner: int | None, params: GenerationParams,
                  body: A1111Request) -> JSONResponse:
    """Queue the job, wait for it (as the OpenAI routes do), reply in A1111's shape."""
    job = submit(request, state, params, owner)
    await wait(request, state, job)
    return JSONResponse(await _reply(state, job, body))


@router.post("/txt2img", openapi_extra=_body_schema(Txt2ImgRequest), responses=_REPLY)
async def txt2img(request: Request):
    state, owner, body = await _accept(request, Txt2ImgRequest)
    return await _answer(request, state, owner, _params(request, state, owner, body), body)


def _decoded(data: str, param: str, max_bytes: int) -> io.BytesIO:
    """One base64 image of a JSON body (a data: URL prefix allowed), as the file decode_edit reads."""
    if data.startswith("data:"):
        data = data.partition(",")[2]
    if len(data) > (max_bytes + 2) // 3 * 4 + 4:
        raise bad_request(f"{param} is over this server's limit of {max_bytes} bytes", param, "image_too_large", 413)
    try:
        return io.BytesIO(base64.b64decode(data, validate=True))
    except (binascii.Error, ValueError):
        raise bad_request(f"{param} is not base64 (a PNG, JPEG or WEBP file, optionally as a data: URL)", param,
                          "invalid_image") from None


def _mask_rule(invert: bool):
    """A1111's mask: white (or, with transparency, opaque) repaints; inverted on request."""
    def rule(img):
        mask = mask_from(img, transparent_repaints=False)
        return ImageOps.invert(mask) if invert else mask
    return rule


@router.post("/img2img", openapi_extra=_body_schema(Img2ImgRequest), responses=_REPLY)
async def img2img(request: Request):
    state, owner, body = await _accept(request, Img2ImgRequest)
    if len(body.init_images) != 1:
        raise bad_request(f"send one image in init_images (got {len(body.init_images)}); vqdm edits one picture per "
                          "request, batch_size copies of it", "init_images")
    params = _params(request, state, owner, body)
    max_bytes = state.settings.max_image_bytes
    image, mask = await anyio.to_thread.run_sync(lambda: (
        _decoded(body.init_images[0], "init_images.0", max_bytes),
        None if body.mask is None else _decoded(body.mask, "mask", max_bytes)), limiter=state.decode_limiter)
    size = None if body.width is None and body.height is None else f"{params.width}x{params.height}"
    # "only masked": the upload keeps its size; the crop around the mask is drawn at the size params say
    only = mask is not None and bool(body.inpaint_full_res)
    prepare = partial(inpaint_input, size=(params.width, params.height) if only else None,
                      padding=body.inpaint_full_res_padding or 0,
                      fill=1 if body.inpainting_fill is None else body.inpainting_fill)
    params = await edit_params(state, params, size, denoising_strength(body), image, mask,
                               strength_name="denoising_strength", own_size=only, names=("init_images.0", "mask"),
                               mask_rule=_mask_rule(bool(body.inpainting_mask_invert)), mask_blur=mask_blur(body),
                               prepare=prepare)
    return await _answer(request, state, owner, params, body)


# -- what is served ----------------------------------------------------------------------------------
@router.get("/sd-models")
async def sd_models(request: Request):
    """A1111's checkpoint list: one entry per served model, with vqdm's model card (GET /v1/models)."""
    state = get_state(request)
    authorize_a1111(request, state)
    return [{"title": m.id, "model_name": m.id, "hash": None, "sha256": None, "filename": m.id, "config": None,
             "vqdm": m.card()} for m in state.models.values()]


@router.get("/loras")
async def loras(request: Request):
    """Every LoRA a `<lora:name:weight>` tag may name, with the models it is attached to."""
    state = get_state(request)
    authorize_a1111(request, state)
    out: dict[str, dict] = {}
    for m in state.models.values():
        for name, card in m.loras.items():
            entry = out.setdefault(name, {"name": name, "alias": name, "path": None, "metadata": {},
                                          "vqdm": {**card, "models": []}})
            entry["vqdm"]["models"].append(m.id)
    return list(out.values())


@router.get("/samplers")
async def samplers_list(request: Request):
    authorize_a1111(request, get_state(request))
    return [{"name": s.a1111, "aliases": [s.name], "options": {}} for s in samplers.SAMPLERS.values()]


@router.get("/schedulers")
async def schedulers_list(request: Request):
    authorize_a1111(request, get_state(request))
    return [{"name": name.lower(), "label": name, "aliases": None, "default_rho": -1, "need_inner_model": False}
            for name in SCHEDULERS]


@router.get("/scripts")
async def scripts(request: Request):
    """No scripts or extensions (webuiapi asks when it is created)."""
    authorize_a1111(request, get_state(request))
    return {"txt2img": [], "img2img": []}


@router.get("/options")
async def get_options(request: Request):
    state = get_state(request)
    owner = authorize_a1111(request, state)
    current = state.a1111_checkpoints.get(owner) or next(iter(state.models), None)
    return {CHECKPOINT_OPTION: current, **FIXED_OPTIONS}


@router.post("/options", openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"type": "object", "properties": {CHECKPOINT_OPTION: {"type": "string"}}}}}}})
async def set_options(request: Request):
    """Only the checkpoint changes (a served model: for this API key's later requests); the other
    options are accepted at their fixed values, anything else is refused."""
    state = get_state(request)
    owner = authorize_a1111(request, state)
    options = _json(await request.body())
    if not isinstance(options, dict):
        raise bad_request("send the options as a JSON object, e.g. {\"sd_model_checkpoint\": \"MODEL\"}", None)
    checkpoint = options.get(CHECKPOINT_OPTION)
    for key, value in options.items():
        if key != CHECKPOINT_OPTION:
            check_option(key, value, key)
    if checkpoint is not None:
        # A served id or an alias; never the unknown-model route: a switch to a model not served is a mistake.
        aliases = state.settings.aliases()
        target = state.models.get(aliases.get(checkpoint, checkpoint)) if isinstance(checkpoint, str) else None
        if target is None:
            named = ", ".join(state.models) or "none yet"
            raise APIError(400, f"{CHECKPOINT_OPTION} {checkpoint!r} is not served here; available: {named}"
                                f"{'; aliases: ' + ', '.join(aliases) if aliases else ''} (GET /sdapi/v1/sd-models)",
                           param=CHECKPOINT_OPTION, code="model_not_found")
        state.a1111_checkpoints[owner] = target.id
    return None


# -- the caller's jobs ----------------------------------------------------------------------------
@router.get("/progress", response_model=ProgressResponse)
async def progress(request: Request, skip_current_image: bool = False):
    """The caller's oldest unfinished job: its progress, the steps, and how many of its jobs are left.
    No preview image (current_image null)."""
    state = get_state(request)
    live = state.dispatcher.jobs.live(authorize_a1111(request, state))
    job = live[0] if live else None
    fraction = job.step / job.total_steps if job is not None and job.total_steps else 0.0
    running_s = time.perf_counter() - job.started_at if job is not None and job.started_at else 0.0
    return {
        "progress": fraction,
        "eta_relative": running_s / fraction - running_s if fraction else 0.0,
        "state": {"skipped": False, "interrupted": bool(job and job.cancelled), "stopping_generation": False,
                  "job": job.id if job else "", "job_count": len(live), "job_no": 0,
                  "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)) if job else "0",
                  "sampling_step": job.step if job else 0, "sampling_steps": job.total_steps if job else 0},
        "current_image": None,
        "textinfo": None if job is None else
        f"queued, position {state.dispatcher.position(job)}" if job.started_at is None else "running",
    }


@router.post("/interrupt")
async def interrupt(request: Request):
    """Stop the caller's running jobs at their next denoising step (their requests end with 499
    request_cancelled); queued ones still run, as in A1111."""
    state = get_state(request)
    for job in state.dispatcher.jobs.live(authorize_a1111(request, state)):
        if job.started_at is not None:
            state.dispatcher.cancel(job, "interrupted")
    return {}
