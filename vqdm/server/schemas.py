"""Request and response bodies of the Images API (OpenAI's fields plus vqdm's extensions).

Range checks that depend on configuration (n, steps, size, prompt length) live in
`validation.py`; here are the types and the fixed ranges only. `json_schema_extra` states in the
OpenAPI schema what `validation.py` checks (and answers with its own messages).
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from vqdm.server.samplers import sampler_names

SEED_MAX = 2**63 - 1


class LoraChoice(BaseModel):
    """One adapter for a request: a name from GET /v1/models and its weight."""

    model_config = ConfigDict(extra="forbid")

    name: str
    scale: float = Field(1.0, description="-2..2; 0 leaves the adapter off",
                         json_schema_extra={"minimum": -2, "maximum": 2})


class ImageGenerationRequest(BaseModel):
    """POST /v1/images/generations. Unknown fields are refused so a typo is not silently ignored."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(json_schema_extra={"minLength": 1})
    model: str | None = Field(None, description="a served model id or alias (GET /v1/models); default: the first one")
    n: int | None = Field(None, description="images to generate (1..max_n)", json_schema_extra={"minimum": 1})
    size: str | None = Field(None, description='"WxH" in pixels, multiples of 8; "auto" or none: the model default',
                             json_schema_extra={"pattern": "^(auto|[0-9]+x[0-9]+)$"})
    response_format: str | None = Field(
        None, description="b64_json (default), or url: a link to the image on this server, valid for "
                          "image_store_ttl_s (a stream's events always carry b64_json)",
        json_schema_extra={"enum": ["b64_json", "url", None]})
    output_format: Literal["png", "jpeg", "webp"] | None = None
    output_compression: int | None = Field(None, ge=0, le=100, description="jpeg/webp quality 0-100")
    # OpenAI fields accepted for client compatibility; they do not change what a diffusion model does.
    quality: str | None = None
    style: str | None = None
    background: str | None = None
    moderation: str | None = None
    user: str | None = None
    # Extensions.
    negative_prompt: str | None = None
    num_inference_steps: int | None = Field(None, description="1..max_steps", json_schema_extra={"minimum": 1})
    guidance_scale: float | None = Field(None, description="0..max_guidance", json_schema_extra={"minimum": 0})
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    scheduler: str | None = Field(None, json_schema_extra={"enum": [*sampler_names(), None]})
    loras: list[LoraChoice] | None = Field(None, description='e.g. [{"name": "pixel-art", "scale": 0.8}]')
    stream: bool = False
    partial_images: int | None = Field(None, ge=0, le=3, description=(
        "with stream: previews per image (0..3) sent as partial_image events while it is made, after evenly "
        "spaced steps (fewer when there are fewer steps); ignored without stream"))
    stream_format: Literal["openai", "vqdm"] | None = Field(None, description=(
        'with stream: "openai" (default) sends OpenAI\'s partial_image and completed events; "vqdm" adds '
        "vqdm's queued, started and per-step progress events"))


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")

    message: str
    type: str
    param: str | None = Field(description="the offending field, when one is to blame")
    code: str | None = Field(description="a fixed word a client can branch on, e.g. invalid_image")


class ErrorResponse(BaseModel):
    """Every error body (OpenAI's shape; vqdm.server.errors answers them)."""

    model_config = ConfigDict(extra="forbid")

    error: ErrorDetail


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    """`model`'s JSON schema with its `$defs` written in place, to embed in the OpenAPI document: there
    pydantic's "#/$defs/..." would resolve against the document's root, which has none (and a
    generator given a dangling reference sends no body at all). vqdm's bodies are not recursive."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].removeprefix("#/$defs/")])
            return {k: inline(v) for k, v in node.items()}
        return [inline(v) for v in node] if isinstance(node, list) else node

    return inline(schema)


def form_fields_schema(model: type[BaseModel]) -> dict[str, dict[str, Any]]:
    """`model`'s fields as multipart/form-data properties for the OpenAPI schema. A form field is
    text: a nullable field is sent as its non-null type or left out, and a list or object travels
    as JSON text (as `loras` does on /v1/images/edits)."""
    properties = {}
    for name, prop in openapi_schema(model)["properties"].items():
        prop = {k: v for k, v in prop.items() if k not in ("title", "default")}
        (value,) = [branch for branch in prop.pop("anyOf", [{}]) if branch.get("type") != "null"]
        value = {**value, **prop}
        if value.get("type") in ("array", "object"):
            value = {"type": "string", "contentMediaType": "application/json", "description": value.get("description")}
        if "enum" in value:
            value["enum"] = [v for v in value["enum"] if v is not None]
        properties[name] = {k: v for k, v in value.items() if v is not None}
    return properties


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None
    seed: int


class ImageGenerationResponse(BaseModel):
    created: int
    id: str
    model: str
    data: list[ImageData]
    seed: int
    seeds: list[int]
    size: str
    generated_size: str | None = Field(None, description="the size the model drew at, when it differs from size: "
                                                         "size policy nearest resized the images (vqdm.server.sizes)")
    output_format: str
    timings: dict[str, float]
