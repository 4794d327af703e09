"""Request and response bodies of AUTOMATIC1111's API (`/sdapi/v1/*`, routes in `a1111.py`), as its
clients send them: `webuiapi` sends every field below on every call, most at A1111's defaults.

Every field A1111 defines that changes the picture is declared, so that `a1111_params` can refuse a
value vqdm cannot honour by name. Fields A1111 does not know are ignored, as A1111 ignores them
(clients written for its forks send a few more); this is the one body in vqdm that does not refuse
unknown fields. `None` means "not sent": vqdm's behaviour, which for a few img2img fields differs
from A1111's default (docs/clients/automatic1111.md).
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from vqdm.server.schemas import SEED_MAX


class A1111Request(BaseModel):
    """The fields txt2img and img2img share."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field("", description="may hold <lora:name:weight> tags (GET /sdapi/v1/loras)")
    negative_prompt: str | None = Field(None, description='"" or absent: no negative prompt')
    styles: list[str] | None = Field(None, description="A1111's saved styles: none exist here; [] only")
    seed: int = Field(-1, ge=-1, le=SEED_MAX, description="-1: random")
    subseed: int | None = Field(None, description="used only with subseed_strength, which must be 0")
    subseed_strength: float | None = Field(None, description="variation seeds are not available: 0 only")
    seed_resize_from_h: int | None = Field(None, description="-1 or 0 only")
    seed_resize_from_w: int | None = Field(None, description="-1 or 0 only")
    sampler_name: str | None = Field(None, description="GET /sdapi/v1/samplers; absent: the model's own")
    sampler_index: str | None = Field(None, description="the older name of sampler_name, read when that is absent")
    scheduler: str | None = Field(None, description="GET /sdapi/v1/schedulers: Automatic only")
    batch_size: int = Field(1, ge=1, le=1024, description="batch_size x n_iter images, at most max_n")
    n_iter: int = Field(1, ge=1, le=1024)
    steps: int | None = Field(None, description="1..max_steps; absent: the model's default",
                              json_schema_extra={"minimum": 1})
    cfg_scale: float | None = Field(None, description="0..max_guidance; absent: the model's default",
                                    json_schema_extra={"minimum": 0})
    width: int | None = Field(None, ge=1, description="pixels, a multiple of 8; absent: the model's default "
                                                      "(txt2img) or the init image's size (img2img)")
    height: int | None = Field(None, ge=1)
    restore_faces: bool | None = Field(None, description="false only")
    tiling: bool | None = Field(None, description="false only")
    do_not_save_samples: bool | None = None
    do_not_save_grid: bool | None = None
    eta: float | None = Field(None, description="Euler a runs with eta 1, DDIM with eta 0; other samplers ignore it")
    denoising_strength: float | None = Field(None, description="img2img: (0, 1], default 0.75 (with a mask too); txt2img: ignored "
                                                               "(it is hires fix's, which is off)")
    s_min_uncond: float | None = Field(None, description="0 only")
    s_churn: float | None = Field(None, description="0 only")
    s_tmax: float | None = Field(None, description="ignored: it bounds s_churn, which is 0")
    s_tmin: float | None = Field(None, description="ignored: it bounds s_churn, which is 0")
    s_noise: float | None = Field(None, description="1 only")
    override_settings: dict[str, Any] | None = Field(
        None, description="sd_model_checkpoint (a served model, this request only); other options only at the "
                          "values GET /sdapi/v1/options shows")
    override_settings_restore_afterwards: bool | None = None
    refiner_checkpoint: str | None = Field(None, description="no refiner: absent, empty or None")
    refiner_switch_at: float | None = Field(None, description="ignored without a refiner")
    disable_extra_networks: bool | None = Field(None, description="true: <lora:...> tags are removed, not applied")
    comments: dict[str, Any] | None = None
    script_name: str | None = Field(None, description="no scripts: absent or empty")
    script_args: list[Any] | None = Field(None, description="no scripts: absent or []")
    send_images: bool = Field(True, description="false: the reply's images list is empty")
    save_images: bool | None = Field(None, description="ignored: the server keeps no images, the reply carries them")
    alwayson_scripts: dict[str, Any] | None = Field(
        None, description="no extensions: absent, {} or entries whose args are [] or [false] (switched off)")
    infotext: str | None = Field(None, description="not read: absent or empty")
    force_task_id: str | None = Field(None, description="ignored: progress is per API key")


