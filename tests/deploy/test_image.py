"""Build the CPU image, run it the way compose and k8s do (read-only root, /tmp as tmpfs, non-root)
and hit /healthz, then /readyz once the embedded default model is warm. Needs a container engine;
where `docker info` fails the test skips and says why."""
from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def docker_engine_problem() -> str | None:
    try:
        proc = subprocess.run(["docker", "info", "--format", "{{json .ServerVersion}}"],
                              capture_output=True, text=True, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired) as e:
        return f"docker client unusable: {e}"
    if proc.returncode != 0:
        return "no container engine: `docker info` failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1]
    return None


def get(url: str, timeout: float = 5.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0


@pytest.mark.timeout(3600)  # the first build downloads torch
def test_image_builds_runs_read_only_and_answers_healthz():
    problem = docker_engine_problem()
    if problem:
        pytest.skip(problem)
    tag = f"vqdm-test:{uuid.uuid4().hex[:8]}"
    name = f"vqdm-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(["docker", "build", "-t", tag, str(REPO)], check=True, timeout=3000)
    try:
        subprocess.run(["docker", "run", "-d", "--name", name, "--read-only", "--tmpfs", "/tmp",
                        "-p", "127.0.0.1::8000", "-v", f"{REPO / 'deploy' / 'models'}:/models:ro", tag],
                       check=True, capture_output=True, timeout=60)
        port = subprocess.run(["docker", "port", name, "8000/tcp"], check=True, capture_output=True,
                              text=True).stdout.split(":")[-1].strip()
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while get(base + "/healthz") != 200:
            state = json.loads(subprocess.run(["docker", "inspect", "--format", "{{json .State}}", name],
                                              capture_output=True, text=True).stdout)
            assert state["Running"], subprocess.run(["docker", "logs", name], capture_output=True, text=True).stderr
            assert time.monotonic() < deadline, "no /healthz within 5 minutes"
            time.sleep(2)
        while get(base + "/readyz") != 200:
            assert time.monotonic() < deadline, "embedded default not ready within 5 minutes"
            time.sleep(2)
        user = subprocess.run(["docker", "exec", name, "id", "-u"], capture_output=True, text=True).stdout.strip()
        assert user == "10001"
        # The image's own HEALTHCHECK turns healthy too (its interval is 15 s).
        while True:
            health = subprocess.run(["docker", "inspect", "--format", "{{.State.Health.Status}}", name],
                                    capture_output=True, text=True).stdout.strip()
            if health == "healthy":
                break
            assert health == "starting" and time.monotonic() < deadline, f"container health: {health!r}"
            time.sleep(3)
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True)
