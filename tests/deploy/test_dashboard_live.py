"""The acceptance story end to end, minus the containers: a real Prometheus loads the compose
config and alert rules, scrapes the real server while it serves a few requests, and then every
dashboard panel's queries return data, as Grafana would show them. Needs the `prometheus` binary
(Debian: `apt-get install prometheus`); skips and says so where it is absent."""
from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SCRAPE_S = 1


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def post(url: str, body: dict) -> int:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


@pytest.fixture
def prometheus(live_server, tmp_path):
    """Prometheus running deploy/prometheus/prometheus.yml and alerts.yml, with the vqdm target
    pointed at the live server and 1 s scrape and evaluation intervals."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus binary not found (Debian: `apt-get install -y prometheus`); the dashboard's "
                    "queries were still checked against the live /metrics by test_grafana.py")
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval=f"{SCRAPE_S}s", evaluation_interval=f"{SCRAPE_S}s")
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "vqdm"]
    job["static_configs"] = [{"targets": [live_server.removeprefix("http://")]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    for rule_file in config["rule_files"]:
        shutil.copy(DEPLOY / "prometheus" / rule_file, tmp_path / rule_file)
    port = free_port()
    proc = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        try:
            return urllib.request.urlopen(base + "/-/ready", timeout=2).status == 200
        except OSError:
            return False

    try:
        wait_for(ready, "Prometheus to start")
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def query(prom: str, expr: str) -> list[dict]:
    body = get_json(f"{prom}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")
    assert body["status"] == "success", body
    return body["data"]["result"]


def as_promql(expr: str) -> str:
    # Grafana's $__rate_interval becomes a window spanning the whole test; $instance / $model: All.
    return expr.replace("$__rate_interval", "2m").replace('"$instance"', '".*"').replace('"$model"', '".*"')


def finite_values(result: list[dict]) -> list[float]:
    return [float(r["value"][1]) for r in result if math.isfinite(float(r["value"][1]))]


@pytest.mark.timeout(600)
def test_dashboard_panels_fill_in_after_a_few_requests(prometheus, live_server, promql_names):
    def scraped_ok() -> bool:
        return [float(r["value"][1]) for r in query(prometheus, 'up{job="vqdm"}')] == [1.0]

    def scrapes_stored() -> int:
        return int(sum(float(r["value"][1]) for r in query(prometheus, 'count_over_time(up{job="vqdm"}[10m])')))

    def rejected_on_tiny() -> list[float]:
        return [float(r["value"][1]) for r in query(prometheus, 'vqdm_requests_total{status="400"}')
                if r["metric"]["model"] == "tiny"]

    def stored_images() -> float:
        return sum(float(r["value"][1]) for r in query(prometheus, "vqdm_images_generated_total"))

    wait_for(scraped_ok, "the first scrape of the live server")
    # A baseline sample before the traffic, so that rate() and increase() see it: two stored scrapes.
    wait_for(lambda: scrapes_stored() >= 2, "two scrapes before the traffic")
    baseline = stored_images()
    request = {"model": "tiny", "prompt": "a lighthouse at dusk", "size": "64x64", "n": 2, "num_inference_steps": 2}
    assert post(live_server + "/v1/images/generations", request) == 200
    assert post(live_server + "/v1/images/generations", {**request, "seed": 7, "n": 1}) == 200
    assert post(live_server + "/v1/images/generations", {**request, "size": "65x64"}) == 400
    # Prometheus has stored a scrape taken after the traffic (the 400 is counted as its reply
    # closes): the images counter moved by 2 + 1, and the one 400 is there.
    wait_for(lambda: stored_images() == baseline + 3 and rejected_on_tiny() == [1.0], "a scrape after the traffic")

    with urllib.request.urlopen(live_server + "/metrics", timeout=30) as r:
        from prometheus_client.parser import text_string_to_metric_families

        with_series = {s.name for f in text_string_to_metric_families(r.read().decode()) for s in f.samples}
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "vqdm.json").read_text())
    empty = []
    for panel in dashboard["panels"]:
        exprs = [t["expr"] for t in panel["targets"]]
        values = [v for e in exprs for v in finite_values(query(prometheus, as_promql(e)))]
        if not values:
            empty.append(panel["title"])
            read = set().union(*(promql_names(e) for e in exprs))
            # Only a panel whose every metric has no series yet may be empty (nothing was
            # cancelled in this run, so the cancellations counter has no children).
            assert not read & with_series, f"{panel['title']}: no data although {read & with_series} has series"
    assert empty == ["Cancelled requests by stage"], empty

    # Spot-check numbers against what was sent: 2 + 1 images, one 400, batch sizes 2 and 1.
    images = query(prometheus, 'sum(increase(vqdm_images_generated_total[2m]))')
    assert 2.0 <= float(images[0]["value"][1]) <= 4.5  # increase() extrapolates to the window edges
    assert rejected_on_tiny() == [1.0]

    # The alert rules loaded and evaluate cleanly against real series.
    def rules_evaluated() -> bool:
        groups = get_json(prometheus + "/api/v1/rules")["data"]["groups"]
        return bool(groups) and all(r.get("lastEvaluation", "").startswith("20") for g in groups for r in g["rules"])

    wait_for(rules_evaluated, "alert rules to be evaluated")
    for group in get_json(prometheus + "/api/v1/rules")["data"]["groups"]:
        for rule in group["rules"]:
            assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
