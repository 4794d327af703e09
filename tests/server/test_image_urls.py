"""`response_format: "url"` through the TestClient: the reply links to a stored file that a plain
GET fetches (no API key: the id is the credential), byte for byte the image a b64_json reply
carries; every id that is not a live one (tampered, malformed, a traversal, expired) gets one and
the same 404; public_url; edits; two apps sharing a folder; the metrics; the private folder's
removal at shutdown; a folder that cannot be written."""
from __future__ import annotations

import base64
import io
import time

import numpy as np

GEN = "/v1/images/generations"
KEYS = ("tenant-one-key-1", "tenant-two-key-2")
ONE_STEP = {"num_inference_steps": 1, "seed": 11, "size": "64x64"}


def auth(i: int) -> dict:
    return {"Authorization": f"Bearer {KEYS[i]}"}


def file_path(url: str) -> str:
    """The path of a link (the TestClient's host is http://testserver)."""
    assert url.startswith("http://testserver/v1/files/file-") and url.endswith("/content"), url
    return url.removeprefix("http://testserver")


def test_url_reply_fetched_without_a_key_equals_the_b64_reply(make_client, tools):
    c = make_client(api_keys=list(KEYS), warmup=False)
    r = c.post(GEN, json={"prompt": "a red circle", "n": 2, "response_format": "url", **ONE_STEP}, headers=auth(0))
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [sorted(d) for d in data] == [["revised_prompt", "seed", "url"]] * 2  # no b64_json
    b64 = c.post(GEN, json={"prompt": "a red circle", "n": 2, **ONE_STEP}, headers=auth(0)).json()["data"]
    for item, same in zip(data, b64):
        got = c.get(file_path(item["url"]))  # no Authorization header, as a browser or front end fetches it
        assert got.status_code == 200 and got.headers["content-type"] == "image/png"
        assert got.headers["x-content-type-options"] == "nosniff"
        cache = got.headers["cache-control"].split(", ")
        assert cache[0] == "private" and cache[2] == "immutable" and 3590 <= int(cache[1].split("=")[1]) <= 3600
        assert got.content == base64.b64decode(same["b64_json"])  # the same image, encoded the same way
        assert tools.decode_png(same["b64_json"]).shape == (64, 64, 3)
        assert c.get(file_path(item["url"]), headers=auth(1)).status_code == 200  # any holder of the link
    # Only a key's holder can make a link.
    assert c.post(GEN, json={"prompt": "x", "response_format": "url", **ONE_STEP}).status_code == 401


def test_every_id_that_is_not_live_gets_the_same_404(make_client, tools):
    c = make_client(warmup=False)
    url = c.post(GEN, json={"prompt": "x", "response_format": "url", **ONE_STEP}).json()["data"][0]["url"]
    path = file_path(url)
    file_id = path.split("/")[3]
    assert c.get(path).status_code == 200
    flipped = file_id[:-1] + ("0" if file_id[-1] != "0" else "1")
    unknown = c.get(f"/v1/files/{flipped}/content")
    assert unknown.status_code == 404
    body = unknown.json()
    assert body["error"]["code"] == "file_not_found" and body["error"]["type"] == "not_found_error"
    bad_ids = [file_id.upper(), file_id + ".png", file_id[:-1], "..%2F..%2F..%2Fetc%2Fpasswd", "%2e%2e",
               f"{file_id}%2F..%2F{file_id}", "file-%00" + "0" * 31, "x" * 5000, "%2Fetc%2Fpasswd"]
    for bad in bad_ids:
        r = c.get(f"/v1/files/{bad}/content")
        assert (r.status_code, r.json()) == (404, body), bad
    # Expired: the store's clock moved past the TTL (1 h); the file is then removed and counted.
    before = tools.metric_samples(c.get("/metrics").text)
    c.app.state.vqdm.image_store.clock = lambda: time.time() + 3600
    r = c.get(path)
    assert (r.status_code, r.json()) == (404, body)
    after = tools.metric_samples(c.get("/metrics").text)
    assert tools.delta(before, after, "vqdm_image_store_evictions_total", reason="expired") == 1


def test_formats_public_url_edits_and_metrics(make_client, tools):
    from PIL import Image

    c = make_client(warmup=False, public_url="https://images.example.com/vqdm/")
    r = c.post(GEN, json={"prompt": "x", "response_format": "url", "output_format": "webp", **ONE_STEP})
    url = r.json()["data"][0]["url"]
    assert url.startswith("https://images.example.com/vqdm/v1/files/file-"), url
    got = c.get(url.removeprefix("https://images.example.com/vqdm"))
    assert got.headers["content-type"] == "image/webp" and Image.open(io.BytesIO(got.content)).format == "WEBP"

    source = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(source, format="PNG")
    r = c.post("/v1/images/edits", files={"image": ("s.png", source.getvalue(), "image/png")},
               data={"prompt": "x", "response_format": "url", "output_format": "jpeg", "num_inference_steps": "2"})
    assert r.status_code == 200, r.text
    got = c.get(r.json()["data"][0]["url"].removeprefix("https://images.example.com/vqdm"))
    assert got.headers["content-type"] == "image/jpeg" and Image.open(io.BytesIO(got.content)).size == (64, 64)

    samples = tools.metric_samples(c.get("/metrics").text)
    folder = c.app.state.vqdm.image_store.folder
    assert samples[("vqdm_image_store_files", ())] == 2 == len(list(folder.iterdir()))
    assert samples[("vqdm_image_store_bytes", ())] == sum(p.stat().st_size for p in folder.iterdir())


def test_two_replicas_sharing_a_folder_serve_each_others_links(make_client, tmp_path):
    a = make_client(warmup=False, image_store_dir=str(tmp_path))
    b = make_client(warmup=False, image_store_dir=str(tmp_path))
    url = a.post(GEN, json={"prompt": "x", "response_format": "url", **ONE_STEP}).json()["data"][0]["url"]
    assert b.get(file_path(url)).content == a.get(file_path(url)).content


def test_the_private_folder_goes_at_shutdown(served_models):
    from fastapi.testclient import TestClient

    from vqdm.server.app import create_app
    from vqdm.server.settings import Settings

    app = create_app(Settings(devices=["cpu"], warmup=False), loader=lambda s, d: list(served_models))
    with TestClient(app) as c:
        folder = app.state.vqdm.image_store.folder
        assert folder.is_dir()
    assert not folder.exists()


def test_a_folder_that_cannot_be_written_is_a_503_and_b64_still_works(make_client, tmp_path):
    folder = tmp_path / "volume"
    c = make_client(warmup=False, image_store_dir=str(folder))
    folder.rmdir()
    folder.write_bytes(b"")  # the volume went away and something else stands in its place
    r = c.post(GEN, json={"prompt": "x", "response_format": "url", **ONE_STEP})
    assert r.status_code == 503 and r.json()["error"]["code"] == "image_store_failed", r.text
    assert r.headers["retry-after"] == "5"
    assert c.post(GEN, json={"prompt": "x", **ONE_STEP}).status_code == 200
