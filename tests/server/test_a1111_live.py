"""AUTOMATIC1111's API on a real `vqdm serve` (the embedded default, a LoRA, two API keys) driven by
`webuiapi`, A1111's own Python client: txt2img (pixel-identical to the OpenAI dialect for the same
seed), img2img with a mask, a <lora:...> prompt, the model list and options, and progress and
interrupt on a long job, each seen and stopped only by the key that submitted it."""
from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import pytest

KEYS = ("a1111-key-one", "a1111-key-two")
BEARER = {"Authorization": f"Bearer {KEYS[0]}"}
MODEL = "vqdm-tiny-sdxl"
SMALL = dict(width=32, height=32, cfg_scale=4, steps=3)  # the embedded model's own size


# The 64-wide attention blocks of the embedded model's U-Net (tiny-sdxl-digits) and the layers of each
# this test's LoRA adapts: written with numpy alone, it costs no diffusers / peft import (conftest's
# make_lora_file builds a U-Net for that, 15 s of this module's budget on a loaded machine).
_BLOCKS = [f"{b}.attentions.{i}" for b, n in (("down_blocks.1", 2), ("down_blocks.2", 2), ("mid_block", 1),
                                             ("up_blocks.0", 3), ("up_blocks.1", 3)) for i in range(n)]
_LAYERS = ("proj_out", "transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn1.to_v",
           "transformer_blocks.0.attn1.to_out.0")


