"""Grafana provisioning and the vqdm dashboard: valid JSON, every panel on the provisioned
datasource, every query valid PromQL (promtool) that reads only metrics the server exports, and
the panels the deployment promises are there."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

GRAFANA = Path(__file__).resolve().parents[2] / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "vqdm.json"


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dash: dict) -> list[dict]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # panels inside collapsed rows
    return [p for p in out if p.get("type") != "row"]


def exprs(dash: dict) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in panels(dash) for t in p.get("targets", [])]


def as_promql(expr: str) -> str:
    """Grafana's variables replaced by values Prometheus would see."""
    expr = expr.replace("$__rate_interval", "1m").replace("$__interval", "15s")
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def test_datasource_is_provisioned_with_the_uid_every_panel_uses(dashboard):
    cfg = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (ds,) = cfg["datasources"]
    assert ds["type"] == "prometheus" and ds["isDefault"]
    for p in panels(dashboard):
        assert p["datasource"] == {"type": "prometheus", "uid": ds["uid"]}, p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == ds["uid"], p["title"]
    for var in dashboard["templating"]["list"]:
        assert var["datasource"]["uid"] == ds["uid"]


def test_dashboard_layout_is_sane(dashboard):
    ps = panels(dashboard)
    assert dashboard["uid"] and dashboard["title"]
    ids = [p["id"] for p in ps]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    cells = set()
    for p in ps:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps another panel"
                cells.add((x, y))
        assert p["targets"], f"{p['title']} has no query"


def test_every_query_reads_only_exported_metrics(dashboard, promql_names, exported_metrics):
    for title, expr in exprs(dashboard):
        names = promql_names(expr)
        assert names, f"{title}: no metric found in {expr!r}"
        assert names <= exported_metrics, f"{title}: not exported by the server: {names - exported_metrics}"
    for var in dashboard["templating"]["list"]:
        m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["query"]["query"])
        assert m, var["query"]
        assert m.group(1) in exported_metrics, var["name"]


def test_every_query_is_valid_promql(dashboard, promtool, tmp_path):
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:panel_{i}", "expr": as_promql(e)} for i, (_, e) in enumerate(exprs(dashboard))]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promised_panels_are_present(dashboard, promql_names):
    by_title = {p["title"]: [t["expr"] for t in p["targets"]] for p in panels(dashboard)}
    read = {t: set().union(*(promql_names(e) for e in es)) for t, es in by_title.items()}

    def panel_reading(metric: str) -> list[str]:
        return [t for t, names in read.items() if metric in names]

    latency = [t for t in panel_reading("vqdm_request_duration_seconds_bucket") if len(by_title[t]) == 3]
    assert latency, "a latency panel with p50, p95 and p99"
    quantiles = {re.match(r"histogram_quantile\(([\d.]+)", e).group(1) for e in by_title[latency[0]]}
    assert quantiles == {"0.5", "0.95", "0.99"}
    for metric in ("vqdm_requests_total", "vqdm_queue_depth", "vqdm_in_flight_requests",
                   "vqdm_images_generated_total", "vqdm_errors_total", "vqdm_model_weight_bytes",
                   "process_resident_memory_bytes", "vqdm_process_peak_rss_bytes",
                   "vqdm_cuda_memory_allocated_bytes", "vqdm_cuda_memory_reserved_bytes",
                   "vqdm_queue_wait_seconds_bucket", "vqdm_denoise_step_duration_seconds_bucket"):
        assert panel_reading(metric), f"no panel shows {metric}"
    assert any("by (reason)" in e for t in panel_reading("vqdm_errors_total") for e in by_title[t])
    assert any("kind" in e and "by (model, kind)" in e
               for t in panel_reading("vqdm_model_weight_bytes") for e in by_title[t]), "stored vs dense"


def test_dashboard_provider_points_where_compose_mounts_the_json():
    cfg = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "vqdm.yml").read_text())
    (provider,) = cfg["providers"]
    compose = yaml.safe_load((GRAFANA.parent / "compose.yaml").read_text())
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"] if v.startswith("./"))
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    home = compose["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"
