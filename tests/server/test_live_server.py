"""A real `vqdm serve` process on a free port, driven over loopback: the official openai client,
overload (429 + Retry-After, no lost or mixed-up image), disconnects that cancel work, metrics on
the main and the separate port, and a SIGTERM that lets the running request finish."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

KEY = "test-key-123456"
AUTH = {"Authorization": f"Bearer {KEY}"}
GEN = "/v1/images/generations"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_artifact, tmp_path_factory):
    port, metrics_port = free_port(), free_port()
    log_path = tmp_path_factory.mktemp("live") / "server.log"
    cmd = [sys.executable, "-m", "vqdm.cli", "serve", "--model", f"tiny={tiny_artifact}", "--host", "127.0.0.1",
           "--port", str(port), "--metrics-port", str(metrics_port), "--api-key", KEY, "--max-queue-size", "4",
           "--max-batch-size", "4", "--shutdown-timeout", "60", "--json-logs"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("VQDM_")}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"server did not become ready:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.2)
    yield {"proc": proc, "base": base, "metrics": f"http://127.0.0.1:{metrics_port}/metrics", "log": log_path}
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def png(b64: str) -> np.ndarray:
    from PIL import Image

    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert im.format == "PNG"
    return np.asarray(im.convert("RGB")).astype(np.int16)


def scrape(url: str, **kw) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url, timeout=30, **kw).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def d(before, after, name, **labels):
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def scrape_when(url: str, done, timeout: float = 60) -> dict:
    """Scrape until `done(samples)` holds, or the deadline (the caller's asserts then say what is
    missing): a request is counted as its reply closes, just after its client has read it."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(url)
        if done(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def solo(base: str, prompt: str, seed: int, steps: int) -> np.ndarray:
    r = httpx.post(base + GEN, json={"prompt": prompt, "seed": seed, "num_inference_steps": steps, "size": "64x64"},
                   headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return png(r.json()["data"][0]["b64_json"])


def test_openai_client(server):
    import openai

    client = openai.OpenAI(base_url=server["base"] + "/v1", api_key=KEY, max_retries=0)
    res = client.images.generate(model="tiny", prompt="a lighthouse at dusk", response_format="b64_json",
                                 size="128x128", extra_body={"num_inference_steps": 2, "seed": 5})
    image = png(res.data[0].b64_json)
    assert image.shape == (128, 128, 3)
    assert [m.id for m in client.models.list()] == ["tiny"]
    # The SDK's image stream with vqdm's richer events asked for: the progress events arrive as loosely
    # typed events, then its completed event.
    events = list(client.images.generate(model="tiny", prompt="x", stream=True, size="64x64",
                                         extra_body={"num_inference_steps": 3, "seed": 5, "stream_format": "vqdm"}))
    assert [e.type for e in events if e.type == "image_generation.progress"] == ["image_generation.progress"] * 3
    assert events[-1].type == "image_generation.completed" and png(events[-1].b64_json).shape == (64, 64, 3)
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model="dall-e-3", prompt="x")
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server["base"] + "/v1", api_key="wrong-key-000", max_retries=0).models.list()


def test_openai_client_images_edit(server, tmp_path):
    """The SDK's images.edit, unchanged: multipart image + OpenAI-style mask (transparent = repaint)."""
    import openai
    from PIL import Image

    y, x = np.mgrid[0:64, 0:64]
    source = np.stack([x * 4, y * 4, np.full_like(x, 90)], -1).astype(np.uint8)
    Image.fromarray(source).save(tmp_path / "source.png")
    alpha = np.full((64, 64), 255, np.uint8)
    alpha[16:48, 16:48] = 0
    Image.fromarray(np.dstack([source, alpha]), "RGBA").save(tmp_path / "mask.png")
    client = openai.OpenAI(base_url=server["base"] + "/v1", api_key=KEY, max_retries=0)
    with open(tmp_path / "source.png", "rb") as image, open(tmp_path / "mask.png", "rb") as mask:
        res = client.images.edit(model="tiny", image=image, mask=mask, prompt="a green square", n=2,
                                 response_format="b64_json", extra_body={"num_inference_steps": 3, "seed": 4})
    assert len(res.data) == 2
    outside = alpha == 255
    for item in res.data:
        change = np.abs(png(item.b64_json) - source.astype(np.int16))
        assert change[outside].max() == 0 and change[~outside].mean() > 10  # pasted back: exact outside
    with pytest.raises(openai.BadRequestError) as e:
        client.images.edit(model="tiny", image=("x.png", b"not an image", "image/png"), prompt="x")
    assert e.value.code == "invalid_image"


