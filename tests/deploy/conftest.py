"""Shared pieces for the deploy tests: repo paths, YAML loading, promtool, the metric names a
PromQL expression reads, and the metric names the real server exports on a live /metrics."""
from __future__ import annotations

import json
import re
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"

# Words that look like metric names in PromQL but are not.
_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
                 "unless", "offset", "inf", "nan", "Inf", "NaN"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers outside strings, label matchers, ranges
    and label lists that are not functions, aggregations or keywords. Grafana's $variables may
    appear inside matchers and ranges, where they are dropped with them."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)                      # string literals
    s = re.sub(r"\{[^{}]*\}", " ", s)                                 # label matchers
    s = re.sub(r"\[[^\[\]]*\]", " ", s)                               # ranges, subqueries
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", s):
        if s[m.end():].lstrip().startswith("("):
            continue  # a function or an aggregation
        if m.group(0) not in _PROMQL_WORDS:
            names.add(m.group(0))
    return names


def load_yaml_docs(path: Path) -> list:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


@pytest.fixture(scope="session")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not found: install it (Debian: `apt-get install -y prometheus`) to check "
                    "the Prometheus config and rules")
    return path


@pytest.fixture(scope="session")
def promql_names():
    return promql_metric_names


# Series Prometheus itself adds to every scrape target; valid in any query against it.
SCRAPE_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(method: str, url: str, body: dict | None = None, timeout: float = 300.0) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture(scope="session")
def live_server(tmp_path_factory) -> str:
    """The real server (create_app + uvicorn on a free port) serving a tiny SDXL-architecture
    folder made by `vqdm.models.make_model`; yields its base URL once /readyz says ready, after one
    successful generation and one rejected request, so counters and histograms have series."""
    import uvicorn

    from vqdm.models.builders import make_model
    from vqdm.server.app import create_app
    from vqdm.server.settings import Settings

    folder = make_model("tiny-sdxl", tmp_path_factory.mktemp("deploy-live") / "tiny")
    port = free_port()
    settings = Settings(models=[f"tiny={folder}"], host="127.0.0.1", port=port)
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            status, body = http("GET", base + "/readyz", timeout=5)
        except (urllib.error.URLError, ConnectionError):
            status, body = 0, b""
        if status == 200:
            break
        assert thread.is_alive() and time.monotonic() < deadline, f"server not ready: {status} {body[:300]!r}"
        time.sleep(0.2)
    request = {"model": "tiny", "prompt": "a lighthouse at dusk", "size": "64x64", "n": 2, "num_inference_steps": 2}
    status, body = http("POST", base + "/v1/images/generations", request)
    assert status == 200, body[:500]
    status, _ = http("POST", base + "/v1/images/generations", {**request, "model": "no-such-model"})
    assert status == 400
    yield base
    server.should_exit = True
    thread.join(timeout=60)


@pytest.fixture(scope="session")
def exported_metrics(live_server) -> set[str]:
    """Every series name the live /metrics declares: the samples it has, plus the names a declared
    family will have once observed (a labelled counter with no children yet, e.g. cancellations,
    still has its HELP/TYPE lines)."""
    from prometheus_client.parser import text_string_to_metric_families

    status, body = http("GET", live_server + "/metrics")
    assert status == 200
    names = set(SCRAPE_SERIES)
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",),
                "summary": ("_sum", "_count", "")}
    for family in text_string_to_metric_families(body.decode()):
        names.update(s.name for s in family.samples)
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    return names


@pytest.fixture(scope="session")
def server_settings():
    """Build the server's Settings from exactly `env` (nothing else of the environment), after
    checking that every VQDM_* name is a real setting: the server ignores unknown ones, so a
    misspelt variable in a deploy file would otherwise be silently dropped."""
    import os
    from unittest import mock

    from vqdm.server.settings import Settings

    prefix = Settings.model_config["env_prefix"]

    def build(env: dict[str, str], where: str):
        for key in env:
            assert key.startswith(prefix), f"{where}: {key} is not a {prefix}* variable"
            field = key[len(prefix):].lower()
            assert field in Settings.model_fields, f"{where}: {key} is not a server setting"
        clean = {k: v for k, v in os.environ.items() if not k.startswith(prefix)}
        with mock.patch.dict(os.environ, {**clean, **{k: str(v) for k, v in env.items()}}, clear=True):
            return Settings()

    return build
