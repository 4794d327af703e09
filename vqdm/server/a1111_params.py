"""AUTOMATIC1111's request fields translated onto vqdm's ImageGenerationRequest, so that both
dialects go through one `validation.validate`: sampler names, the `<lora:name:weight>` prompt
syntax, the model a request names, and a 400 naming every field whose value vqdm cannot honour
(rather than a picture that silently ignores it)."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from vqdm.server.a1111_schemas import A1111Request, Img2ImgRequest, Txt2ImgRequest
from vqdm.server.errors import APIError, bad_request, validation_error
from vqdm.server.samplers import SAMPLERS, Sampler
from vqdm.server.schemas import ImageGenerationRequest, LoraChoice

if TYPE_CHECKING:
    from vqdm.server.loader import ServedModel

DEFAULT_DENOISING = 0.75
SCHEDULERS = ("Automatic",)  # A1111's "scheduler": the sampler's own spacing, which is all vqdm has
# Options a request may name in override_settings or POST /sdapi/v1/options, at the value that
# describes what vqdm does (sd_model_checkpoint is per key, in the routes).
FIXED_OPTIONS: dict[str, Any] = {"CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic", "samples_format": "png",
                                 "eta_noise_seed_delta": 0}
_OPTION_SYNONYMS = {"sd_vae": ("Automatic", "None")}  # "None": the checkpoint's own VAE, which is what Automatic uses
CHECKPOINT_OPTION = "sd_model_checkpoint"
# A1111's extra-network prompt tags, e.g. <lora:pixel-art:0.8>.
_TAG = re.compile(r"<(\w+):([^>]*)>")
_LORA_KINDS = ("lora", "lyco")  # LyCORIS tags name the same kind of file in A1111
# vqdm's field names in validate()'s refusals, and the A1111 field each comes from.
_FIELD_NAMES = {"num_inference_steps": "steps", "guidance_scale": "cfg_scale", "size": "width x height",
                "scheduler": "sampler_name"}


def sampler_names() -> list[str]:
    return [s.a1111 for s in SAMPLERS.values()]


def sampler_for(name: str | None) -> str | None:
    """vqdm's scheduler for an A1111 `sampler_name` (its names or vqdm's, any case); None: the model's own."""
    if name is None or not name.strip():
        return None
    wanted = name.strip().lower()
    for s in SAMPLERS.values():
        if wanted in (s.a1111.lower(), s.name):
            return s.name
    hint = ""
    for schedule in ("karras", "exponential", "sgm uniform", "sde"):
        if schedule in wanted:
            hint = (f" ({schedule!r} schedules and SDE variants are not available here; the sampler without it, with "
                    "scheduler Automatic, is the nearest)")
            break
    raise bad_request(f"unknown sampler_name {name!r}{hint}; choose one of {', '.join(sampler_names())} "
                      "(GET /sdapi/v1/samplers)", "sampler_name")


def a1111_sampler(sampler: Sampler) -> str:
    """The name A1111 clients know a resolved sampler by (a model's own unknown class keeps vqdm's)."""
    return sampler.a1111 or sampler.name


def prompt_loras(prompt: str, apply: bool = True) -> tuple[str, list[LoraChoice]]:
    """The prompt without its `<lora:name>` / `<lora:name:weight>` tags, and the LoRAs they name (none
    when `apply` is false: A1111's disable_extra_networks). Any other tag is refused by name."""
    loras: list[LoraChoice] = []
    for m in _TAG.finditer(prompt):
        kind, args = m.group(1).lower(), m.group(2).split(":")
        if kind not in _LORA_KINDS:
            raise bad_request(f"prompt: {m.group(0)!r} is an extra network vqdm does not have; only "
                              "<lora:name:weight> tags are read", "prompt", "unsupported_extra_network")
        name = args[0].strip()
        if not name or len(args) > 2:
            raise bad_request(f"prompt: {m.group(0)!r} is not <lora:name> or <lora:name:weight> (separate text-encoder "
                              "and U-Net weights are not available: vqdm's LoRAs are U-Net only)", "prompt")
        try:
            weight = float(args[1]) if len(args) == 2 else 1.0
        except ValueError:
            raise bad_request(f"prompt: the weight in {m.group(0)!r} is not a number", "prompt") from None
        loras.append(LoraChoice(name=name, scale=weight))
    return _TAG.sub("", prompt).strip(), loras if apply else []


