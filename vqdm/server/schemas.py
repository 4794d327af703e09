"""Request and response bodies of the Images API (OpenAI's fields plus vqdm's extensions).

Range checks that depend on configuration (n, steps, size, prompt length) live in
`validation.py`; here are the types and the fixed ranges only.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SEED_MAX = 2**63 - 1


class LoraChoice(BaseModel):
    """One adapter for a request: a name from GET /v1/models and its weight."""

    model_config = ConfigDict(extra="forbid")

    name: str
    scale: float = Field(1.0, description="-2..2; 0 leaves the adapter off")


class ImageGenerationRequest(BaseModel):
    """POST /v1/images/generations. Unknown fields are refused so a typo is not silently ignored."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    model: str | None = Field(None, description="a served model id; default: the first one")
    n: int | None = Field(None, description="images to generate (1..max_n)")
    size: str | None = Field(None, description='"WxH" in pixels, multiples of 8; "auto" or none: the model default')
    response_format: str | None = Field(None, description="b64_json (url is not supported)")
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
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    scheduler: str | None = None
    loras: list[LoraChoice] | None = Field(None, description='e.g. [{"name": "pixel-art", "scale": 0.8}]')
    stream: bool = False
    partial_images: int | None = Field(None, description="accepted for client compatibility; ignored")


class ImageData(BaseModel):
    b64_json: str
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
    output_format: str
    timings: dict[str, float]
