"""Fault injection against a live `vqdm serve`: each test drives a real server process into a fault
and asserts that every job it touched got exactly one reply (image, 4xx, 499, 503 or 504; never a
500, never silence) and that the server answers afterwards.

Faults a CPU cannot produce (CUDA out-of-memory, a sticky CUDA error, a hung kernel) are raised by
the test-only hook `vqdm.server.faults` inside the real code path, armed with VQDM_TEST_FAULTS=1
and asked for by a marker in the prompt. Every wait is on an event or a state, with generous
deadlines: these tests must pass with every core busy.

With VQDM_FAULT_REPORT=FILE set, each test appends one row of the fault table (docs/server.md) to
FILE: the fault, the jobs it touched, their replies by status, lost jobs, time to recovery.
"""
from __future__ import annotations

import collections
import datetime
import json
import os
import shutil
import signal
import threading
import time
import types

import httpx
import pytest

KEY = "fault-key-123456"
AUTH = {"Authorization": f"Bearer {KEY}"}
GEN = "/v1/images/generations"
FAULTS_ENV = {"VQDM_TEST_FAULTS": "1"}
CLIENT_TIMEOUT = 300  # far beyond any reply here: a client that hits it is a lost job


def report(fault: str, outcomes: list["Outcome"], recovery: str) -> None:
    """Append a fault-table row (VQDM_FAULT_REPORT) and check that no job was lost."""
    lost = [o for o in outcomes if o.status is None]
    assert not lost, f"{fault}: {len(lost)} job(s) got no reply: {[o.label for o in lost]}"
    path = os.environ.get("VQDM_FAULT_REPORT")
    if path:
        by_status = collections.Counter(o.status for o in outcomes)
        replies = ", ".join(f"{n}×{s}" for s, n in sorted(by_status.items()))
        with open(path, "a") as f:
            f.write(f"| {fault} | {len(outcomes)} | {replies} | {len(lost)} | {recovery} |\n")


class Outcome:
    """One client's request in a thread: exactly one final status (HTTP status, or a stream's
    terminal event), and every stream event seen. A client that walks away (`left`) reads no
    status: the test takes the server's own (`server_status`)."""

    def __init__(self, base: str, body: dict, label: str, stream: bool = False, leave_after_progress: bool = False):
        self.label, self.status, self.code, self.body, self.headers = label, None, None, None, {}
        self.left = False
        self.events: list[dict] = []
        self.terminal_events = 0
        self._args = (base, body, stream, leave_after_progress)
        self.thread = threading.Thread(target=self._go, daemon=True)
        self.thread.start()

    def _go(self) -> None:
        base, body, stream, leave = self._args
        headers = {**AUTH, "X-Request-Id": self.label}
        try:
            with httpx.Client(base_url=base, headers=headers, timeout=CLIENT_TIMEOUT) as c:
                if not stream:
                    r = c.post(GEN, json=body)
                    self.status, self.headers = r.status_code, r.headers
                    self.body = r.json()
                    self.code = self.body.get("error", {}).get("code") if r.status_code != 200 else None
                    return
                with c.stream("POST", GEN, json={**body, "stream": True, "stream_format": "vqdm"}) as r:
                    if r.status_code != 200:
                        self.status = r.status_code
                        self.code = json.loads(r.read())["error"]["code"]
                        return
                    for line in r.iter_lines():
                        if not line.startswith("data:"):
                            continue
                        event = json.loads(line[5:])
                        self.events.append(event)
                        if event["type"] == "image_generation.progress" and leave:
                            self.left = True
                            return
                        if event["type"] == "error":
                            self.terminal_events += 1
                            self.status, self.code = event["status"], event["error"]["code"]
                        elif event["type"] == "image_generation.completed":
                            self.terminal_events += 1
                            self.status = 200
        except httpx.TimeoutException:
            self.status = None  # lost: nothing answered within CLIENT_TIMEOUT

    def join(self) -> "Outcome":
        self.thread.join(CLIENT_TIMEOUT + 30)
        return self


def job(base: str, label: str) -> dict | None:
    r = httpx.get(f"{base}/v1/requests/{label}", headers=AUTH, timeout=30)
    return r.json() if r.status_code == 200 else None


