"""Turn an ImageGenerationRequest into GenerationParams: resolve defaults, enforce the configured
limits, and name the offending field in every refusal (400, OpenAI error shape)."""
from __future__ import annotations

import re
import secrets
from typing import TYPE_CHECKING

from vqdm.server import samplers
from vqdm.server.errors import APIError, bad_request
from vqdm.server.jobs import GenerationParams
from vqdm.server.loras import check_request_loras
from vqdm.server.schemas import ImageGenerationRequest
from vqdm.server.settings import Settings
from vqdm.server.sizes import SizePlan, SizeRefused, plan_for

if TYPE_CHECKING:
    from vqdm.server.loader import ServedModel

_SIZE_RE = re.compile(r"^\s*(\d{1,6})\s*[xX×]\s*(\d{1,6})\s*$")


def parse_size(size: str | None, model: "ServedModel", settings: Settings) -> tuple[int, int]:
    if size is None or size == "auto":
        return model.default_width, model.default_height
    m = _SIZE_RE.match(size)
    if not m:
        raise bad_request(f"size {size!r} is not WIDTHxHEIGHT in pixels, e.g. "
                   f"\"{model.default_width}x{model.default_height}\"", "size")
    w, h = int(m.group(1)), int(m.group(2))
    problem = size_problem(w, h, settings)
    if problem:
        raise bad_request(problem, "size")
    return w, h


def size_problem(w: int, h: int, settings: Settings) -> str | None:
    """Why the limits refuse an output of w x h pixels; None when they allow it."""
    if w % 8 or h % 8:
        return f"size {w}x{h}: width and height must be multiples of 8 (the VAE's downscale factor)"
    lo, hi = settings.min_side, settings.max_side
    if not (lo <= w <= hi and lo <= h <= hi):
        return f"size {w}x{h}: each side must be between {lo} and {hi} pixels"
    if w * h > settings.max_pixels:
        return f"size {w}x{h} is {w * h} pixels, over this server's limit of {settings.max_pixels}"
    return None


def check_prompt(text: str, param: str, settings: Settings, required: bool) -> None:
    if required and not text.strip():
        raise bad_request(f"{param} is empty", param, "empty_prompt")
    if len(text) > settings.max_prompt_chars:
        raise bad_request(f"{param} is {len(text)} characters, over the limit of {settings.max_prompt_chars} characters "
                   "(the text encoders read only the first 77 CLIP tokens anyway)", param, "prompt_too_long")


def resolve_model(name: str | None, models: dict[str, "ServedModel"], settings: Settings) -> "ServedModel":
    """The served model a request's `model` names: a served id, an alias (`model_aliases`), or, with
    `route_unknown_models`, any other name; none: the first model. Every route resolves here."""
    first = next(iter(models.values()))
    if name is None:
        return first
    aliases = settings.aliases()
    model = models.get(name) or models.get(aliases.get(name, ""))
    if model is not None:
        return model
    if settings.route_unknown_models:
        return first
    named = ", ".join(models) + (f"; aliases: {', '.join(aliases)}" if aliases else "")
    raise APIError(400, f"model {name!r} is not served here; models: {named} (GET /v1/models)",
                   param="model", code="model_not_found")


def size_plan(asked: tuple[int, int], model: "ServedModel") -> SizePlan:
    """Where `model` draws a request for `asked` (its size policy: vqdm.server.sizes); a size the
    policy refuses is the 400 every route answers."""
    try:
        return plan_for(asked, model)
    except SizeRefused as e:
        raise bad_request(str(e), "size", "unsupported_size") from None


def validate(req: ImageGenerationRequest, models: dict[str, "ServedModel"], settings: Settings) -> GenerationParams:
    model = resolve_model(req.model, models, settings)
    check_prompt(req.prompt, "prompt", settings, required=True)
    if req.negative_prompt is not None:
        check_prompt(req.negative_prompt, "negative_prompt", settings, required=False)
    if req.response_format not in (None, "b64_json", "url"):
        raise bad_request(f"response_format {req.response_format!r} is not supported; use \"b64_json\" or \"url\"",
                          "response_format", "unsupported_response_format")
    n = 1 if req.n is None else req.n
    if not 1 <= n <= settings.max_n:
        raise bad_request(f"n must be between 1 and {settings.max_n} (got {n})", "n")
    # The asked size is checked against the limits; the generated one is the model's own.
    size = size_plan(parse_size(req.size, model, settings), model)
    steps = model.default_steps if req.num_inference_steps is None else req.num_inference_steps
    if not 1 <= steps <= settings.max_steps:
        raise bad_request(f"num_inference_steps must be between 1 and {settings.max_steps} (got {steps})",
                   "num_inference_steps")
    guidance = model.default_guidance if req.guidance_scale is None else req.guidance_scale
    if not 0.0 <= guidance <= settings.max_guidance:
        raise bad_request(f"guidance_scale must be between 0 and {settings.max_guidance} (got {guidance})", "guidance_scale")
    try:
        sampler = samplers.resolve(req.scheduler, next(iter(model.replicas.values())).scheduler_class)
    except ValueError as e:
        raise bad_request(str(e), "scheduler") from None
    loras = check_request_loras(req.loras, model)
    seed = secrets.randbelow(2**31) if req.seed is None else req.seed
    return GenerationParams(
        model=model.id, prompt=req.prompt, negative_prompt=req.negative_prompt, n=n, width=size.generated[0],
        height=size.generated[1], resize_to=size.resize_to, steps=steps, guidance=float(guidance),
        scheduler=sampler.name, seed=seed,
        output_format=req.output_format or "png", output_compression=req.output_compression, loras=loras,
        response_format=req.response_format or "b64_json",
        partial_images=(req.partial_images or 0) if req.stream else 0,  # previews cost only when streamed
    )
