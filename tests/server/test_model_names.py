"""Model names and sizes (issue 27): aliases and the default route for the names clients send by
default, and the sizes each model was trained at with the size policy for the others. The
acceptance half drives a live `vqdm serve` on the embedded default with the official `openai`
package: `dall-e-3` through an alias, and a stock 1024x1024 request judged by scikit-learn's
digit classifier against the same seeds at the model's own 32²."""
from __future__ import annotations

import base64
import dataclasses
import io
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from vqdm.server.sizes import (SDXL_SIZES, SizePlan, SizeRefused, effective_policy, nearest_size, plan_size,
                               trained_sizes)

EMBEDDED = "vqdm-tiny-sdxl"


# -- sizes: pure functions --------------------------------------------------------------------------
def test_nearest_size_takes_aspect_first_then_area():
    assert nearest_size((1920, 1080), SDXL_SIZES) == (1344, 768)  # 16:9 -> 1.75, not 1280x768 (1.67)
    assert nearest_size((1080, 1920), SDXL_SIZES) == (768, 1344)
    assert nearest_size((512, 512), SDXL_SIZES) == nearest_size((4096, 4096), SDXL_SIZES) == (1024, 1024)
    sizes = ((64, 64), (128, 128), (128, 64))
    assert nearest_size((100, 100), sizes) == (128, 128)  # same aspect as 64x64; closer in area
    assert nearest_size((512, 240), sizes) == (128, 64)  # the nearest aspect wins; 128x128 is nearer in area
    assert nearest_size((128, 128), ((64, 64), (256, 256))) == (64, 64)  # equally far: the smaller
    assert nearest_size((1024, 1024), ((32, 32),)) == (32, 32)


def test_policies_nearest_refuse_any():
    sizes = ((512, 512),)
    assert plan_size((512, 512), sizes, "refuse") == SizePlan((512, 512), (512, 512))  # a trained size: as asked
    plan = plan_size((1024, 768), sizes, "nearest")
    assert (plan.generated, plan.resize_to) == ((512, 512), (1024, 768))
    assert plan_size((1024, 768), sizes, "any").resize_to is None
    with pytest.raises(SizeRefused) as e:
        plan_size((1000, 1000), SDXL_SIZES, "refuse")
    assert all(f"{w}x{h}" in str(e.value) for w, h in SDXL_SIZES) and "1000x1000" in str(e.value)


def test_trained_sizes_and_the_auto_policy():
    assert len(SDXL_SIZES) == 41 and len(set(SDXL_SIZES)) == 41
    assert all(w % 64 == 0 and h % 64 == 0 and 0.9 < w * h / 1024**2 < 1.1 for w, h in SDXL_SIZES)
    assert {(h, w) for w, h in SDXL_SIZES} == set(SDXL_SIZES)
    assert trained_sizes("sdxl", (1024, 1024)) == SDXL_SIZES
    assert trained_sizes("sdxl-turbo", (512, 512)) == ((512, 512),)
    assert trained_sizes("sdxl", (32, 32)) == ((32, 32),)  # the embedded digits model: its preset's 32²
    assert effective_policy("auto", "embedded") == "nearest"
    assert effective_policy("auto", "/models/sdxl-vq3") == "any"
    assert effective_policy("refuse", "embedded") == "refuse"


# -- aliases: start-up errors -------------------------------------------------------------------------
def test_aliases_from_environment(monkeypatch):
    from vqdm.server.settings import Settings

    monkeypatch.setenv("VQDM_MODEL_ALIASES", f"dall-e-3={EMBEDDED}, gpt-image-1={EMBEDDED}")
    assert Settings().aliases() == {"dall-e-3": EMBEDDED, "gpt-image-1": EMBEDDED}