def write_lora(path, rank: int = 4, width: int = 64) -> None:
    """A diffusers/PEFT-layout LoRA on those layers, random A and B (alpha = rank)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(1)
    tensors = {}
    for block in _BLOCKS:
        for layer in _LAYERS:
            key = f"unet.{block}.{layer}"
            tensors[f"{key}.lora_A.weight"] = rng.normal(0, rank**-0.5, (rank, width)).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = rng.normal(0, 0.3, (width, rank)).astype(np.float32)
    save_file(tensors, str(path))


@pytest.fixture(scope="module")
def server(tmp_path_factory, tools):
    root = tmp_path_factory.mktemp("a1111")
    write_lora(root / "pixel.safetensors")
    args = ["--no-warmup", "--api-key", KEYS[0], "--api-key", KEYS[1], "--max-steps", "5000",
            "--lora", f"pixel={root / 'pixel.safetensors'}"]
    # The embedded default draws at 32x32, below the default min_side.
    live = tools.LiveServer(args, root / "server.log", env={"VQDM_MIN_SIDE": "32"}).wait_ready()
    yield live.base
    live.stop()


def client(base: str, key: str = KEYS[0]):
    import webuiapi

    # Basic auth, as A1111's --api-auth: the password is the API key, the user name is not read.
    return webuiapi.WebUIApi(baseurl=base + "/sdapi/v1", username="anyone", password=key, sampler="Euler")


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


def test_txt2img_same_seed_same_pixels_as_the_openai_dialect(server, tools):
    api = client(server)
    before = tools.metric_samples(httpx.get(server + "/metrics").text)
    res = api.txt2img(prompt="a handwritten digit 3", seed=11, batch_size=2, **SMALL)
    assert len(res.images) == 2 and res.info["all_seeds"] == [11, 12] and res.info["sampler_name"] == "Euler"
    assert res.info["sd_model_name"] == MODEL and "Seed: 12, Size: 32x32" in res.info["infotexts"][1]
    assert res.parameters["prompt"] == "a handwritten digit 3" and res.parameters["enable_hr"] is False
    r = httpx.post(server + "/v1/images/generations", headers=BEARER, timeout=120, json={
        "prompt": "a handwritten digit 3", "n": 2, "seed": 11, "num_inference_steps": 3, "guidance_scale": 4,
        "scheduler": "euler", "size": "32x32"})
    assert r.status_code == 200, r.text
    for image, item in zip(res.images, r.json()["data"]):
        assert np.array_equal(pixels(image), tools.decode_png(item["b64_json"]))
    assert np.abs(pixels(res.images[0]) - pixels(res.images[1])).mean() > 1  # seeds 11 and 12 differ
    after = tools.metric_samples(httpx.get(server + "/metrics").text)  # one pipeline, one set of counters
    assert tools.delta(before, after, "vqdm_requests_total", model=MODEL, status="200") == 2
    random = api.txt2img(prompt="a handwritten digit 3", seed=-1, **SMALL).info
    assert random["seed"] >= 0 and random["all_seeds"] == [random["seed"]]


def test_img2img_with_a_mask_repaints_only_the_mask(server):
    from PIL import Image

    api = client(server)
    src = api.txt2img(prompt="a handwritten digit 8", seed=2, **SMALL).image
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))  # white: repaint, as A1111
    res = api.img2img(images=[src], mask_image=mask, prompt="a handwritten digit 1", seed=5, denoising_strength=0.9,
                      inpainting_fill=1, inpaint_full_res=False, mask_blur=0, **SMALL)
    change = np.abs(pixels(res.image) - pixels(src))
    inside = np.asarray(mask) > 0
    assert change[~inside].max() == 0 and change[inside].mean() > 1
    assert res.info["denoising_strength"] == 0.9 and res.parameters["init_images"] is None


def test_img2img_with_webuiapis_inpainting_defaults_repaints_only_around_the_mask(server):
    """webuiapi's own defaults but the seed and steps: "only masked" (inpaint_full_res, padding 0),
    "fill", mask_blur 4, denoising_strength 0.75, 512x512. The 8x8 masked square of a 96x64 picture
    is drawn at 32x32 and pasted back: the reply has the picture's size, and nothing beyond the
    blurred mask's reach changes."""
    from PIL import Image, ImageFilter

    api = client(server)
    src = Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    mask = Image.new("L", (96, 64), 0)
    mask.paste(255, (56, 24, 64, 32))
    res = api.img2img(images=[src], mask_image=mask, prompt="a handwritten digit 1", seed=5, steps=3)
    # webuiapi's 512x512 is drawn at the model's 32x32 (size policy nearest), the crop pasted back at 96x64
    assert res.image.size == (96, 64)
    assert (res.info["vqdm"]["size"], res.info["vqdm"]["generated_size"]) == ("96x64", "32x32")
    change = np.abs(pixels(res.image) - pixels(src)).max(axis=2)
    reach = np.asarray(mask.filter(ImageFilter.MaxFilter(2 * 16 + 1))) > 0  # well past a blur of 4 pixels
    assert change[~reach].max() == 0 and change[np.asarray(mask) > 0].mean() > 1
    # Each masked content, same seed, on a crop tight enough (no blur, 4 pixels of padding: 16x16 drawn at
    # 32x32) that the mask covers whole latent cells: each starts the masked area from something else.
    inside = np.asarray(mask) > 0
    outs = {}
    for fill in (0, 1, 2, 3):
        out = api.img2img(images=[src], mask_image=mask, prompt="a handwritten digit 1", seed=5, mask_blur=0,
                          inpaint_full_res_padding=4, inpainting_fill=fill, **SMALL)
        outs[fill] = pixels(out.image)
        assert np.abs(outs[fill] - pixels(src)).max(axis=2)[~inside].max() == 0, fill
    for a, b in ((0, 1), (1, 2), (1, 3), (2, 3)):
        assert np.abs(outs[a] - outs[b])[inside].mean() > 1, (a, b)