def test_twenty_concurrent_requests_with_a_queue_of_four(server):
    base = server["base"]
    before = scrape(server["metrics"])

    async def burst():
        async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=120) as c:
            return await asyncio.gather(*[
                c.post(GEN, json={"prompt": f"prompt {i}", "seed": 1000 + i, "num_inference_steps": 3,
                                  "size": "64x64"}) for i in range(20)])

    responses = asyncio.run(burst())
    ok = {i: r for i, r in enumerate(responses) if r.status_code == 200}
    full = [r for r in responses if r.status_code == 429]
    assert len(ok) + len(full) == 20, [r.status_code for r in responses]
    # At least the four queue places are filled (the first job may start before the others arrive
    # and free its place, or all twenty may arrive first); everything beyond the queue is refused.
    assert len(ok) >= 4 and full
    for r in full:
        assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "queue_full"
    images = {i: png(r.json()["data"][0]["b64_json"]) for i, r in ok.items()}
    for i, r in ok.items():
        assert r.json()["seed"] == 1000 + i
        own = solo(base, f"prompt {i}", 1000 + i, 3)
        assert np.abs(images[i] - own).max() <= 1  # its own seed's image...
        others = [np.abs(images[j] - own).max() for j in images if j != i]
        assert min(others) > 20  # ...and nobody else's
    after = scrape_when(server["metrics"],
                        lambda a: d(before, a, "vqdm_requests_total", model="tiny", status="200") >= 2 * len(ok))
    assert d(before, after, "vqdm_requests_total", model="tiny", status="429") == len(full)
    assert d(before, after, "vqdm_requests_total", model="tiny", status="200") == len(ok) * 2  # burst + solo runs
    batches = d(before, after, "vqdm_batch_size_count")
    images_in_batches = d(before, after, "vqdm_batch_size_sum")
    assert images_in_batches == 2 * len(ok) and batches < images_in_batches  # some of the burst shared a batch
    assert d(before, after, "vqdm_images_generated_total", model="tiny") == 2 * len(ok)


def _stream_until_progress(base: str, body: dict, rid: str, holder: dict) -> None:
    """Stream a request, note its progress events, and walk away after the first one."""
    with httpx.Client(base_url=base, headers={**AUTH, "X-Request-Id": rid}, timeout=60) as c:
        with c.stream("POST", GEN, json={**body, "stream": True, "stream_format": "vqdm"}) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    event = json.loads(line[5:])
                    holder.setdefault("events", []).append(event)
                    if event["type"] == "image_generation.progress" and holder.get("leave", True):
                        return
                    if event["type"] in ("error", "image_generation.completed"):
                        return


def _wait_state(base: str, rid: str, states: set, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = httpx.get(f"{base}/v1/requests/{rid}", headers=AUTH, timeout=30)
        if r.status_code == 200 and r.json()["state"] in states:
            return r.json()
        time.sleep(0.05)
    raise AssertionError(f"{rid} did not reach {states}: {httpx.get(f'{base}/v1/requests/{rid}', headers=AUTH).text}")


def test_stream_disconnect_cancels_the_running_job(server):
    base = server["base"]
    before = scrape(server["metrics"])
    holder: dict = {}
    _stream_until_progress(base, {"prompt": "long", "num_inference_steps": 150, "size": "64x64"}, "gone-stream", holder)
    assert holder["events"][-1]["step"] == 1
    final = _wait_state(base, "gone-stream", {"cancelled"})
    assert final["cancel_reason"] == "client_disconnected" and final["step"] < 150
    after = scrape_when(server["metrics"],
                        lambda a: d(before, a, "vqdm_requests_total", model="tiny", status="499") >= 1)
    assert d(before, after, "vqdm_requests_cancelled_total", model="tiny", stage="running") == 1
    assert d(before, after, "vqdm_requests_total", model="tiny", status="499") == 1


def test_queued_disconnect_and_delete(server):
    base = server["base"]
    before = scrape(server["metrics"])
    holder: dict = {"leave": False}
    t = threading.Thread(target=_stream_until_progress, args=(
        base, {"prompt": "long", "num_inference_steps": 150, "size": "64x64"}, "job-long", holder))
    t.start()
    _wait_state(base, "job-long", {"running"})
    # A different step count cannot join the running batch: it waits, and its client gives up.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base + GEN, json={"prompt": "short", "num_inference_steps": 2, "size": "64x64"},
                   headers={**AUTH, "X-Request-Id": "job-impatient"}, timeout=2.0)
    gone = _wait_state(base, "job-impatient", {"cancelled"})
    assert gone["cancel_reason"] == "client_disconnected" and gone["step"] == 0
    r = httpx.delete(f"{base}/v1/requests/job-long", headers=AUTH, timeout=30)
    assert r.status_code in (200, 202)
    t.join(30)
    last = holder["events"][-1]
    assert last["type"] == "error" and last["status"] == 499 and last["error"]["code"] == "request_cancelled"
    steps = [e["step"] for e in holder["events"] if e["type"] == "image_generation.progress"]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) < 150
    after = scrape_when(server["metrics"],
                        lambda a: d(before, a, "vqdm_requests_total", model="tiny", status="499") >= 2)
    assert d(before, after, "vqdm_requests_cancelled_total", model="tiny", stage="queued") == 1
    assert d(before, after, "vqdm_requests_cancelled_total", model="tiny", stage="running") == 1
    assert d(before, after, "vqdm_requests_total", model="tiny", status="499") == 2


