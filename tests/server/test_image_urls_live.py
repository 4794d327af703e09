"""Acceptance for `response_format: "url"`: a live `vqdm serve` on the embedded default, with an
API key, driven by the official `openai` package. images.generate and images.edit return links that
a plain GET (httpx, no API key) fetches as PNGs of the asked size; an unknown id is a 404. (Two
live replicas sharing a folder: tests/server/test_replicas_live.py.)"""
from __future__ import annotations

import io

import httpx
import numpy as np

KEY = "url-tenant-key-1"


def fetch_png(url: str) -> tuple[tuple[int, int], bytes]:
    from PIL import Image

    r = httpx.get(url, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", (url, r.status_code, r.text[:300])
    image = Image.open(io.BytesIO(r.content))
    assert image.format == "PNG"
    return image.size, r.content


def test_openai_client_url_replies(live_server):
    import openai
    from PIL import Image

    server = live_server(["--api-key", KEY, "--no-warmup", "--max-steps", "4"]).wait_ready()
    client = openai.OpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0)
    res = client.images.generate(model="vqdm-tiny-sdxl", prompt="a handwritten digit 3", response_format="url",
                                 size="64x64", extra_body={"num_inference_steps": 2, "seed": 3})
    [item] = res.data
    assert item.b64_json is None and item.url.startswith(server.base + "/v1/files/file-")
    assert fetch_png(item.url)[0] == (64, 64)

    source = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(source, format="PNG")
    edit = client.images.edit(model="vqdm-tiny-sdxl", image=("digit.png", source.getvalue(), "image/png"),
                              prompt="a handwritten digit 7", response_format="url",
                              extra_body={"num_inference_steps": 2, "seed": 4})
    [item] = edit.data
    assert item.b64_json is None and item.url.startswith(server.base + "/v1/files/file-")
    assert fetch_png(item.url)[0] == (64, 64)

    unknown = httpx.get(f"{server.base}/v1/files/file-{'0' * 32}/content", timeout=30)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "file_not_found"