def wait_for(predicate, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def server_status(server, label: str) -> int:
    """The status the server itself gave the request labelled `label`: its access-log line, written
    as the reply closes (for a stream, the stream's outcome)."""
    found: list[int] = []

    def check():
        try:
            records = server.log_records()
        except json.JSONDecodeError:
            return False  # read while a line was half written: read again
        found[:] = [r["status"] for r in records
                    if r.get("request_id") == label and r.get("path") == GEN and "status" in r]
        return bool(found)

    wait_for(check, f"the access line of {label}")
    assert len(found) == 1, found
    return found[0]


def metric(base: str, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(base + "/metrics", timeout=30).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def logged_at(record: dict) -> float:
    """A log record's time (its `ts`, UTC with milliseconds) as a Unix time."""
    return datetime.datetime.strptime(record["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=datetime.timezone.utc).timestamp()


def wait_state(base: str, label: str, states: set[str], min_step: int = 0) -> dict:
    found: dict = {}

    def check():
        info = job(base, label)
        if info and info["state"] in states and info["step"] >= min_step:
            found.update(info)
            return True
        return False

    wait_for(check, f"{label} to reach {states}")
    return found


def assert_answers_healthy(base: str) -> None:
    assert httpx.get(base + "/healthz", timeout=30).status_code == 200
    r = httpx.post(base + GEN, json={"prompt": "after the fault", "num_inference_steps": 1, "size": "64x64"},
                   headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text


def common(artifact) -> list[str]:
    # --max-steps: blockers run thousands of steps, so that they outlast any setup on a loaded machine.
    return ["--model", f"tiny={artifact}", "--api-key", KEY, "--max-side", "256", "--max-steps", "5000"]


def body(prompt: str, steps: int = 3, **extra) -> dict:
    return {"prompt": prompt, "num_inference_steps": steps, "size": "64x64", "seed": 7, **extra}


def start_blocker(base: str, label: str) -> Outcome:
    """A long job that holds the worker so that later jobs queue up together; cancelled by DELETE."""
    blocker = Outcome(base, body("blocker", steps=3000), label)
    wait_state(base, label, {"running"}, min_step=1)
    return blocker


def release_blocker(base: str, label: str) -> None:
    assert httpx.delete(f"{base}/v1/requests/{label}", headers=AUTH, timeout=30).status_code in (200, 202)


# -- recoverable faults: the server carries on -------------------------------------------------------
def test_oom_in_a_batch_splits_and_only_the_job_that_fails_alone_gets_503(tiny_artifact, live_server):
    s = live_server(common(tiny_artifact) + ["--max-batch-size", "4", "--max-queue-size", "8"], FAULTS_ENV).wait_ready()
    base, blocker_label = s.base, "oom-blocker"
    blocker = start_blocker(base, blocker_label)
    # Three compatible jobs queue behind it and run as one batch; one of them asks for an OOM at
    # step 2 (in the batch, and again when retried alone); one client streams.
    heavy = Outcome(base, body("heavy [fault:oom@2]"), "oom-heavy")
    light = Outcome(base, body("light one", seed=1), "oom-light-1")
    streamed = Outcome(base, body("light two", seed=2), "oom-light-2", stream=True)
    for label in ("oom-heavy", "oom-light-1", "oom-light-2"):
        wait_state(base, label, {"queued"})
    t_fault = time.monotonic()
    release_blocker(base, blocker_label)
    outcomes = [o.join() for o in (blocker, heavy, light, streamed)]
    recovered = time.monotonic() - t_fault
    assert blocker.status == 499
    assert heavy.status == 503 and heavy.code == "insufficient_memory"
    assert heavy.headers["x-should-retry"] == "false"
    assert "injected" not in heavy.body["error"]["message"] and "Error" not in heavy.body["error"]["message"]
    assert light.status == 200 and light.body["batch_size"] == 1  # retried alone after the batch's OOM
    assert streamed.status == 200 and streamed.terminal_events == 1
    records = s.log_records()
    assert any("retrying its 3 jobs one by one" in r["msg"] for r in records)
    traced = [r for r in records if "out of memory running request" in r["msg"]]
    assert traced and "OutOfMemoryError" in traced[0]["exc"] and heavy.body["error"]["message"]
    assert_answers_healthy(base)
    report("OOM at step 2 of a 3-job batch (one job also OOMs alone)", outcomes[1:],
           f"no restart; batch split and retried, {recovered:.1f}s to the last reply")

    # A bug in the pipeline, and one in the dispatcher after it: 503 with a short reason, trace in the log.
    t0 = time.monotonic()
    broken = Outcome(base, body("broken [fault:error@2]"), "pipeline-error").join()
    after = Outcome(base, body("after [fault:after-batch]"), "worker-error").join()
    for o, code in ((broken, "generation_failed"), (after, "generation_failed")):
        assert o.status == 503 and o.code == code, (o.label, o.status, o.body)
        assert "injected" not in o.body["error"]["message"]  # a short reason, no exception text
    records = s.log_records()
    assert any(r.get("exc") and "injected pipeline failure" in r["exc"] and broken.headers["x-vqdm-job-id"] in r["msg"]
               for r in records)
    assert any(r.get("exc") and "injected failure after the batch" in r["exc"] for r in records)
    assert_answers_healthy(base)
    report("exception in the pipeline (step 2)", [broken], f"no restart; {time.monotonic() - t0:.1f}s to reply")
    report("exception in the worker after the pipeline", [after], "no restart; the worker carries on")


def test_disconnects_and_a_burst_over_the_queue(tiny_artifact, live_server):
    s = live_server(common(tiny_artifact) + ["--max-batch-size", "2", "--max-queue-size", "3"], FAULTS_ENV).wait_ready()
    base = s.base
    # A streaming client walks away after the first progress event: its job is cancelled there, and
    # the server's own reply (its access line and counter, not the client's) is 499.
    cancelled_before = metric(base, "vqdm_requests_cancelled_total", stage="running")
    gone = Outcome(base, body("walk away", steps=150), "gone-stream", stream=True, leave_after_progress=True).join()
    assert gone.left and gone.status is None
    final = wait_state(base, "gone-stream", {"cancelled"})
    assert final["cancel_reason"] == "client_disconnected" and final["step"] < 150
    gone.status = server_status(s, "gone-stream")
    assert gone.status == 499
    assert metric(base, "vqdm_requests_total", status="499") == 1
    assert metric(base, "vqdm_requests_cancelled_total", stage="running") - cancelled_before == 1
    assert_answers_healthy(base)
    report("client disconnects mid-stream", [gone],
           f"no restart; cancelled at step {final['step']} of 150, the worker free for the next request")

    # Twelve at once against a queue of three: each gets an image or 429 + Retry-After, none is lost.
    t0 = time.monotonic()
    burst = [Outcome(base, body(f"burst {i}", seed=100 + i), f"burst-{i}") for i in range(12)]
    outcomes = [o.join() for o in burst]
    statuses = collections.Counter(o.status for o in outcomes)
    assert set(statuses) <= {200, 429} and statuses[429] >= 1 and statuses[200] >= 3, statuses
    for o in outcomes:
        if o.status == 429:
            assert int(o.headers["retry-after"]) >= 1
    assert_answers_healthy(base)
    report("burst of 12 over a queue of 3", outcomes, f"no restart; {time.monotonic() - t0:.1f}s to the last reply")


def test_hung_step_trips_the_watchdog(tiny_artifact, live_server):
    s = live_server(common(tiny_artifact) + ["--stall-timeout", "10", "--shutdown-timeout", "5"],
                    FAULTS_ENV).wait_ready()
    base = s.base
    hung = Outcome(base, body("hang [fault:hang@2]"), "hung", stream=True)
    wait_state(base, "hung", {"running"}, min_step=1)
    t_fault = time.monotonic()
    queued = [Outcome(base, body(f"waiting {i}", steps=2), f"behind-{i}") for i in range(2)]
    for o in queued:
        wait_for(lambda o=o: o.status is not None or (job(base, o.label) or {}).get("state") == "queued",
                 f"{o.label} queued")
    wait_for(lambda: httpx.get(base + "/healthz", timeout=30).status_code == 503, "/healthz 503")
    unhealthy_after = time.monotonic() - t_fault
    outcomes = [o.join() for o in [hung, *queued]]
    for o in outcomes:
        assert o.status == 503 and o.code == "worker_unhealthy", (o.label, o.status, o.code)
    assert hung.terminal_events == 1
    health = httpx.get(base + "/healthz", timeout=30)
    assert health.status_code == 503 and health.json() == {"status": "unhealthy", "code": "worker_unhealthy"}
    assert any("made no progress" in r["msg"] for r in s.log_records())  # the reason: in the log only
    assert httpx.get(base + "/readyz", timeout=30).status_code == 503
    refused = httpx.post(base + GEN, json=body("new"), headers=AUTH, timeout=30)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "worker_unhealthy"
    # The orchestrator now restarts it: SIGTERM ends the process although its worker thread is stuck.
    t_term = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    s.proc.wait(60)
    report("hung step (watchdog, stall timeout 10 s)", outcomes,
           f"/healthz 503 after {unhealthy_after:.1f}s; exit {time.monotonic() - t_term:.1f}s after SIGTERM → restart")


def test_sigterm_with_jobs_running_and_queued_finishes_them(tiny_artifact, live_server):
    s = live_server(common(tiny_artifact) + ["--max-batch-size", "1", "--shutdown-timeout", "240"]).wait_ready()
    base = s.base
    running = Outcome(base, body("running at sigterm", steps=200), "at-term-running")
    wait_state(base, "at-term-running", {"running"}, min_step=1)
    queued = Outcome(base, body("queued at sigterm", steps=5), "at-term-queued", stream=True)
    wait_state(base, "at-term-queued", {"queued"})
    t_term = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: httpx.get(base + "/readyz", timeout=30).status_code == 503, "/readyz 503 while draining")
    late = httpx.post(base + GEN, json=body("too late"), headers=AUTH, timeout=30)
    assert late.status_code == 503 and late.json()["error"]["code"] == "server_shutting_down"
    assert int(late.headers["retry-after"]) >= 1
    outcomes = [o.join() for o in (running, queued)]
    assert running.status == 200 and queued.status == 200 and queued.terminal_events == 1
    assert s.proc.wait(60) in (0, -signal.SIGTERM)
    assert "shut down" in [r["msg"] for r in s.log_records()]
    assert "Traceback" not in s.log() and "ASGI" not in s.log()
    report("SIGTERM with 1 running (200 steps) + 1 queued (drain 240 s)", outcomes,
           f"both finished; exit {time.monotonic() - t_term:.1f}s after SIGTERM")


def test_sigterm_past_the_drain_deadline_answers_503(tiny_artifact, live_server):
    drain_s = 3
    s = live_server(common(tiny_artifact) + ["--max-batch-size", "1", "--shutdown-timeout", str(drain_s),
                                             "--stall-timeout", "0"], FAULTS_ENV).wait_ready()
    base = s.base
    stuck = Outcome(base, body("never ends [fault:hang@2]"), "past-deadline-running", stream=True)
    wait_state(base, "past-deadline-running", {"running"}, min_step=1)
    queued = Outcome(base, body("queued behind it"), "past-deadline-queued")
    wait_state(base, "past-deadline-queued", {"queued"})
    t_term = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    outcomes = [o.join() for o in (stuck, queued)]
    for o in outcomes:
        assert o.status == 503 and o.code == "server_shutting_down", (o.label, o.status, o.code)
    code = s.proc.wait(60)
    took = time.monotonic() - t_term
    from vqdm.server.drain import grace_period_s

    assert code in (0, -signal.SIGTERM) and took < grace_period_s(drain_s)
    assert "Traceback" not in s.log()
    report(f"SIGTERM with a hung running job + 1 queued (drain {drain_s} s)", outcomes,
           f"503 at the deadline; exit {took:.1f}s after SIGTERM (bound {grace_period_s(drain_s)} s)")


def test_corrupt_or_padded_artifact_refuses_to_start(tiny_artifact, live_server, tmp_path):
    from vqdm.models.artifact import WEIGHTS_FILE

    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_artifact, corrupt)
    w = corrupt / WEIGHTS_FILE
    w.write_bytes(w.read_bytes()[:-64])
    padded = tmp_path / "padded"
    shutil.copytree(tiny_artifact, padded)
    (padded / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle?")
    for folder, needle in ((corrupt, "vqdm.safetensors: sha256 does not match"),
                           (padded, "diffusion_pytorch_model.bin: not listed in the manifest")):
        t0 = time.monotonic()
        s = live_server(["--model", f"bad={folder}", "--api-key", KEY])
        ready, refused = probe_until_exit(s)
        assert s.proc.wait(300) != 0
        assert needle in s.log(), s.log()[-3000:]
        # While it started and failed, it was never ready and accepted no generation.
        assert ready, "no /readyz probe was answered while the server started"
        assert set(ready) <= {(503, "not_ready"), (503, "load_failed")}, ready
        assert refused and {o.status for o in refused} == {503}, collections.Counter(o.status for o in refused)
        report(f"artifact at start: {folder.name}", refused,
               f"exit {s.proc.returncode} in {time.monotonic() - t0:.1f}s naming the file; /readyz 503 to all "
               f"{sum(ready.values())} probes, {len(refused)} generation requests refused")


def probe_until_exit(server) -> tuple[collections.Counter, list]:
    """Until the process exits: /readyz's answers ((status, code) counted), and one generation
    request per round (each a reply, or status None if the server took it and never answered)."""
    ready: collections.Counter = collections.Counter()
    refused = []
    with httpx.Client(base_url=server.base, headers=AUTH, timeout=CLIENT_TIMEOUT) as c:
        while server.proc.poll() is None:
            try:
                r = c.get("/readyz")
                ready[(r.status_code, r.json().get("error", {}).get("code"))] += 1
            except httpx.TransportError:
                pass  # not listening yet, or gone
            outcome = types.SimpleNamespace(label=f"during-start-{len(refused)}", status=None)
            try:
                outcome.status = c.post(GEN, json=body("too early")).status_code
                refused.append(outcome)
            except httpx.TimeoutException:
                refused.append(outcome)  # taken and never answered: a lost job
            except httpx.TransportError:
                pass
            time.sleep(0.25)
    return ready, refused


def test_sticky_cuda_error_marks_unhealthy(tiny_artifact, live_server):
    s = live_server(common(tiny_artifact) + ["--max-batch-size", "1"], FAULTS_ENV).wait_ready()
    base = s.base
    blocker = start_blocker(base, "cuda-blocker")
    poisoned = Outcome(base, body("poison [fault:cuda-error@2]"), "cuda-poisoned")
    wait_state(base, "cuda-poisoned", {"queued"})
    behind = Outcome(base, body("behind it", steps=2), "cuda-behind")
    wait_state(base, "cuda-behind", {"queued"})
    unhealthy_at: list[float] = []  # when /healthz first answered 503 (Unix time, as the log's)

    def watch_health():
        while not unhealthy_at:
            if httpx.get(base + "/healthz", timeout=30).status_code == 503:
                unhealthy_at.append(time.time())
            time.sleep(0.02)

    watcher = threading.Thread(target=watch_health, daemon=True)
    watcher.start()
    release_blocker(base, "cuda-blocker")
    outcomes = [o.join() for o in (poisoned, behind)]
    # At once: /healthz is 503 already when the poisoned job's client has its reply.
    health = httpx.get(base + "/healthz", timeout=30)
    assert health.status_code == 503 and health.json() == {"status": "unhealthy", "code": "worker_unhealthy"}
    watcher.join(CLIENT_TIMEOUT)
    assert blocker.join().status == 499
    for o in outcomes:
        assert o.status == 503 and o.code == "worker_unhealthy", (o.label, o.status, o.code)
        assert "CUDA" not in o.body["error"]["message"]
    errors = [r for r in s.log_records() if r.get("exc") and "illegal memory access" in r["exc"]]
    assert errors
    health_lag = unhealthy_at[0] - logged_at(errors[0])
    # New requests are refused from then on, and the server is not ready.
    new = [Outcome(base, body(f"after the error {i}"), f"cuda-new-{i}").join() for i in range(2)]
    for o in new:
        assert o.status == 503 and o.code == "worker_unhealthy", (o.label, o.status, o.code)
    assert httpx.get(base + "/readyz", timeout=30).status_code == 503
    report("sticky CUDA error at step 2 (+1 queued, then 2 new)", outcomes + new,
           f"/healthz 503 {health_lag:.2f}s after the error was logged; new requests refused → restart")