def test_metrics_contract_on_both_ports(server):
    main = scrape(server["base"] + "/metrics")
    side = scrape(server["metrics"])
    names = {name for name, _ in side}
    for metric in ("vqdm_requests_total", "vqdm_request_duration_seconds_bucket", "vqdm_queue_wait_seconds_bucket",
                   "vqdm_denoise_step_duration_seconds_bucket", "vqdm_vae_decode_duration_seconds_bucket",
                   "vqdm_queue_depth", "vqdm_in_flight_requests", "vqdm_images_generated_total",
                   "vqdm_batch_size_bucket", "vqdm_errors_total", "vqdm_requests_cancelled_total",
                   "vqdm_model_weight_bytes", "vqdm_process_peak_rss_bytes", "vqdm_cuda_memory_allocated_bytes",
                   "vqdm_cuda_memory_reserved_bytes", "vqdm_cuda_memory_peak_bytes", "vqdm_build_info", "vqdm_ready"):
        assert metric in names, metric
    key = ("vqdm_requests_total", (("model", "tiny"), ("status", "200")))
    assert main[key] == side[key]  # one registry behind both ports
    buckets = sorted(dict(k[1])["le"] for k in side if k[0] == "vqdm_request_duration_seconds_bucket")
    assert "0.005" in buckets and "600.0" in buckets  # sub-second GPU Turbo to ten-minute CPU runs
    before = side
    httpx.post(server["base"] + GEN, json={"prompt": "x", "num_inference_steps": 1, "size": "64x64"}, headers=AUTH,
               timeout=60)
    httpx.post(server["base"] + GEN, json={"prompt": "x", "n": 0}, headers=AUTH, timeout=60)
    httpx.post(server["base"] + GEN, json={"prompt": "x"}, timeout=60)
    after = scrape_when(server["metrics"], lambda a: d(before, a, "vqdm_requests_total", model="unknown", status="401"))
    assert d(before, after, "vqdm_requests_total", model="tiny", status="200") == 1
    assert d(before, after, "vqdm_requests_total", model="tiny", status="400") == 1
    assert d(before, after, "vqdm_requests_total", model="unknown", status="401") == 1
    assert d(before, after, "vqdm_errors_total", reason="invalid_request") == 1
    assert d(before, after, "vqdm_errors_total", reason="unauthorized") == 1
    assert d(before, after, "vqdm_request_duration_seconds_count", model="tiny") == 1


def test_logs_are_json_with_request_ids(server):
    httpx.post(server["base"] + GEN, json={"prompt": "x", "num_inference_steps": 1, "size": "64x64"},
               headers={**AUTH, "X-Request-Id": "trace-me-42"}, timeout=60)
    deadline = time.monotonic() + 60
    while True:  # the access line is written as the reply closes, just after the client has read it
        lines = [json.loads(line) for line in server["log"].read_text().splitlines() if line.startswith("{")]
        access = [e for e in lines if e.get("request_id") == "trace-me-42" and e.get("path") == GEN]
        if access or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert access and access[-1]["status"] == 200
    assert any("trace-me-42" in e["msg"] for e in lines if e["logger"] == "vqdm.server")  # the batch line


def test_sigterm_finishes_the_running_request(server):
    """Last in this module: the server is gone afterwards."""
    base, proc = server["base"], server["proc"]
    result: dict = {}

    def go():
        result["r"] = httpx.post(base + GEN, json={"prompt": "finish me", "num_inference_steps": 40, "size": "64x64"},
                                 headers={**AUTH, "X-Request-Id": "in-flight"}, timeout=120)

    t = threading.Thread(target=go)
    t.start()
    _wait_state(base, "in-flight", {"running"})
    proc.send_signal(signal.SIGTERM)
    t.join(120)
    assert result["r"].status_code == 200 and png(result["r"].json()["data"][0]["b64_json"]).shape == (64, 64, 3)
    # uvicorn re-raises the captured SIGTERM after its graceful shutdown, the conventional exit.
    assert proc.wait(60) in (0, -signal.SIGTERM)
    msgs = [json.loads(line)["msg"] for line in server["log"].read_text().splitlines() if line.startswith("{")]
    assert "shut down" in msgs
