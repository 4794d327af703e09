"""POST /v1/images/edits through the TestClient: img2img, inpainting that changes only the masked
region (not one pixel outside it), OpenAI's transparent-mask convention, batching, SSE,
cancellation, limits on the uploaded files, hostile uploads (tests/server/hostile_images.py), what a
queued edit keeps in memory, `size` auto, and metrics."""
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
    change = np.abs(painted - src)
    assert change[~inside].max() == 0, change[~inside].max()  # pasted back with a binary mask: exact
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
                  data={"prompt": "x", "stream": "true", "stream_format": "vqdm", "num_inference_steps": "4",
                        "strength": "1"}) as r:
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


def chunked_multipart(parts: dict[str, bytes], chunk: int = 64 * 1024):
    """(headers, body generator): a multipart body sent without Content-Length, as chunked uploads are."""
    boundary = "vqdm-test-boundary"
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}.png"\r\n'
                    f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n" for name, data in parts.items())
    body += f'--{boundary}\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx\r\n--{boundary}--\r\n'.encode()
    chunks = (body[i:i + chunk] for i in range(0, len(body), chunk))
    return {"content-type": f"multipart/form-data; boundary={boundary}"}, chunks


def test_issue_26_reproductions_are_4xx_in_openai_shape(make_client, source):
    """Each answered 500 (the first two) or 400 (the last) before: a 68-byte PNG claiming
    20000x20000, as image and as mask; 50k nested brackets in `loras` (400 on /generations too);
    a chunked body over the route's limit (the body limit's 413, not the form parser's 400)."""
    from tests.server.hostile_images import png_raw

    c = make_client(max_image_bytes=128 * 1024)  # a text field may be as long: 100k brackets fit
    good, bomb = png_bytes(source), png_raw(20000, 20000)
    assert len(bomb) < 70
    for upload, param in ((dict(image=bomb), "image"), (dict(image=good, mask=bomb), "mask")):
        files = {k: (f"{k}.png", v, "image/png") for k, v in upload.items()}
        r = c.post(EDITS, files=files, data={"prompt": "x", "num_inference_steps": "2"})
        assert r.status_code == 400, r.text
        assert r.json()["error"] | {"message": None} == {"message": None, "type": "invalid_request_error",
                                                         "param": param, "code": "image_too_large"}
        assert "limit" in r.json()["error"]["message"]
    nested = "[" * 50_000 + "]" * 50_000
    r = post_edit(c, good, loras=nested)
    assert r.status_code == 400 and r.json()["error"]["param"] == "loras", r.text
    r = c.post("/v1/images/generations", content=f'{{"prompt": "x", "loras": {nested}}}',
               headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text  # what the JSON route answered already
    limit = 2 * 128 * 1024 + (1 << 20)  # the edits route: 2 x max_image_bytes + max_body_bytes
    headers, body = chunked_multipart({"image": good + bytes(limit)})
    r = c.post(EDITS, headers=headers, content=body)
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "request_too_large"
    assert post_edit(c, good, strength=0.5).status_code == 200


def test_size_auto_is_the_upload_size_or_the_nearest_allowed():
    from vqdm.server.settings import Settings
    from vqdm.server.uploads import auto_size
    from vqdm.server.validation import size_problem

    s = Settings()  # min_side 64, max_side 2048, max_pixels 2048²
    cases = {
        ((32, 32), (32, 32)): (32, 32),  # the embedded default's own size (what size auto generates)
        ((64, 64), (32, 32)): (64, 64),  # allowed as it is
        ((100, 75), (64, 64)): (96, 72),  # rounded down to multiples of 8
        ((40, 24), (32, 32)): (104, 64),  # too small: grown to min_side, aspect kept
        ((1, 1), (64, 64)): (64, 64),
        ((4096, 4096), (64, 64)): (2048, 2048),  # too large: shrunk to the limits
        ((4032, 3024), (1024, 1024)): (2048, 1536),  # a phone photo
        ((9000, 50), (64, 64)): (2048, 64),  # too thin for both limits: stretched to fit
    }
    for (upload, model_size), want in cases.items():
        got = auto_size(*upload, model_size, s)
        assert got == want, (upload, got, want)
        assert got == model_size or size_problem(*got, s) is None
    tight = Settings(max_side=1000, max_pixels=300_000)
    w, h = auto_size(3000, 2000, (64, 64), tight)
    assert size_problem(w, h, tight) is None and abs(w / h - 1.5) < 0.05 and w * h > 0.9 * 300_000


def test_a_queued_edit_keeps_only_its_resized_input(make_client, tools):
    """While an edit waits in the queue, neither its upload's bytes nor its full-size decoded image
    is alive anywhere in the process: only the output-sized EditInput (5 queued 4096² edits held
    854 MB when the request coroutine kept them)."""
    import gc

    from PIL import Image

    from tests.server.hostile_images import picture

    c = make_client()
    upload = png_bytes(picture(1000, 776))  # a size nothing else in the process has
    blocker: dict = {}
    threading.Thread(target=lambda: blocker.setdefault("r", c.post(
        "/v1/images/generations", json={"prompt": "x", "n": 4, "size": "128x128", "num_inference_steps": 150},
        headers={"X-Request-Id": "blocker"}))).start()
    edit: dict = {}
    wait_for(lambda: "r" not in blocker and c.get("/v1/requests/blocker").json().get("state") == "running")
    t = threading.Thread(target=lambda: edit.setdefault("r", c.post(
        EDITS, files={"image": ("big.png", upload, "image/png")},
        data={"prompt": "x", "size": "64x64", "num_inference_steps": "2"}, headers={"X-Request-Id": "queued"})))
    t.start()
    wait_for(lambda: "r" not in edit and c.get("/v1/requests/queued").json().get("state") == "queued")
    gc.collect()
    objects = gc.get_objects()
    full_size = [o for o in objects if issubclass(type(o), Image.Image) and max(o.size) >= 776]
    copies = [o for o in gc.get_referents(*objects)
              if type(o) in (bytes, bytearray) and len(o) == len(upload) and o is not upload]
    del objects
    queued_state = c.get("/v1/requests/queued").json()["state"]
    assert c.delete("/v1/requests/blocker").status_code in (200, 202)
    t.join(120)
    assert queued_state == "queued"  # still waiting when the objects were counted
    assert not full_size, [im.size for im in full_size]
    assert not copies, f"{len(copies)} copies of the uploaded bytes are alive"
    assert out(tools, edit["r"]).shape == (64, 64, 3)


def wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def hostile_client(served_models):
    """One app for every hostile case (default upload limits; no warm-up: it is the same model)."""
    from fastapi.testclient import TestClient

    from vqdm.server.app import create_app
    from vqdm.server.settings import Settings

    app = create_app(Settings(devices=["cpu"], warmup=False), loader=lambda s, d: list(served_models))
    with TestClient(app) as client:
        yield client


def _hostile_params():
    from tests.server.hostile_images import hostile_images

    return [pytest.param(case, role, id=f"{case.name}-as-{role}")
            for case in hostile_images() for role in ("image", "mask") if role == "image" or case.as_mask]


@pytest.mark.parametrize("case,role", _hostile_params())
def test_hostile_upload_is_a_4xx_or_edited_as_displayed(hostile_client, tools, case, role):
    from PIL import Image

    from tests.server.hostile_images import picture

    c = hostile_client
    tools.wait_ready(c.get)
    w, h = case.displayed or (64, 64)
    shown = picture(w, h)
    rotated = "exif-orientation" in case.name
    files = {role: (f"{role}.bin", case.data, "application/octet-stream")}
    if role == "mask":
        files["image"] = ("image.png", png_bytes(shown), "image/png")
    elif rotated:  # keep every pixel: the output is then exactly the input as the server oriented it
        files["mask"] = ("keep.png", png_bytes(np.zeros((h, w)), "L"), "image/png")
    r = c.post(EDITS, files=files, data={"prompt": "x", "num_inference_steps": "2", "seed": "1"})
    assert r.status_code < 500, r.text
    assert c.get("/healthz").status_code == 200
    if case.code is not None:
        assert r.status_code == 400, r.text
        assert r.json()["error"] | {"message": None} == {"message": None, "type": "invalid_request_error",
                                                         "param": role, "code": case.code}
        return
    assert r.status_code == 200, r.text
    got = tools.decode_png(r.json()["data"][0]["b64_json"])
    assert got.shape == (max(64, h // 8 * 8), max(64, w // 8 * 8), 3)  # as displayed (size auto)
    if not rotated:
        return
    if role == "image":  # the picture as a viewer shows it, exactly for PNG
        err = np.abs(got - shown.astype(np.int16))
        assert (err.max() if case.name.startswith("png") else err.mean()) <= (0 if case.name.startswith("png") else 4)
    else:  # the mask as displayed: where it is clearly dark (keep), the source is untouched
        keep = np.asarray(Image.fromarray(shown).convert("L")) < 100
        assert keep.mean() > 0.1 and np.abs(got - shown.astype(np.int16))[keep].max() == 0


def test_hostile_uploads_leave_the_server_serving(hostile_client, source):
    assert hostile_client.get("/healthz").status_code == 200
    assert post_edit(hostile_client, png_bytes(source), strength=0.5).status_code == 200
