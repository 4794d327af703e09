"""Issue 26's cancel flood against a live `vqdm serve` (the embedded default): the worker held by one
hung job (the test-only fault hook), 20 edits of 2048² whose clients give up after 0.4 s. Every
one of them is forgotten after `job_retention_s` (404 by id and by label), and the server's
resident memory comes back to within 50 MB of where it started."""
from __future__ import annotations

import io
import re
import threading
import time

import httpx
import numpy as np

SIDE = 2048
EDITS = 20
CLIENT_TIMEOUT_S = 0.4
RETENTION_S = 1
RSS_SLACK_MB = 50
DEADLINE_S = 120  # every wait polls for its event; generous for a loaded machine


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 1024


def wait_for(predicate, what: str, timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def edits_answered(base: str) -> float:
    """POST /v1/images/generations and /edits answered so far, by any status (vqdm_requests_total)."""
    text = httpx.get(base + "/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("vqdm_requests_total{"))


def big_png() -> bytes:
    """A 2048² gradient: 12 MB of pixels once decoded, a small upload."""
    from PIL import Image

    ramp = np.linspace(0, 255, SIDE, dtype=np.uint8)
    img = np.stack([np.broadcast_to(ramp, (SIDE, SIDE)), np.broadcast_to(ramp[:, None], (SIDE, SIDE)),
                    np.full((SIDE, SIDE), 90, np.uint8)], -1)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def test_cancelled_queued_edits_are_forgotten_and_their_memory_returned(live_server):
    env = {"VQDM_TEST_FAULTS": "1", "VQDM_JOB_RETENTION_S": str(RETENTION_S)}
    # --size-policy any: the edits queue at 2048², as asked (nearest would draw the 32² default at 32²).
    s = live_server(["--no-warmup", "--stall-timeout", "0", "--shutdown-timeout", "0", "--size-policy", "any"],
                    env).wait_ready()
    base = s.base
    png = big_png()

    # One generation hangs at its first step (until the server exits): every edit after it waits.
    threading.Thread(target=lambda: httpx.post(base + "/v1/images/generations", timeout=DEADLINE_S * 5, json={
        "prompt": "[fault:hang@1]", "size": "64x64", "num_inference_steps": 2}, headers={"X-Request-Id": "blocker"}),
                     daemon=True).start()
    wait_for(lambda: httpx.get(base + "/v1/requests/blocker", timeout=30).json().get("state") == "running",
             "the blocker to run")
    baseline = rss_mb(s.proc.pid)
    answered = edits_answered(base)

    def edit(i: int) -> None:
        try:
            httpx.post(base + "/v1/images/edits", timeout=CLIENT_TIMEOUT_S, headers={"X-Request-Id": f"flood-{i}"},
                       files={"image": ("big.png", png, "image/png")},
                       data={"prompt": "a red door", "size": f"{SIDE}x{SIDE}", "num_inference_steps": "2"})
        except httpx.TimeoutException:
            pass  # the client gives up; the server cancels its queued job

    clients = [threading.Thread(target=edit, args=(i,)) for i in range(EDITS)]
    for t in clients:
        t.start()
    for t in clients:
        t.join(DEADLINE_S)
    wait_for(lambda: edits_answered(base) >= answered + EDITS, f"the server to answer all {EDITS} edits")
    peak = rss_mb(s.proc.pid)
    cancelled = [m.group(1) for r in s.log_records()
                 if (m := re.match(r"request (\S+) cancelled \(client_disconnected, while queued\)", r["msg"]))]
    assert len(cancelled) >= EDITS // 2, f"only {len(cancelled)} edits were queued and cancelled"

    def gone(ref: str) -> bool:
        return httpx.get(f"{base}/v1/requests/{ref}", timeout=30).status_code == 404

    refs = cancelled + [f"flood-{i}" for i in range(EDITS)]
    wait_for(lambda: all(gone(ref) for ref in refs), f"every cancelled edit to be forgotten after {RETENTION_S}s",
             timeout=30)
    wait_for(lambda: rss_mb(s.proc.pid) <= baseline + RSS_SLACK_MB,
             f"RSS back within {RSS_SLACK_MB} MB of its baseline {baseline:.0f} MB (peak {peak:.0f} MB)", timeout=30)
    assert httpx.get(base + "/v1/requests/blocker", timeout=30).json()["state"] == "running"
