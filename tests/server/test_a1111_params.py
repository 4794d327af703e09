"""AUTOMATIC1111's fields on vqdm's: the `<lora:name:weight>` prompt parser, the sampler map, the
refusal of values vqdm cannot honour, and the defaults webuiapi sends, which must all pass."""
from __future__ import annotations

import inspect

import pytest
from pydantic import ValidationError

from vqdm.server.a1111_params import (check_eta, check_option, check_supported, in_a1111_terms, prompt_loras,
                                      sampler_for, sampler_names)
from vqdm.server.a1111_schemas import Img2ImgRequest, Txt2ImgRequest
from vqdm.server.errors import APIError
from vqdm.server.samplers import SAMPLERS


def test_prompt_lora_tags_are_parsed_out():
    text, loras = prompt_loras("a cat <lora:pixel-art:0.8>, sitting <lora:ink> <LYCO:glow:-1.5>")
    assert text == "a cat , sitting"
    assert [(lora.name, lora.scale) for lora in loras] == [("pixel-art", 0.8), ("ink", 1.0), ("glow", -1.5)]
    assert prompt_loras("no tags here") == ("no tags here", [])
    assert prompt_loras("x <lora:ink:2>", apply=False) == ("x", [])  # disable_extra_networks: removed, not applied


@pytest.mark.parametrize("prompt, words", [
    ("x <hypernet:h:1>", "extra network vqdm does not have"),
    ("x <lora:ink:0.5:0.7>", "not <lora:name>"),
    ("x <lora::1>", "not <lora:name>"),
    ("x <lora:ink:lots>", "not a number"),
])
def test_prompt_tags_vqdm_cannot_read_are_refused(prompt, words):
    with pytest.raises(APIError) as e:
        prompt_loras(prompt)
    assert e.value.status == 400 and e.value.param == "prompt" and words in e.value.message


def test_sampler_map_covers_every_vqdm_sampler():
    assert sampler_names() == ["Euler", "Euler a", "DDIM", "DPM++ 2M", "UniPC"]
    for s in SAMPLERS.values():
        assert sampler_for(s.a1111) == sampler_for(s.a1111.upper()) == sampler_for(s.name) == s.name
    assert sampler_for(None) is None and sampler_for("") is None  # the model's own
    with pytest.raises(APIError) as e:
        sampler_for("DPM++ 2M Karras")
    err = e.value
    assert err.param == "sampler_name" and "'karras'" in err.message and "Euler, Euler a, DDIM, DPM++ 2M, UniPC" in err.message


def _defaults(method: str) -> dict:
    """The body webuiapi's txt2img / img2img send with every argument left at its default."""
    import webuiapi

    params = inspect.signature(getattr(webuiapi.WebUIApi, method)).parameters
    skip = {"self", "controlnet_units", "adetailer", "animatediff", "roop", "reactor", "sag", "use_async",
            "use_deprecated_controlnet", "images", "mask_image"}
    body = {name: p.default for name, p in params.items() if name not in skip}
    body.update(sampler_name="Euler a", sampler_index="Euler a", scheduler="automatic", steps=20, script_args=[])
    return body


def test_webuiapi_defaults_are_accepted():
    check_supported(Txt2ImgRequest.model_validate(_defaults("txt2img")))
    img2img = Img2ImgRequest.model_validate({**_defaults("img2img"), "init_images": ["AAAA"]})
    check_supported(img2img)
    check_supported(img2img.model_copy(update={"mask": "AAAA"}))  # with a mask: "only masked", "fill"
    check_eta(1.0, "euler_a")  # webuiapi's eta 1 is what Euler a does


@pytest.mark.parametrize("extra, field", [
    ({"enable_hr": True}, "enable_hr"), ({"restore_faces": True}, "restore_faces"), ({"styles": ["x"]}, "styles"),
    ({"subseed_strength": 0.5}, "subseed_strength"), ({"s_churn": 1}, "s_churn"), ({"tiling": True}, "tiling"),
    ({"script_name": "x/y/z plot"}, "script_name"), ({"scheduler": "Karras"}, "scheduler"),
    ({"alwayson_scripts": {"ControlNet": {"args": [{"enabled": True}]}}}, "alwayson_scripts"),
])
def test_txt2img_values_vqdm_cannot_honour_are_refused_by_name(extra, field):
    with pytest.raises(APIError) as e:
        check_supported(Txt2ImgRequest.model_validate({"prompt": "x", **extra}))
    assert e.value.status == 400 and e.value.param == field and e.value.code == "unsupported_parameter"
    check_supported(Txt2ImgRequest.model_validate({"prompt": "x", "alwayson_scripts": {"ControlNet": {"args": []}}}))


