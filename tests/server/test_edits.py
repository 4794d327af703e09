"""POST /v1/images/edits through the TestClient: img2img, inpainting that changes only the masked
region (mean |change| outside the mask <= 2/255), OpenAI's transparent-mask convention, batching,
SSE, cancellation, limits on the uploaded files, and metrics."""
from __future__ import annotations

import io
import json
import threading
import time

import numpy as np
import pytest

EDITS = "/v1/images/edits"


def png_bytes(arr: np.ndarray, mode: str | None = None, fmt: str = "PNG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8), mode).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def source() -> np.ndarray:
    """A smooth 64x64 picture (a gradient with a disc) so changes are easy to see."""
    y, x = np.mgrid[0:64, 0:64]
    img = np.stack([x * 4, y * 4, np.full_like(x, 90)], -1)
    img[(x - 20) ** 2 + (y - 40) ** 2 < 100] = (230, 40, 40)
    return img.astype(np.uint8)


def square_mask(transparent: bool = False) -> bytes:
    """The centre 32x32 square is to be repainted: white in an L mask, transparent in an RGBA one."""
    inside = np.zeros((64, 64), bool)
    inside[16:48, 16:48] = True
    if transparent:
        rgba = np.full((64, 64, 4), 255, np.uint8)
        rgba[inside, 3] = 0
        return png_bytes(rgba, "RGBA")
    return png_bytes(np.where(inside, 255, 0), "L")


def post_edit(c, image: bytes, mask: bytes | None = None, **fields):
    files = {"image": ("source.png", image, "image/png")}
    if mask is not None:
        files["mask"] = ("mask.png", mask, "image/png")
    data = {"prompt": "a green field", "num_inference_steps": "4", "seed": "7", **{k: str(v) for k, v in fields.items()}}
    return c.post(EDITS, files=files, data=data)


def out(tools, r) -> np.ndarray:
    assert r.status_code == 200, r.text
    return tools.decode_png(r.json()["data"][0]["b64_json"])


def test_img2img_and_inpainting(make_client, tools, source):
    c = make_client()
    before = tools.metric_samples(c.get("/metrics").text)
    src = source.astype(np.int16)
    low = out(tools, post_edit(c, png_bytes(source), strength=0.25))
    high = out(tools, post_edit(c, png_bytes(source), strength=1.0))
    assert low.shape == (64, 64, 3)  # the output takes the image's size by default
    assert 0 < np.abs(low - src).mean() < np.abs(high - src).mean()  # strength sets how far it moves
    again = out(tools, post_edit(c, png_bytes(source), strength=0.25))
    assert np.abs(again - low).max() <= 1  # seeded

    inside = np.zeros((64, 64), bool)
    inside[16:48, 16:48] = True
    painted = out(tools, post_edit(c, png_bytes(source), square_mask()))
    change = np.abs(painted - src).mean(-1)
    assert change[~inside].mean() <= 2.0, change[~inside].mean()  # the bound: <= 2 levels of 255
    assert change[inside].mean() > 20  # the masked square really was repainted
    openai_style = out(tools, post_edit(c, png_bytes(source), square_mask(transparent=True)))
    assert np.abs(openai_style - painted).max() <= 1  # transparent = repaint, as OpenAI's masks
    sized = c.post(EDITS, files={"image": ("s.png", png_bytes(source), "image/png")},
                   data={"prompt": "x", "size": "96x64", "num_inference_steps": "2", "model": "turbo"})
    assert out(tools, sized).shape == (64, 96, 3)

    after = tools.metric_samples(c.get("/metrics").text)
    assert tools.delta(before, after, "vqdm_image_edits_total", model="tiny", kind="img2img") == 3
    assert tools.delta(before, after, "vqdm_image_edits_total", model="tiny", kind="inpaint") == 2
    assert tools.delta(before, after, "vqdm_image_edits_total", model="turbo", kind="img2img") == 1
    assert tools.delta(before, after, "vqdm_requests_total", model="tiny", status="200") == 5


def test_edits_batch_with_each_other_stream_and_cancel(make_client, tools, source):
    c = make_client(max_batch_size=8, batch_wait_ms=400)
    results: dict = {}
    start = threading.Barrier(3)

    def go(rid, seed):
        start.wait(10)
        results[rid] = post_edit(c, png_bytes(source), square_mask(), seed=seed, n=1)

    threads = [threading.Thread(target=go, args=(f"e{i}", 20 + i)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert max(r.json()["batch_size"] for r in results.values()) > 1  # compatible edits share a batch
    for i in range(3):
        alone = out(tools, post_edit(c, png_bytes(source), square_mask(), seed=20 + i))
        assert np.abs(out(tools, results[f"e{i}"]) - alone).max() <= 1

    events = []
    with c.stream("POST", EDITS, files={"image": ("s.png", png_bytes(source), "image/png")},
                  data={"prompt": "x", "stream": "true", "num_inference_steps": "4", "strength": "1"}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    kinds = [e["type"] for e in events]
    assert kinds[0] == "image_edit.queued" and kinds[-1] == "image_edit.completed"
    assert [e["step"] for e in events if e["type"] == "image_edit.progress"] == [1, 2, 3, 4]

    # A long edit DELETEd while it runs ends as 499 without disturbing the next request.
    done: dict = {}
    t = threading.Thread(target=lambda: done.setdefault("r", c.post(
        EDITS, files={"image": ("s.png", png_bytes(source), "image/png")},
        data={"prompt": "x", "num_inference_steps": "150", "strength": "1"}, headers={"X-Request-Id": "edit-cancel"})))
    t.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        s = c.get("/v1/requests/edit-cancel")
        if s.status_code == 200 and s.json()["step"] >= 1:
            break
        time.sleep(0.05)
    assert c.delete("/v1/requests/edit-cancel").status_code in (200, 202)
    t.join(60)
    assert done["r"].status_code == 499
    assert c.get("/v1/requests/edit-cancel").json()["step"] < 150
    assert post_edit(c, png_bytes(source), strength=0.5).status_code == 200


def test_bad_uploads_are_4xx(make_client, source):
    c = make_client(max_image_bytes=64 * 1024, max_image_pixels=128 * 128)
    good = png_bytes(source)
    big_noise = png_bytes(np.random.default_rng(0).integers(0, 255, (200, 200, 3)))
    gif = png_bytes(source, fmt="GIF")
    cases = [
        (dict(image=b"this is not an image"), {}, 400, "image", "invalid_image"),
        (dict(image=good[: len(good) // 2]), {}, 400, "image", "invalid_image"),
        (dict(image=gif), {}, 400, "image", "unsupported_image_format"),
        (dict(image=big_noise), {}, 413, "image", "image_too_large"),
        (dict(image=png_bytes(np.zeros((130, 130, 3)))), {}, 400, "image", "image_too_large"),
        (dict(image=good, mask=b"nope"), {}, 400, "mask", "invalid_image"),
        (dict(image=good, mask=png_bytes(np.zeros((32, 32)), "L")), {}, 400, "mask", "invalid_value"),
        (dict(image=good), {"strength": "0"}, 400, "strength", "invalid_value"),
        (dict(image=good), {"strength": "1.5"}, 400, "strength", "invalid_value"),
        (dict(image=good), {"strength": "lots"}, 400, "strength", "invalid_value"),
        (dict(image=good), {"strength": "0.1", "num_inference_steps": "4"}, 400, "strength", "invalid_value"),
        (dict(image=good), {"prompt": ""}, 400, "prompt", "empty_prompt"),
        (dict(image=good), {"model": "nope"}, 400, "model", "model_not_found"),
        (dict(image=good), {"loras": '[{"name": "nope"}]'}, 400, "loras.0.name", "lora_not_found"),
        (dict(image=good), {"loras": "nope"}, 400, "loras", "invalid_value"),
        (dict(image=good), {"bogus": "1"}, 400, "bogus", "unknown_parameter"),
        (dict(image=good), {"size": "63x64"}, 400, "size", "invalid_value"),
        (dict(), {}, 400, "image", "missing_required_parameter"),
    ]
    for upload, fields, status, param, code in cases:
        files = {k: (f"{k}.png", v, "image/png") for k, v in upload.items()} or {"mask": ("m.png", good, "image/png")}
        r = c.post(EDITS, files=files, data={"prompt": "x", "num_inference_steps": "2", **fields})
        assert r.status_code == status, (upload.keys(), fields, r.text)
        err = r.json()["error"]
        assert err["param"] == param and err["code"] == code, (fields, err)
    r = c.post(EDITS, json={"prompt": "x", "image": "aGVsbG8="})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_content_type"
    r = c.post(EDITS, files={"image": ("s.png", b"x" * (200 * 1024), "image/png")}, data={"prompt": "x"})
    assert r.status_code == 413  # the body limit of the edits route: 2 images + the form
    assert post_edit(c, good, strength=0.5).status_code == 200  # and the server keeps serving
