"""Two live replicas as behind the Kubernetes Service: a job runs on one, and status and cancel
work through either (the job id names its replica; the other forwards), by id or by the client's
label, and only with the key that submitted it; an image link (response_format url) made by one
is fetched through the other, from the folder they share."""
from __future__ import annotations

import json
import threading
import time

import httpx

KEYS = ("tenant-one-key-1", "tenant-two-key-2")
GEN = "/v1/images/generations"


def auth(i: int) -> dict:
    return {"Authorization": f"Bearer {KEYS[i]}"}


def test_status_and_cancel_through_either_replica(tiny_artifact, live_server, tmp_path):
    ports = [live_server.free_port(), live_server.free_port()]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    servers = []
    for i in range(2):
        args = ["--model", f"tiny={tiny_artifact}", "--max-side", "256", "--max-steps", "5000", "--advertise-url", urls[i],
                "--peer", urls[0], "--peer", urls[1],  # the same list everywhere, as from one ConfigMap
                "--image-store-dir", str(tmp_path / "images")]
        for key in KEYS:
            args += ["--api-key", key]
        servers.append(live_server(args, port=ports[i]))
    a, b = (s.wait_ready() for s in servers)

    # An image link made by A works through B (the shared folder), with no key: the id is the credential.
    made = httpx.post(f"{a.base}{GEN}", headers=auth(0), timeout=60, json={
        "prompt": "x", "size": "64x64", "num_inference_steps": 1, "response_format": "url"})
    link = made.json()["data"][0]["url"]
    assert link.startswith(a.base + "/v1/files/file-"), made.text
    through_b = httpx.get(link.replace(a.base, b.base), timeout=30)
    assert through_b.status_code == 200 and through_b.content == httpx.get(link, timeout=30).content
    assert through_b.content.startswith(b"\x89PNG")

    first = _Job(a.base, "my-label")
    from vqdm.server.replicas import replica_token, token_of

    assert token_of(first.id) == replica_token(urls[0])  # the id names replica A

    # Status through B: by id (routed to A by the id's token) and by label (asked of every peer).
    for ref in (first.id, "my-label"):
        r = httpx.get(f"{b.base}/v1/requests/{ref}", headers=auth(0), timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["id"] == first.id and r.json()["state"] == "running" and r.json()["label"] == "my-label"
    # Another tenant sees nothing, on either replica, by id or label.
    for base in (a.base, b.base):
        for ref in (first.id, "my-label"):
            assert httpx.get(f"{base}/v1/requests/{ref}", headers=auth(1), timeout=30).status_code == 404
            assert httpx.delete(f"{base}/v1/requests/{ref}", headers=auth(1), timeout=30).status_code == 404
    # An id naming no configured replica is a 404, and nothing is contacted for it.
    stranger = "req_0badf00d_" + "0" * 32
    assert httpx.get(f"{b.base}/v1/requests/{stranger}", headers=auth(0), timeout=30).status_code == 404

    # Cancel by id and by label, through the owner A and through B: each time A stops the running
    # job, its client gets the 499 event, and A itself reports it cancelled.
    for i, (via, by) in enumerate((v, k) for v in (a, b) for k in ("id", "label")):
        job = first if i == 0 else _Job(a.base, f"label-{i}")
        ref = job.id if by == "id" else job.label
        r = httpx.delete(f"{via.base}/v1/requests/{ref}", headers=auth(0), timeout=30)
        assert r.status_code in (200, 202) and r.json()["id"] == job.id, (via.base, by, r.text)
        job.thread.join(120)
        assert job.events[-1]["type"] == "error" and job.events[-1]["status"] == 499, (via.base, by, job.events[-1])
        final = httpx.get(f"{a.base}/v1/requests/{job.id}", headers=auth(0), timeout=30).json()
        assert final["state"] == "cancelled" and final["cancel_reason"] == "deleted", (via.base, by, final)
    final = httpx.get(f"{b.base}/v1/requests/label-3", headers=auth(0), timeout=30).json()
    assert final["state"] == "cancelled"  # and B, asked by label, tells the same
    forwarded = [r for r in b.log_records() if r.get("path", "").startswith("/v1/requests/")]
    assert forwarded and all(r["status"] in (200, 202, 404) for r in forwarded)


class _Job:
    """A long streamed generation on `base` under the client label `label`, running once built."""

    def __init__(self, base: str, label: str) -> None:
        self.label, self.events = label, []
        self.thread = threading.Thread(target=_stream, args=(base, label, self.events), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 120
        while not any(e["type"] == "image_generation.progress" for e in self.events):
            assert time.monotonic() < deadline and self.thread.is_alive(), self.events
            time.sleep(0.05)
        self.id = self.events[0]["id"]


def _stream(base: str, label: str, events: list) -> None:
    with httpx.Client(base_url=base, headers={**auth(0), "X-Request-Id": label}, timeout=300) as c:
        with c.stream("POST", GEN, json={"prompt": "long", "num_inference_steps": 3000, "size": "64x64",
                                         "stream": True, "stream_format": "vqdm"}) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    events.append(json.loads(line[5:]))
                    if events[-1]["type"] in ("error", "image_generation.completed"):
                        return