def _refuse(field: str, value: Any, why: str) -> APIError:
    return bad_request(f"{field} {value!r}: {why}", field, "unsupported_parameter")


def _off(script_args: Any) -> bool:
    """An alwayson_scripts entry that switches its extension off (webuiapi sends some that way)."""
    return isinstance(script_args, dict) and script_args.get("args") in (None, [], [False])


def check_supported(body: A1111Request) -> None:
    """A 400 for the first field whose value asks for something vqdm does not do."""
    checks: list[tuple[str, bool, str]] = [
        ("styles", not body.styles, "A1111's saved prompt styles do not exist here; put their text in the prompt"),
        ("subseed_strength", not body.subseed_strength, "variation seeds are not available; send 0"),
        ("seed_resize_from_w", body.seed_resize_from_w in (None, 0, -1), "seed resizing is not available"),
        ("seed_resize_from_h", body.seed_resize_from_h in (None, 0, -1), "seed resizing is not available"),
        ("restore_faces", not body.restore_faces, "face restoration is not available"),
        ("tiling", not body.tiling, "tiling is not available"),
        ("s_min_uncond", not body.s_min_uncond, "skipping the negative prompt at low noise is not available; send 0"),
        ("s_churn", not body.s_churn, "stochastic churn is not available; send 0"),
        ("s_noise", body.s_noise in (None, 1), "only the sampler's own noise (1) is available"),
        ("refiner_checkpoint", body.refiner_checkpoint in (None, "", "None"), "refiner models are not available"),
        ("script_name", not body.script_name, "scripts are not available"),
        ("script_args", not body.script_args, "scripts are not available"),
        ("alwayson_scripts", all(_off(v) for v in (body.alwayson_scripts or {}).values()),
         "extensions are not available (an entry with args [] or [false], switched off, is accepted)"),
        ("infotext", not body.infotext, "reading parameters from an infotext is not available; send the fields"),
        ("scheduler", body.scheduler is None or body.scheduler.strip().lower() in ("", *map(str.lower, SCHEDULERS)),
         f"the schedule is the sampler's own; choose one of {', '.join(SCHEDULERS)} (GET /sdapi/v1/schedulers)"),
    ]
    if isinstance(body, Txt2ImgRequest):
        checks += [("enable_hr", not body.enable_hr, "hires fix is not available; ask for the size you want"),
                   ("firstpass_image", not body.firstpass_image, "hires fix is not available")]
    if isinstance(body, Img2ImgRequest):
        checks += _img2img_checks(body)
    for field, ok, why in checks:
        if not ok:
            raise _refuse(field, getattr(body, field), why)


def _img2img_checks(body: Img2ImgRequest) -> list[tuple[str, bool, str]]:
    checks = [
        ("resize_mode", body.resize_mode in (None, 0), "only 0 (just resize: the image is stretched to width x "
                                                       "height) is available"),
        ("initial_noise_multiplier", body.initial_noise_multiplier in (None, 1), "only 1 is available"),
        ("latent_mask", not body.latent_mask, "a separate latent mask is not available"),
        ("mask_round", body.mask_round in (None, True), "the mask is always thresholded at half"),
    ]
    blurs = {v for v in (body.mask_blur, body.mask_blur_x, body.mask_blur_y) if v is not None}
    checks.append(("mask_blur_x" if body.mask_blur_x is not None else "mask_blur", len(blurs) <= 1,
                   f"blur is the same on both axes here: send mask_blur alone (got {sorted(blurs)})"))
    return checks


def denoising_strength(body: Img2ImgRequest) -> float:
    """img2img's strength: A1111's default is 0.75 with a mask too (vqdm's edits default to 1 there)."""
    return DEFAULT_DENOISING if body.denoising_strength is None else body.denoising_strength


