"""Every endpoint through FastAPI's TestClient: happy paths, OpenAI error shapes, auth, limits,
request status and cancellation, metrics that move by exactly the requests made."""
from __future__ import annotations

import json
import threading
import time

import pytest

GEN = "/v1/images/generations"


def assert_error(r, status: int, param=None, code=None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def test_probes_models_and_metrics(make_client, tools, served_models):
    c = make_client()
    assert c.get("/healthz").json() == {"status": "ok"}
    assert c.get("/readyz").json()["models"] == ["tiny", "turbo"]
    listing = c.get("/v1/models").json()
    assert listing["object"] == "list" and [m["id"] for m in listing["data"]] == ["tiny", "turbo"]
    tiny = c.get("/v1/models/tiny").json()
    q = tiny["quantization"]
    assert (q["num_codebooks"], q["nbits"], q["group_size"], q["layers"]) == (2, 8, 8, 180)
    assert tiny["weight_bytes"]["stored"] < tiny["weight_bytes"]["dense_fp32"]
    # SDXL-family defaults (30 steps, guidance 5) at the U-Net's native size.
    assert tiny["defaults"] == {"size": "128x128", "num_inference_steps": 30, "guidance_scale": 5.0}
    turbo = c.get("/v1/models/turbo").json()
    assert turbo["quantization"] is None and turbo["family"] == "sdxl-turbo"
    assert turbo["defaults"]["num_inference_steps"] == 4 and turbo["defaults"]["guidance_scale"] == 0.0
    assert_error(c.get("/v1/models/nope"), 404, code="model_not_found")
    m = tools.metric_samples(c.get("/metrics").text)
    assert m[("vqdm_ready", ())] == 1.0
    assert m[("vqdm_model_weight_bytes", (("kind", "stored"), ("model", "tiny")))] == tiny["weight_bytes"]["stored"]
    assert m[("vqdm_model_weight_bytes", (("kind", "dense_fp16"), ("model", "tiny")))] == tiny["weight_bytes"]["dense_fp16"]
    assert m[("vqdm_process_peak_rss_bytes", ())] > 1e7
    assert m[("vqdm_cuda_memory_allocated_bytes", ())] == 0.0
    assert m[("vqdm_build_info", (("backend", "auto"), ("device", "cpu"), ("version", "0.1.0")))] == 1.0


def test_generate_png_jpeg_webp_with_seeds_and_request_id(make_client, tools):
    c = make_client()
    r = c.post(GEN, json={"prompt": "a red cube", "n": 2, "seed": 11, "num_inference_steps": 2},
               headers={"X-Request-Id": "my-job-1"})
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == "my-job-1"
    body = r.json()
    # The job id is the server's; the client's X-Request-Id is a label that also finds the job.
    assert body["id"].startswith("req_") and r.headers["x-vqdm-job-id"] == body["id"]
    assert body["model"] == "tiny" and body["seeds"] == [11, 12] and body["seed"] == 11
    assert body["size"] == "128x128" and body["batch_size"] == 2
    images = [tools.decode_png(d["b64_json"]) for d in body["data"]]
    assert images[0].shape == (128, 128, 3) and abs(images[0] - images[1]).max() > 20  # seeds differ
    assert {"queue_s", "text_encode_s", "denoise_s", "vae_decode_s", "encode_s", "total_s"} <= set(body["timings"])
    status = c.get("/v1/requests/my-job-1").json()
    assert status["state"] == "succeeded" and status["step"] == status["total_steps"] == 2
    assert status["id"] == body["id"] and status["label"] == "my-job-1"
    assert c.get(f"/v1/requests/{body['id']}").json() == status
    assert c.app.state.vqdm.dispatcher.jobs[body["id"]].result.images == []  # pixels not kept after the reply
    # Same seed, same image: image 1 of the n=2 request is seed 12 alone.
    solo = c.post(GEN, json={"prompt": "a red cube", "seed": 12, "num_inference_steps": 2}).json()
    assert abs(tools.decode_png(solo["data"][0]["b64_json"]) - images[1]).max() <= 1
    for fmt, magic in (("jpeg", b"\xff\xd8"), ("webp", b"RIFF")):
        import base64

        r = c.post(GEN, json={"prompt": "x", "model": "turbo", "size": "64x96", "output_format": fmt,
                              "output_compression": 80})
        assert r.status_code == 200 and base64.b64decode(r.json()["data"][0]["b64_json"])[:4].startswith(magic)
    assert c.post(GEN, json={"prompt": "x"}).headers["x-request-id"].startswith("req_")


def test_long_prompt_reports_what_clip_read(make_client):
    c = make_client()
    prompt = " ".join(f"word{i}" for i in range(120))
    body = c.post(GEN, json={"prompt": prompt, "model": "turbo", "size": "64x64"}).json()
    revised = body["data"][0]["revised_prompt"]
    assert revised and prompt.startswith(revised) and len(revised) < len(prompt)
    assert len(revised.split()) > 10  # most of the 75 content tokens are used


def test_stream_gives_monotonic_steps_then_image(make_client, tools):
    c = make_client()
    events = []
    with c.stream("POST", GEN, json={"prompt": "x", "stream": True, "stream_format": "vqdm",
                                     "num_inference_steps": 5, "seed": 3}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    kinds = [e["type"] for e in events]
    assert kinds[0] == "image_generation.queued" and kinds[-1] == "image_generation.completed"
    steps = [e["step"] for e in events if e["type"] == "image_generation.progress"]
    assert steps == [1, 2, 3, 4, 5] and all(e["total_steps"] == 5 for e in events if "total_steps" in e)
    final = events[-1]
    solo = c.post(GEN, json={"prompt": "x", "num_inference_steps": 5, "seed": 3}).json()
    assert final["seed"] == 3
    assert abs(tools.decode_png(final["b64_json"]) - tools.decode_png(solo["data"][0]["b64_json"])).max() <= 1


INVALID = [
    ({"prompt": ""}, "prompt", "empty_prompt"),
    ({"prompt": "   "}, "prompt", "empty_prompt"),
    ({"prompt": "x" * 4001}, "prompt", "prompt_too_long"),
    ({"prompt": "x", "negative_prompt": "y" * 4001}, "negative_prompt", "prompt_too_long"),
    ({}, "prompt", "missing_required_parameter"),
    ({"prompt": 5}, "prompt", "invalid_value"),
    ({"prompt": "x", "model": "dall-e-3"}, "model", "model_not_found"),
    ({"prompt": "x", "size": "100x100"}, "size", "invalid_value"),
    ({"prompt": "x", "size": "4096x4096"}, "size", "invalid_value"),
    ({"prompt": "x", "size": "2048x2048"}, "size", None),  # sides fine, pixels over max_pixels below
    ({"prompt": "x", "size": "8x8"}, "size", "invalid_value"),
    ({"prompt": "x", "size": "big"}, "size", "invalid_value"),
    ({"prompt": "x", "n": 0}, "n", "invalid_value"),
    ({"prompt": "x", "n": 99}, "n", "invalid_value"),
    ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps", "invalid_value"),
    ({"prompt": "x", "num_inference_steps": 10_000}, "num_inference_steps", "invalid_value"),
    ({"prompt": "x", "guidance_scale": -1}, "guidance_scale", "invalid_value"),
    ({"prompt": "x", "guidance_scale": 1e9}, "guidance_scale", "invalid_value"),
    ({"prompt": "x", "seed": -1}, "seed", "invalid_value"),
    ({"prompt": "x", "response_format": "gif"}, "response_format", "unsupported_response_format"),
    ({"prompt": "x", "output_format": "gif"}, "output_format", "invalid_value"),
    ({"prompt": "x", "output_compression": 101}, "output_compression", "invalid_value"),
    ({"prompt": "x", "scheduler": "bogus"}, "scheduler", "invalid_value"),
    ({"prompt": "x", "num_inference_stepz": 3}, "num_inference_stepz", "unknown_parameter"),
    ("{not json", None, "invalid_json"),
    ("[1, 2]", None, None),
]


def test_every_invalid_field_is_a_400_and_the_server_stays_up(make_client, tools):
    c = make_client(max_pixels=1024 * 1024)
    before = tools.metric_samples(c.get("/metrics").text)
    for body, param, code in INVALID:
        kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, str) else {"json": body}
        err = assert_error(c.post(GEN, **kw), 400, param, code)
        assert err["type"] == "invalid_request_error"
    assert c.post(GEN, json={"prompt": "still alive", "num_inference_steps": 1}).status_code == 200
    after = tools.metric_samples(c.get("/metrics").text)
    # Bodies that fail parsing, or name a model not served, never get a model label.
    unknown = sum(1 for body, *_ in INVALID if not isinstance(body, dict) or "model" in body
                  or not isinstance(body.get("prompt"), str) or set(body) & {"seed", "output_format",
                                                                            "output_compression", "num_inference_stepz"})
    on_tiny = len(INVALID) - unknown
    assert (unknown, on_tiny) == (9, 17)
    total_400 = (tools.delta(before, after, "vqdm_requests_total", model="tiny", status="400")
                 + tools.delta(before, after, "vqdm_requests_total", model="unknown", status="400"))
    assert total_400 == len(INVALID)
    assert tools.delta(before, after, "vqdm_requests_total", model="tiny", status="400") == on_tiny
    assert tools.delta(before, after, "vqdm_requests_total", model="tiny", status="200") == 1
    assert tools.delta(before, after, "vqdm_errors_total", reason="invalid_request") == len(INVALID)
    assert tools.delta(before, after, "vqdm_images_generated_total", model="tiny") == 1


def test_api_keys(make_client, tools):
    c = make_client(api_keys=["secret-key-1", "secret-key-2"])
    assert_error(c.post(GEN, json={"prompt": "x"}), 401, code="missing_api_key")
    r = c.post(GEN, json={"prompt": "x"}, headers={"Authorization": "Bearer wrong-key-123"})
    assert_error(r, 401, code="invalid_api_key")
    assert r.headers["www-authenticate"] == "Bearer"
    assert_error(c.get("/v1/models", headers={"Authorization": "Basic c2VjcmV0"}), 401)
    ok = c.post(GEN, json={"prompt": "x", "num_inference_steps": 1, "model": "turbo", "size": "64x64"},
                headers={"Authorization": "Bearer secret-key-2", "X-Request-Id": "k2-job"})
    assert ok.status_code == 200
    assert c.get("/v1/models", headers={"Authorization": "Bearer secret-key-1"}).status_code == 200
    # A job is visible only with the key that submitted it.
    assert c.get("/v1/requests/k2-job", headers={"Authorization": "Bearer secret-key-2"}).status_code == 200
    assert_error(c.get("/v1/requests/k2-job", headers={"Authorization": "Bearer secret-key-1"}), 404)
    assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
    m = tools.metric_samples(c.get("/metrics").text)  # open unless protect_metrics
    assert m[("vqdm_requests_total", (("model", "unknown"), ("status", "401")))] == 2
    assert m[("vqdm_errors_total", (("reason", "unauthorized"),))] == 3

    c2 = make_client(api_keys=["secret-key-1"], protect_metrics=True)
    assert_error(c2.get("/metrics"), 401)
    assert c2.get("/metrics", headers={"Authorization": "Bearer secret-key-1"}).status_code == 200


def test_oversize_body_and_unknown_route(make_client, tools):
    c = make_client(max_body_bytes=2048)
    assert_error(c.post(GEN, json={"prompt": "x" * 3000}), 413, code="request_too_large")

    def chunks():
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"y" * 500
        yield b'"}'

    assert_error(c.post(GEN, content=chunks(), headers={"content-type": "application/json"}), 413)
    assert_error(c.get("/v1/nothing"), 404)
    assert_error(c.put("/v1/models"), 405)
    m = tools.metric_samples(c.get("/metrics").text)
    assert m[("vqdm_requests_total", (("model", "unknown"), ("status", "413")))] == 2
    assert m[("vqdm_errors_total", (("reason", "payload_too_large"),))] == 2


def _post_in_thread(c, body, rid, results):
    def go():
        results[rid] = c.post(GEN, json=body, headers={"X-Request-Id": rid})

    t = threading.Thread(target=go)
    t.start()
    return t


def _wait_state(c, rid, states, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = c.get(f"/v1/requests/{rid}")
        if r.status_code == 200 and r.json()["state"] in states and (r.json()["step"] > 0 or "running" not in states):
            return r.json()
        time.sleep(0.02)
    raise AssertionError(f"{rid} never reached {states}: {c.get(f'/v1/requests/{rid}').text}")


def test_queue_full_status_and_delete(make_client, tools):
    c = make_client(max_queue_size=1)
    before = tools.metric_samples(c.get("/metrics").text)
    results: dict = {}
    ta = _post_in_thread(c, {"prompt": "long", "num_inference_steps": 150}, "job-a", results)
    running = _wait_state(c, "job-a", {"running"})
    assert running["queue_position"] is None and running["batch_size"] == 1
    tb = _post_in_thread(c, {"prompt": "queued", "num_inference_steps": 3}, "job-b", results)
    queued = _wait_state(c, "job-b", {"queued"})
    assert queued["queue_position"] == 0
    full = c.post(GEN, json={"prompt": "no room", "num_inference_steps": 2})
    assert_error(full, 429, code="queue_full")
    assert int(full.headers["retry-after"]) >= 1
    assert_error(c.post(GEN, json={"prompt": "x"}, headers={"X-Request-Id": "job-a"}), 409, code="duplicate_request_id")

    r = c.delete("/v1/requests/job-b")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    r = c.delete("/v1/requests/job-a")
    assert r.status_code in (200, 202)
    ta.join(20)
    tb.join(20)
    assert_error(results["job-a"], 499, code="request_cancelled")
    assert_error(results["job-b"], 499, code="request_cancelled")
    final = c.get("/v1/requests/job-a").json()
    assert final["state"] == "cancelled" and 0 < final["step"] < 150 and final["cancel_reason"] == "deleted"
    assert_error(c.delete("/v1/requests/job-a"), 409, code="request_finished")
    assert_error(c.get("/v1/requests/never"), 404)
    # The worker is free again and the next request succeeds.
    assert c.post(GEN, json={"prompt": "after", "num_inference_steps": 1}).status_code == 200
    after = tools.metric_samples(c.get("/metrics").text)
    assert tools.delta(before, after, "vqdm_requests_cancelled_total", model="tiny", stage="queued") == 1
    assert tools.delta(before, after, "vqdm_requests_cancelled_total", model="tiny", stage="running") == 1
    assert tools.delta(before, after, "vqdm_requests_total", model="tiny", status="499") == 2
    assert tools.delta(before, after, "vqdm_requests_total", model="tiny", status="429") == 1
    assert tools.delta(before, after, "vqdm_requests_total", model="tiny", status="409") == 1
    assert tools.delta(before, after, "vqdm_requests_total", model="tiny", status="200") == 1
    assert after[("vqdm_queue_depth", ())] == 0 and after[("vqdm_in_flight_requests", ())] == 0


def test_not_ready_then_ready_and_failed_start(served_models, tools):
    from fastapi.testclient import TestClient

    from vqdm.server.app import create_app
    from vqdm.server.settings import Settings

    release = threading.Event()

    def slow_loader(settings, devices):
        release.wait(20)
        return list(served_models)

    with TestClient(create_app(Settings(devices=["cpu"]), loader=slow_loader)) as c:
        assert c.get("/healthz").status_code == 200
        assert_error(c.get("/readyz"), 503, code="not_ready")
        r = c.post(GEN, json={"prompt": "x"})
        assert_error(r, 503, code="not_ready")
        assert r.headers.get("retry-after") == "5"
        assert tools.metric_samples(c.get("/metrics").text)[("vqdm_ready", ())] == 0
        release.set()
        tools.wait_ready(c.get)
        assert c.post(GEN, json={"prompt": "x", "num_inference_steps": 1}).status_code == 200

    def broken_loader(settings, devices):
        raise FileNotFoundError("/models/gone: no such folder")

    fatal = []
    with TestClient(create_app(Settings(devices=["cpu"]), loader=broken_loader, on_fatal=fatal.append)) as c:
        deadline = time.monotonic() + 10
        while not fatal and time.monotonic() < deadline:
            time.sleep(0.02)
        assert fatal and "/models/gone" in fatal[0]
        assert c.get("/healthz").status_code == 503
        assert "/models/gone" not in assert_error(c.get("/readyz"), 503, code="load_failed")["message"]


@pytest.mark.parametrize("n_jobs", [3])
def test_concurrent_compatible_requests_share_a_batch(make_client, tools, n_jobs):
    c = make_client(max_batch_size=4, max_steps=5000)
    # A long blocker holds the worker until every job is seen queued: they meet in the queue
    # whatever the machine's load, and the worker takes them as one batch.
    results: dict = {}
    blocker = _post_in_thread(c, {"prompt": "blocker", "num_inference_steps": 5000}, "blocker", results)
    _wait_state(c, "blocker", {"running"})
    threads = [_post_in_thread(c, {"prompt": f"p{i}", "seed": 100 + i, "num_inference_steps": 2}, f"b{i}", results)
               for i in range(n_jobs)]
    for i in range(n_jobs):
        _wait_state(c, f"b{i}", {"queued"})
    assert c.delete("/v1/requests/blocker").status_code in (200, 202)
    for t in [blocker, *threads]:
        t.join(60)
    assert_error(results["blocker"], 499, code="request_cancelled")
    sizes = {f"b{i}": results[f"b{i}"].json()["batch_size"] for i in range(n_jobs)}
    assert set(sizes.values()) == {n_jobs}, sizes  # all of them in one batch
    for i in range(n_jobs):
        solo = c.post(GEN, json={"prompt": f"p{i}", "seed": 100 + i, "num_inference_steps": 2}).json()
        batched = tools.decode_png(results[f"b{i}"].json()["data"][0]["b64_json"])
        assert abs(tools.decode_png(solo["data"][0]["b64_json"]) - batched).max() <= 1