def test_lora_through_the_prompt(server):
    api = client(server)
    assert [(lora["name"], lora["vqdm"]["models"]) for lora in api.get_loras()] == [("pixel", [MODEL])]
    plain = pixels(api.txt2img(prompt="a handwritten digit 5", seed=4, **SMALL).image)
    styled = api.txt2img(prompt="a handwritten digit 5 <lora:pixel:1.5>", seed=4, **SMALL)
    assert np.abs(pixels(styled.image) - plain).mean() > 2
    assert styled.info["prompt"].endswith("<lora:pixel:1.5>") and "Lora weights: pixel: 1.5" in styled.info["infotexts"][0]
    off = api.txt2img(prompt="<lora:pixel:0> a handwritten digit 5", seed=4, **SMALL).image
    assert np.array_equal(pixels(off), plain)  # weight 0: no adapter
    with pytest.raises(RuntimeError) as e:
        api.txt2img(prompt="a digit <lora:pixel-art:1>", **SMALL)
    assert e.value.args[0] == 400 and "'pixel-art'" in e.value.args[1] and "available: pixel" in e.value.args[1]


def test_models_options_samplers_and_keys(server):
    api = client(server)
    (model,) = api.get_sd_models()
    assert model["title"] == model["model_name"] == MODEL and model["vqdm"]["defaults"]["size"] == "32x32"
    assert api.util_get_current_model() == MODEL
    api.util_set_model(MODEL.upper())  # webuiapi's closest-title match, then POST options
    assert api.get_options()["sd_model_checkpoint"] == MODEL
    for options, words in (({"sd_model_checkpoint": "sd_xl_base_1.0.safetensors"}, f"available: {MODEL}"),
                           ({"CLIP_stop_at_last_layers": 2}, "fixed at 1")):
        r = httpx.post(server + "/sdapi/v1/options", json=options, headers=BEARER)
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
    assert api.util_get_sampler_names() == sorted(["Euler", "Euler a", "DDIM", "DPM++ 2M", "UniPC"])
    with pytest.raises(RuntimeError) as e:
        api.txt2img(prompt="x", sampler_name="DPM++ 2M Karras", **{**SMALL, "steps": 1})
    assert e.value.args[0] == 400 and "Euler, Euler a, DDIM, DPM++ 2M, UniPC" in e.value.args[1]
    anonymous = httpx.get(server + "/sdapi/v1/sd-models")
    assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"].startswith("Basic")
    assert httpx.get(server + "/sdapi/v1/sd-models", auth=("anyone", "wrong-key-123")).status_code == 401
    assert httpx.get(server + "/sdapi/v1/sd-models", headers=BEARER).status_code == 200


def test_progress_and_interrupt_of_a_long_job_per_key(server):
    mine, theirs = client(server, KEYS[0]), client(server, KEYS[1])
    outcome: dict = {}

    def long_job():
        try:
            outcome["result"] = mine.txt2img(prompt="a handwritten digit 7", seed=1, **{**SMALL, "steps": 4000})
        except RuntimeError as e:
            outcome["error"] = e.args

    worker = threading.Thread(target=long_job)
    worker.start()

    def progress_until(api, condition, what: str) -> dict:
        deadline = time.monotonic() + 120
        while not condition(p := api.get_progress()):
            assert time.monotonic() < deadline and worker.is_alive(), (what, p, outcome)
            time.sleep(0.02)
        return p

    first = progress_until(mine, lambda p: p["progress"] > 0, "running")
    state = first["state"]
    assert state["job_count"] == 1 and state["sampling_steps"] == 4000 and 0 < state["sampling_step"] < 4000
    assert first["eta_relative"] > 0 and first["current_image"] is None
    # Another key neither sees the job nor stops it.
    assert theirs.get_progress()["state"]["job_count"] == 0
    assert theirs.interrupt() == {}
    progress_until(mine, lambda p: p["state"]["sampling_step"] > state["sampling_step"] + 5, "still running")
    assert mine.interrupt() == {}
    worker.join(120)
    assert not worker.is_alive() and outcome.get("error", (None,))[0] == 499, outcome
    assert "interrupted" in outcome["error"][1]
    assert mine.get_progress()["state"]["job_count"] == 0