def mask_blur(body: Img2ImgRequest) -> int:
    """Pixels of blur on the mask (after `check_supported`: the fields that say it agree)."""
    return next((v for v in (body.mask_blur, body.mask_blur_x, body.mask_blur_y) if v is not None), 0)


def model_for(body: A1111Request, chosen: str | None) -> str | None:
    """The model a request runs on: its override_settings' sd_model_checkpoint, else the one this key
    chose with POST /sdapi/v1/options (`chosen`), else None (the first served model)."""
    overrides = body.override_settings or {}
    for key, value in overrides.items():
        if key != CHECKPOINT_OPTION:
            check_option(key, value, f"override_settings.{key}")
    name = overrides.get(CHECKPOINT_OPTION)
    if name is not None and not isinstance(name, str):
        raise bad_request(f"override_settings.{CHECKPOINT_OPTION} must be a model id (GET /sdapi/v1/sd-models)",
                          f"override_settings.{CHECKPOINT_OPTION}")
    return name or chosen


def check_option(key: str, value: Any, param: str) -> None:
    """An option other than the checkpoint may only be set to what vqdm does."""
    if key not in FIXED_OPTIONS:
        raise bad_request(f"{param}: option {key!r} cannot be set on vqdm; settable: {CHECKPOINT_OPTION} (a served "
                          f"model) and, at their fixed values, {', '.join(FIXED_OPTIONS)}", param,
                          "unsupported_parameter")
    allowed = _OPTION_SYNONYMS.get(key, (FIXED_OPTIONS[key],))
    if value not in allowed:
        raise bad_request(f"{param}: {key} is fixed at {FIXED_OPTIONS[key]!r} on vqdm (got {value!r})", param,
                          "unsupported_parameter")


def generation_request(body: A1111Request, model: "ServedModel", max_n: int) -> ImageGenerationRequest:
    """The vqdm request an A1111 body asks for, after `check_supported`; `validate` does the rest."""
    n = body.batch_size * body.n_iter
    if n > max_n:
        raise bad_request(f"batch_size x n_iter = {body.batch_size} x {body.n_iter} = {n} images; this server makes "
                          f"at most {max_n} per request (max_n)", "batch_size")
    prompt, loras = prompt_loras(body.prompt, apply=not body.disable_extra_networks)
    # Neither side: the model's size (txt2img) or the init image's (img2img); one side: the other is the model's.
    size = None
    if body.width is not None or body.height is not None:
        size = f"{body.width or model.default_width}x{body.height or model.default_height}"
    try:
        return ImageGenerationRequest(
            prompt=prompt, model=model.id, n=n, size=size, negative_prompt=body.negative_prompt or None,
            num_inference_steps=body.steps, guidance_scale=body.cfg_scale, seed=None if body.seed == -1 else body.seed,
            scheduler=sampler_for(body.sampler_name or body.sampler_index), loras=loras or None)
    except ValidationError as e:
        raise validation_error(e) from None


def in_a1111_terms(err: APIError) -> APIError:
    """A refusal from `validate` with A1111's field names: LoRAs come from the prompt's tags."""
    param = err.param or ""
    if param.startswith("loras"):
        return APIError(err.status, f"prompt: {err.message.replace('GET /v1/models', 'GET /sdapi/v1/loras')} (from "
                                    "its <lora:...> tags)", param="prompt", code=err.code)
    if param == "model":
        return APIError(err.status, err.message.replace("GET /v1/models", "GET /sdapi/v1/sd-models"),
                        param=f"override_settings.{CHECKPOINT_OPTION}", code=err.code)
    if param in _FIELD_NAMES:
        name = _FIELD_NAMES[param]
        return APIError(err.status, err.message.replace(param, name, 1), param=name.split(" ")[0], code=err.code)
    return err


def check_eta(eta: float | None, sampler: str) -> None:
    """eta changes the picture only with ancestral samplers and DDIM, whose eta here is fixed."""
    fixed = {"euler_a": 1.0, "ddim": 0.0}.get(sampler)
    if eta is not None and fixed is not None and eta != fixed:
        raise _refuse("eta", eta, f"{SAMPLERS[sampler].a1111} runs with eta {fixed:g} here; send {fixed:g} or leave it out")
