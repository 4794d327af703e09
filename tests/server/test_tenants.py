"""Tenants: job ids are the server's; X-Request-Id is a per-key label. Two keys may use the same
label at once, neither can see, cancel or collide with the other's job, and the 409 for a label in
use only ever concerns the caller's own jobs."""
from __future__ import annotations

import threading
import time

GEN = "/v1/images/generations"
K1, K2 = {"Authorization": "Bearer tenant-key-one"}, {"Authorization": "Bearer tenant-key-two"}


def _wait_running(c, label, headers):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r = c.get(f"/v1/requests/{label}", headers=headers)
        if r.status_code == 200 and r.json()["state"] == "running" and r.json()["step"] > 0:
            return r.json()
        time.sleep(0.02)
    raise AssertionError(c.get(f"/v1/requests/{label}", headers=headers).text)


def test_same_label_two_keys(make_client):
    c = make_client(api_keys=["tenant-key-one", "tenant-key-two"], max_steps=5000)
    results = {}

    def post(name, body, headers):
        results[name] = c.post(GEN, json=body, headers=headers)

    t1 = threading.Thread(target=post, args=("k1", {"prompt": "long", "num_inference_steps": 3000},
                                             {**K1, "X-Request-Id": "shared"}))
    t1.start()
    mine = _wait_running(c, "shared", K1)
    # Key 2 uses the same label while key 1's job runs: accepted and queued (no 409 revealing key 1's label).
    t2 = threading.Thread(target=post, args=("k2", {"prompt": "short", "num_inference_steps": 1},
                                             {**K2, "X-Request-Id": "shared"}))
    t2.start()
    deadline = time.monotonic() + 60
    while (r := c.get("/v1/requests/shared", headers=K2)).status_code != 200:
        assert time.monotonic() < deadline and "k2" not in results, results.get("k2") and results["k2"].text
        time.sleep(0.02)
    theirs = r.json()
    assert theirs["state"] == "queued" and theirs["id"] != mine["id"] and theirs["label"] == "shared"
    # Each key's label finds its own job; neither can see or cancel the other's, by label or by id.
    assert c.get("/v1/requests/shared", headers=K1).json()["id"] == mine["id"]
    for ref, headers in ((mine["id"], K2), (theirs["id"], K1)):
        assert c.get(f"/v1/requests/{ref}", headers=headers).status_code == 404
        assert c.delete(f"/v1/requests/{ref}", headers=headers).status_code == 404
    # Key 1 reusing its own live label is a 409 about its own job.
    dup = c.post(GEN, json={"prompt": "x"}, headers={**K1, "X-Request-Id": "shared"})
    assert dup.status_code == 409 and dup.json()["error"]["code"] == "duplicate_request_id"
    assert c.delete("/v1/requests/shared", headers=K2).status_code == 200  # queued: dropped at once
    assert c.delete("/v1/requests/shared", headers=K1).status_code in (200, 202)
    t1.join(60)
    t2.join(60)
    assert results["k1"].status_code == 499 and results["k1"].headers["x-request-id"] == "shared"
    assert results["k2"].status_code == 499


def test_vae_decodes_in_slices_and_tiles(served_models):
    for model in served_models:
        vae = model.replicas["cpu"].pipe.vae
        assert vae.use_slicing and vae.use_tiling, model.id
