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
from typing import Any

import anyio
import pydantic_core
from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile

from vqdm.server.edit_pipeline import DEFAULT_STRENGTH
from vqdm.server.errors import APIError, bad_request, validation_error
from vqdm.server.handling import authorize, require_ready, submit_and_reply
from vqdm.server.schemas import ImageGenerationRequest, form_fields_schema
from vqdm.server.state import ServerState
from vqdm.server.uploads import auto_size, decode_edit
from vqdm.server.validation import resolve_model, validate

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
        model = resolve_model(req.model, state.models)
        scope_state["vqdm_model"] = model.id
        params = validate(req, state.models, s)  # size auto: the model's size until the upload is decoded
        kind = "img2img" if mask is None else "inpaint"
        strength = DEFAULT_STRENGTH[kind] if strength is None else strength
        if not 0.0 < strength <= 1.0:
            raise bad_request(f"strength must be in (0, 1] (got {strength:g})", "strength")
        if int(params.steps * strength) < 1:
            raise bad_request(f"num_inference_steps {params.steps} x strength {strength:g} leaves no denoising step; "
                       "raise either", "strength")
        if req.size in (None, "auto"):
            size_for = partial(auto_size, model_size=(model.default_width, model.default_height), settings=s)
        else:
            size_for = lambda w, h: (params.width, params.height)  # noqa: E731
        # Off the loop, and only the resized EditInput comes back: the raw bytes and full-size
        # pixels are gone before the job queues.
        edit = await anyio.to_thread.run_sync(
            decode_edit, image.file, None if mask is None else mask.file, size_for, strength, s.max_image_pixels,
            limiter=state.decode_limiter)
    finally:
        await form.close()  # the spooled uploads
    width, height = edit.image.size
    params = dataclasses.replace(params, width=width, height=height, edit=edit)
    return await submit_and_reply(request, state, params, owner, stream=req.stream, event_prefix="image_edit",
                                  stream_format=req.stream_format)