class Txt2ImgRequest(A1111Request):
    """POST /sdapi/v1/txt2img."""

    enable_hr: bool | None = Field(None, description="hires fix is not available: false only")
    firstphase_width: int | None = None
    firstphase_height: int | None = None
    hr_scale: float | None = None
    hr_upscaler: str | None = None
    hr_second_pass_steps: int | None = None
    hr_resize_x: int | None = None
    hr_resize_y: int | None = None
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str | None = None
    hr_negative_prompt: str | None = None
    hr_cfg: float | None = None
    firstpass_image: str | None = Field(None, description="hires fix's: absent only")


class Img2ImgRequest(A1111Request):
    """POST /sdapi/v1/img2img: img2img, or inpainting with `mask`."""

    init_images: list[str] = Field(description="one base64 PNG / JPEG / WEBP (a data: URL prefix is allowed)",
                                   json_schema_extra={"minItems": 1, "maxItems": 1})
    mask: str | None = Field(None, description="base64, same size as the image: white (or, with transparency, "
                                               "opaque) = repaint")
    resize_mode: int | None = Field(None, description="0 (just resize) only")
    image_cfg_scale: float | None = Field(None, description="ignored: instruct-pix2pix models only")
    mask_blur: int | None = Field(None, ge=0, le=64, description="pixels of Gaussian blur on the mask the source "
                                                                 "is pasted back through; absent: 0")
    mask_blur_x: int | None = Field(None, ge=0, le=64, description="as mask_blur; mask_blur, _x and _y must agree")
    mask_blur_y: int | None = Field(None, ge=0, le=64, description="as mask_blur; mask_blur, _x and _y must agree")
    inpainting_fill: int | None = Field(None, ge=0, le=3, description=(
        "the masked area starts from 0 (fill: the colours around it), 1 (original: the source), 2 (latent noise: "
        "the seed's noise in its latents) or 3 (latent nothing: zero latents), then is noised to "
        "denoising_strength; absent: 1"))
    inpaint_full_res: bool | None = Field(None, description=(
        "true (only masked): the mask's box plus inpaint_full_res_padding, grown to width:height, is inpainted at "
        "width x height and pasted back; the reply has the init image's size. false or absent: the whole picture"))
    inpaint_full_res_padding: int | None = Field(None, ge=0, description="pixels around the mask's box for "
                                                                         "inpaint_full_res; absent: 0")
    inpainting_mask_invert: int | None = Field(None, ge=0, le=1, description="1: repaint where the mask is black")
    initial_noise_multiplier: float | None = Field(None, description="1 only")
    latent_mask: str | None = Field(None, description="absent only")
    include_init_images: bool = Field(False, description="echo init_images and mask in the reply's parameters")
    mask_round: bool | None = Field(None, description="true only: the mask is always thresholded at half")


class ImageResponse(BaseModel):
    """The reply of txt2img and img2img."""

    images: list[str] = Field(description="base64 PNGs, one per image (no grid)")
    parameters: dict[str, Any] = Field(description="the request as read")
    info: str = Field(description="JSON text: seed, all_seeds, sizes, sampler, infotexts, and vqdm's own "
                                  "(job id, timings)")


class ProgressState(BaseModel):
    skipped: bool
    interrupted: bool
    stopping_generation: bool
    job: str
    job_count: int
    job_timestamp: str
    job_no: int
    sampling_step: int
    sampling_steps: int


class ProgressResponse(BaseModel):
    """GET /sdapi/v1/progress: the caller's oldest unfinished job."""

    progress: float
    eta_relative: float
    state: ProgressState
    current_image: str | None
    textinfo: str | None