def test_img2img_inpainting_fields_map_or_are_refused():
    base = {"prompt": "x", "init_images": ["AAAA"], "mask": "AAAA", "inpaint_full_res": True}
    for fill in (0, 1, 2, 3):  # fill, original, latent noise, latent nothing
        check_supported(Img2ImgRequest.model_validate({**base, "inpainting_fill": fill, "denoising_strength": 0.5}))
    for extra, field in (({"resize_mode": 1}, "resize_mode"), ({"mask_blur": 4, "mask_blur_x": 2}, "mask_blur_x")):
        with pytest.raises(APIError) as e:
            check_supported(Img2ImgRequest.model_validate({**base, **extra}))
        assert e.value.param == field, extra
    with pytest.raises(ValidationError):  # not one of A1111's four
        Img2ImgRequest.model_validate({**base, "inpainting_fill": 4})


def test_options_eta_and_field_names():
    check_option("sd_vae", "None", "sd_vae")
    with pytest.raises(APIError, match="cannot be set"):
        check_option("sd_checkpoint_cache", 3, "sd_checkpoint_cache")
    with pytest.raises(APIError, match="fixed at 1"):
        check_option("CLIP_stop_at_last_layers", 2, "override_settings.CLIP_stop_at_last_layers")
    with pytest.raises(APIError, match="DDIM runs with eta 0"):
        check_eta(1.0, "ddim")
    check_eta(0.3, "euler")  # a sampler without noise ignores eta, as A1111's does
    err = in_a1111_terms(APIError(400, "num_inference_steps must be between 1 and 150 (got 900)",
                                  param="num_inference_steps"))
    assert (err.param, err.message) == ("steps", "steps must be between 1 and 150 (got 900)")
    err = in_a1111_terms(APIError(400, "LoRA 'x' is not loaded; available: a (GET /v1/models)", param="loras.0.name",
                                  code="lora_not_found"))
    assert err.param == "prompt" and "GET /sdapi/v1/loras" in err.message and err.code == "lora_not_found"


def test_a1111_masks_repaint_where_opaque_or_white():
    import numpy as np
    from PIL import Image

    from vqdm.server.edit_pipeline import mask_from

    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((1, 1), (0, 0, 0, 255))  # opaque black: A1111 repaints it, OpenAI keeps it
    a1111, openai = np.asarray(mask_from(rgba, transparent_repaints=False)), np.asarray(mask_from(rgba))
    assert a1111[1, 1] == 255 and a1111.sum() == 255 and (openai == 255 - a1111).all()
    grey = Image.new("L", (4, 4), 0)
    grey.putpixel((2, 3), 200)  # no transparency: light = repaint under both rules
    assert np.asarray(mask_from(grey, transparent_repaints=False))[3, 2] == 255 == np.asarray(mask_from(grey))[3, 2]


def test_decode_with_a1111_options_blurs_the_mask_and_names_its_fields():
    import io

    import numpy as np
    from PIL import Image

    from vqdm.server.edit_pipeline import mask_from
    from vqdm.server.sizes import SizePlan
    from vqdm.server.uploads import decode_edit

    def png(img) -> io.BytesIO:
        out = io.BytesIO()
        img.save(out, "PNG")
        return out

    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    image = Image.new("RGB", (32, 32), (10, 200, 30))
    same_size = lambda w, h: SizePlan((w, h), (w, h))  # noqa: E731
    sharp, _ = decode_edit(png(image), png(mask), same_size, 0.75, 1 << 20)
    soft, _ = decode_edit(png(image), png(mask), same_size, 0.75, 1 << 20, mask_blur=2)
    assert set(np.unique(np.asarray(sharp.mask))) == {0, 255}
    levels = np.asarray(soft.mask)
    assert 0 < levels[16, 7] < 255 and levels[16, 16] == 255 and levels[0, 0] == 0  # feathered at the edge only
    with pytest.raises(APIError) as e:
        decode_edit(io.BytesIO(b"not a picture"), None, same_size, 0.75, 1 << 20, names=("init_images.0", "mask"),
                    mask_rule=lambda img: mask_from(img, transparent_repaints=False))
    assert e.value.param == "init_images.0" and "init_images.0 is not an image" in e.value.message