@pytest.mark.parametrize("argv,message", [
    (["--model-alias", "dall-e-3=sdxl-vq3"], "alias 'dall-e-3' names model 'sdxl-vq3', which is not served here "
                                             f"(served: {EMBEDDED})"),
    (["--model", "a=/x", "--model-alias", "a=a"], "alias 'a' is already a served model's id"),
    (["--model-alias", f"x={EMBEDDED}", "--model-alias", f"x={EMBEDDED}"], "alias 'x' given twice"),
    (["--model-alias", "dall-e-3"], "write ALIAS=MODEL"),
])
def test_serve_refuses_bad_aliases_in_one_line(capsys, argv, message):
    from vqdm.cli import main

    assert main(["serve", *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("vqdm serve: error: model_aliases:") and message in err and "\n" not in err


# -- resolution: ids, aliases, the default route ---------------------------------------------------------
def test_unknown_model_400_lists_models_and_aliases_or_routes_to_the_first():
    from vqdm.server.errors import APIError
    from vqdm.server.loader import ServedModel
    from vqdm.server.settings import Settings
    from vqdm.server.validation import resolve_model

    models = {name: ServedModel(name, f"/models/{name}", "sdxl", 30, 5.0, 1024, 1024, None, {}) for name in "ab"}
    named = dict(devices=["cpu"], models=["a=/models/a", "b=/models/b"], model_aliases=["dall-e-3=b"])
    plain, routed = Settings(**named), Settings(**named, route_unknown_models=True)
    assert [resolve_model(n, models, plain).id for n in (None, "a", "b", "dall-e-3")] == ["a", "a", "b", "b"]
    with pytest.raises(APIError) as e:
        resolve_model("gpt-image-1", models, plain)
    assert (e.value.status, e.value.param, e.value.code) == (400, "model", "model_not_found")
    assert "model 'gpt-image-1' is not served here; models: a, b; aliases: dall-e-3" in e.value.message
    assert [resolve_model(n, models, routed).id for n in ("gpt-image-1", "dall-e-3")] == ["a", "b"]
    assert models["b"].trained_sizes == ((1024, 1024),)  # none given: its default size only


# -- acceptance: a live `vqdm serve` on the embedded default, driven by the openai package ------------
@pytest.fixture(scope="module", autouse=True)
def server(tools, tmp_path_factory):
    """`vqdm serve` with no model (the embedded default) and one alias, the way a user starts it;
    started before the module's first test so that its start-up overlaps the in-process tests."""
    args = ["--no-warmup", "--cpu-threads", "1", "--model-alias", f"dall-e-3={EMBEDDED}", "--max-batch-size", "10"]
    live = tools.LiveServer(args, tmp_path_factory.mktemp("names") / "server.log")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.wait_ready().base + "/v1", api_key="unused", max_retries=0, timeout=300)


def _wait_for(condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _image(b64: str):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")


def test_openai_client_reaches_the_model_as_dall_e_3(client, server):
    import openai

    ids = [m.id for m in client.models.list()]
    assert ids == [EMBEDDED, "dall-e-3"]
    alias = client.models.retrieve("dall-e-3")
    assert alias.model_extra["alias_of"] == EMBEDDED and alias.model_extra["trained_sizes"] == ["32x32"]
    res = client.images.generate(model="dall-e-3", prompt="a handwritten digit 7", response_format="b64_json",
                                 extra_body={"seed": 3, "num_inference_steps": 2})
    assert res.model_extra["model"] == EMBEDDED and _image(res.data[0].b64_json).size == (32, 32)
    metrics = httpx.get(server.base + "/metrics").text
    assert f'vqdm_requests_total{{model="{EMBEDDED}",status="200"}}' in metrics and "dall-e-3" not in metrics
    with pytest.raises(openai.BadRequestError) as e:  # the default route is off
        client.images.generate(model="gpt-image-1", prompt="a handwritten digit 7")
    assert f"models: {EMBEDDED}; aliases: dall-e-3" in e.value.message


def test_a_stock_1024_request_draws_a_digit_the_judge_reads_as_often_as_32(client, server):
    """Digits 0-4, seed 11: through the alias at 1024x1024 (drawn at 32², resized) and at the model's own
    size (size omitted), judged by scikit-learn's LogisticRegression on the real 8x8 digits."""
    import openai

    from vqdm.models.digits import digit_prompt
    from vqdm.quantizer.evaluate.digits import DigitJudge, images_to_digits

    digits = list(range(5))

    def draw(job):
        size, d = job
        res = client.images.generate(model="dall-e-3", prompt=digit_prompt(d), response_format="b64_json",
                                     **({"size": size} if size else {}), extra_body={"seed": 11})
        if size:
            assert (res.size, res.model_extra["generated_size"]) == (size, "32x32")
        return _image(res.data[0].b64_json), res.model_extra["batch_size"]

    # A long job holds the worker while the ten queue; cancelled then, it lets them run: asked at
    # 1024² or at the model's size, all draw at 32², so they share one pipeline call (the batch key is
    # the drawn size).
    jobs = [(size, d) for size in ("1024x1024", None) for d in digits]
    with ThreadPoolExecutor(1 + len(jobs)) as pool:
        hold = pool.submit(client.images.generate, prompt="x", n=4, extra_headers={"X-Request-Id": "hold"},
                           extra_body={"num_inference_steps": 150, "seed": 0})
        _wait_for(lambda: httpx.get(f"{server.base}/v1/requests/hold").json().get("state") == "running")
        replies = pool.map(draw, jobs)
        _wait_for(lambda: "vqdm_queue_depth 10.0" in httpx.get(server.base + "/metrics").text)
        assert httpx.delete(f"{server.base}/v1/requests/hold").status_code == 202
        drawn, batches = zip(*replies)
        with pytest.raises(openai.APIStatusError):
            hold.result()
    assert set(batches) == {10}
    images = {"1024x1024": drawn[:5], None: drawn[5:]}
    assert {im.size for im in images["1024x1024"]} == {(1024, 1024)}
    assert {im.size for im in images[None]} == {(32, 32)}
    judge = DigitJudge()
    read = {size: judge.predict(images_to_digits(ims)) for size, ims in images.items()}
    accuracy = {size: float((got == np.array(digits)).mean()) for size, got in read.items()}
    print(f"digits {digits} at 1024x1024 read as {read['1024x1024'].tolist()} ({accuracy['1024x1024']:.0%}), at "
          f"32x32 as {read[None].tolist()} ({accuracy[None]:.0%})")
    assert accuracy[None] >= 0.6, (accuracy, read)  # the judge reads the model's own digits at all
    assert accuracy["1024x1024"] >= accuracy[None], (accuracy, read)


def test_an_edit_follows_the_size_policy(client):
    from PIL import Image

    from vqdm.models.digits import digit_prompt

    src = io.BytesIO()
    Image.new("RGB", (96, 96), "white").save(src, format="PNG")
    res = client.images.edit(model="dall-e-3", image=("white.png", src.getvalue(), "image/png"),
                             prompt=digit_prompt(4), size="128x128", response_format="b64_json",
                             extra_body={"seed": 2, "strength": 0.5, "num_inference_steps": 4})
    assert _image(res.data[0].b64_json).size == (128, 128)
    assert (res.size, res.model_extra["generated_size"]) == ("128x128", "32x32")
