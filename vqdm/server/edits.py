"""POST /v1/images/edits: OpenAI's image-edit endpoint (multipart: `image`, optional `mask`,
`prompt`, `n`, `size`, `response_format`, ...) plus vqdm's `strength`, `seed`,
`num_inference_steps`, `negative_prompt`, `guidance_scale`, `scheduler`, `loras` (a JSON list).

Without a mask an edit is img2img, with one it is inpainting, through diffusers'
StableDiffusionXLImg2ImgPipeline / StableDiffusionXLInpaintPipeline built per batch on the served
pipeline's own components (a constructor call, no weights copied: there is one U-Net). Edit jobs
go through the same queue, batching (same kind and strength only), cancellation, SSE and metrics
as generations. The uploads are decoded, oriented and resized off the event loop by
`uploads.decode_edit` (which also says what `size` auto means); the pipeline side (`edit_call`,
`paste_back`) is in `edit_pipeline.py`.

Masks: a mask with transparency follows OpenAI (fully transparent = repaint); an opaque one
follows diffusers / A1111 (white = repaint). Either is thresholded at half. After decoding, the
source is pasted back outside the mask (as A1111 does), so only the masked region changes.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, BinaryIO

import anyio
import pydantic_core
from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile

from vqdm.server.edit_pipeline import DEFAULT_STRENGTH
from vqdm.server.errors import APIError, bad_request, validation_error
from vqdm.server.handling import authorize, require_ready, submit_and_reply
from vqdm.server.jobs import GenerationParams
from vqdm.server.schemas import ImageGenerationRequest, form_fields_schema
from vqdm.server.sizes import SizePlan
from vqdm.server.state import ServerState
from vqdm.server.uploads import auto_size, decode_edit
from vqdm.server.validation import resolve_model, size_plan, validate

EDITS_PATH = "/v1/images/edits"
# Form fields OpenAI's client may send that mean nothing to a diffusion model.
_IGNORED_FIELDS = ("input_fidelity",)

router = APIRouter()

# The form this route reads by hand (`_read_form`), declared for GET /openapi.json and /docs.
EDIT_REQUEST_BODY = {"required": True, "content": {"multipart/form-data": {
    "schema": {
        "type": "object",
        "required": ["image", "prompt"],
        "properties": {
            "image": {"type": "string", "format": "binary",
                      "description": "PNG, JPEG or WEBP; at most max_image_bytes and max_image_pixels"},
            "mask": {"type": "string", "format": "binary",
                     "description": "same size as image; transparent (or, if opaque, white) = repaint"},
            **form_fields_schema(ImageGenerationRequest),
            "strength": {"type": "number", "exclusiveMinimum": 0, "maximum": 1,
                         "description": "default 0.75 for img2img, 1.0 for inpainting"},
            **{name: {"type": "string", "description": "accepted for OpenAI's client; ignored"}
               for name in _IGNORED_FIELDS},
        },
        "additionalProperties": False,
    },
    "encoding": {name: {"contentType": "image/png, image/jpeg, image/webp"} for name in ("image", "mask")},
}}}


async def _read_form(request: Request, state: ServerState) -> FormData:
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise bad_request("send the edit as multipart/form-data (fields image, prompt, optional mask), as OpenAI's "
                   "images.edit does", None, "invalid_content_type")
    s = state.settings
    try:
        return await request.form(max_files=4, max_fields=64, max_part_size=s.max_image_bytes + 1)
    except APIError:
        raise  # the body limit's 413, raised by BodyLimitMiddleware while a chunked body streams in
    except Exception as e:  # python-multipart / starlette parse errors carry their own text
        raise bad_request(f"could not read the multipart form: {e}", None, "invalid_form") from None


def _form_parts(form: FormData, max_bytes: int) -> tuple[dict[str, str], UploadFile, UploadFile | None]:
    """(text fields, image, mask); the files are still spooled (memory or disk), not read."""
    fields: dict[str, str] = {}
    files: dict[str, list[UploadFile]] = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            files.setdefault(key.removesuffix("[]"), []).append(value)
        elif key in fields:
            raise bad_request(f"field {key!r} given twice", key)
        else:
            fields[key] = value
    for key in ("image", "mask"):
        if key in fields:
            raise bad_request(f"{key} must be a file upload, not a text field", key, "invalid_image")
    if not files.get("image"):
        raise bad_request("missing required file 'image'", "image", "missing_required_parameter")
    if len(files["image"]) > 1:
        raise bad_request("send one image; editing several input images at once is not supported", "image")
    unknown = sorted(set(files) - {"image", "mask"})
    if unknown:
        raise bad_request(f"unknown file field {unknown[0]!r}", unknown[0], "unknown_parameter")
    image, mask = files["image"][0], (files.get("mask") or [None])[0]
    for param, upload in (("image", image), ("mask", mask)):
        if upload is None:
            continue
        if not upload.size:
            raise bad_request(f"{param} is empty", param, "invalid_image")
        if upload.size > max_bytes:
            raise bad_request(f"{param} is {upload.size} bytes, over this server's limit of {max_bytes}", param,
                       "image_too_large", 413)
    return fields, image, mask


def _request_from_fields(fields: dict[str, str]) -> tuple[ImageGenerationRequest, float | None]:
    fields = {k: v for k, v in fields.items() if k not in _IGNORED_FIELDS}
    strength = fields.pop("strength", None)
    data: dict[str, Any] = dict(fields)
    if "loras" in data:
        try:  # pydantic's parser, as for a generation's JSON body: bounded nesting, no RecursionError
            data["loras"] = pydantic_core.from_json(data["loras"])
        except ValueError as e:
            raise bad_request(f'loras must be a JSON list, e.g. [{{"name": "pixel-art", "scale": 0.8}}] ({e})',
                       "loras") from None
    try:
        req = ImageGenerationRequest.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None
    if strength is None:
        return req, None
    try:
        return req, float(strength)
    except ValueError:
        raise bad_request(f"strength must be a number in (0, 1] (got {strength!r})", "strength") from None


async def edit_params(state: ServerState, params: GenerationParams, size: str | None, strength: float | None,
                      image: BinaryIO, mask: BinaryIO | None, strength_name: str = "strength",
                      own_size: bool = False, **decode_options: Any) -> GenerationParams:
    """A validated request's params made an edit's: strength checked, the upload decoded off the
    event loop (`uploads.decode_edit`, with `decode_options`) at `size` or, auto, at the size the
    upload suggests, or with `own_size` at its own size (A1111's "only masked", whose `prepare`
    option cuts the generation's crop from it). Shared by this route and A1111's img2img
    (`strength_name` denoising_strength)."""
    kind = "img2img" if mask is None else "inpaint"
    strength = DEFAULT_STRENGTH[kind] if strength is None else strength
    if not 0.0 < strength <= 1.0:
        raise bad_request(f"{strength_name} must be in (0, 1] (got {strength:g})", strength_name)
    if int(params.steps * strength) < 1:
        raise bad_request(f"{params.steps} steps x {strength_name} {strength:g} leaves no denoising step; raise either",
                          strength_name)
    model = state.models[params.model]
    if size in (None, "auto"):
        asked_for = partial(auto_size, model_size=(model.default_width, model.default_height), settings=state.settings)
    else:
        asked_for = lambda w, h: params.resize_to or (params.width, params.height)  # noqa: E731
    if own_size:  # A1111's "only masked": the upload as it is; `prepare` cuts the crop the model draws
        size_for = lambda w, h: SizePlan((w, h), (w, h))  # noqa: E731
    else:  # the upload resized to the size the model draws at; the images back to the asked size (sizes)
        size_for = lambda w, h: size_plan(asked_for(w, h), model)  # noqa: E731
    # Off the loop, and only the resized EditInput comes back: the raw bytes and full-size
    # pixels are gone before the job queues.
    edit, plan = await anyio.to_thread.run_sync(
        partial(decode_edit, image, mask, size_for, strength, state.settings.max_image_pixels, **decode_options),
        limiter=state.decode_limiter)
    width, height = edit.image.size  # own_size: the crop `prepare` cut, at the size params say the model draws
    if not own_size:
        resize_to = plan.resize_to
    elif edit.mask is None:  # "only masked" with a blank mask: img2img, at the asked size
        resize_to = params.resize_to
    else:  # "only masked": the crop is pasted back into the upload, whose size the images have
        resize_to = None if plan.asked == (width, height) else plan.asked
    return dataclasses.replace(params, width=width, height=height, resize_to=resize_to, edit=edit)


@router.post(EDITS_PATH, openapi_extra={"requestBody": EDIT_REQUEST_BODY})
async def edit_images(request: Request):
    state: ServerState = request.app.state.vqdm
    scope_state = request.scope["state"]
    owner = authorize(request, state)
    require_ready(state)
    s = state.settings
    form = await _read_form(request, state)
    try:
        fields, image, mask = _form_parts(form, s.max_image_bytes)
        req, strength = _request_from_fields(fields)
        model = resolve_model(req.model, state.models, s)
        scope_state["vqdm_model"] = model.id
        params = validate(req, state.models, s)  # size auto: the model's size until the upload is decoded
        params = await edit_params(state, params, req.size, strength, image.file, None if mask is None else mask.file)
    finally:
        await form.close()  # the spooled uploads
    return await submit_and_reply(request, state, params, owner, stream=req.stream, event_prefix="image_edit",
                                  stream_format=req.stream_format)
