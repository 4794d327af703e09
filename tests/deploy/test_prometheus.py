"""Prometheus config and alert rules: promtool accepts them, the alert unit tests (which show each
alert firing and staying quiet) pass, and every metric an alert reads is one the server exports."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

PROM = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def test_compose_prometheus_config_and_its_rule_files_pass_promtool(promtool):
    proc = run(promtool, "check", "config", str(PROM / "prometheus.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 rule files found" in proc.stdout + proc.stderr  # alerts.yml was found and checked


def test_alert_rules_pass_promtool_with_every_lint_fatal(promtool):
    proc = run(promtool, "check", "rules", "--lint=all", "--lint-fatal", str(PROM / "alerts.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_alert_rule_unit_tests_pass(promtool):
    proc = run(promtool, "test", "rules", str(PROM / "alerts.test.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_has_a_unit_test_that_fires_it():
    rules = yaml.safe_load((PROM / "alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    tests = yaml.safe_load((PROM / "alerts.test.yml").read_text())
    fired = {case["alertname"] for t in tests["tests"] for case in t["alert_rule_test"] if case["exp_alerts"]}
    assert alerts == fired, f"alerts with no firing test: {alerts - fired}"
    # The three families the deployment promises: queue saturation, errors, latency.
    assert {"VQDMQueueFull", "VQDMHighErrorRate", "VQDMHighLatency"} <= alerts


def test_alerts_read_only_exported_metrics(promql_names, exported_metrics):
    rules = yaml.safe_load((PROM / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            unknown = promql_names(rule["expr"]) - exported_metrics
            assert not unknown, f"{rule['alert']} reads metrics the server does not export: {unknown}"


def test_kubernetes_prometheus_config(promtool):
    """The in-cluster config keeps `namespace` and `pod` labels: the Prometheus adapter maps them
    to the objects the queue-depth HPA scales."""
    cfg = yaml.safe_load((PROM / "prometheus-k8s.yml").read_text())
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "vqdm"]
    targets = {r.get("target_label") for r in job["relabel_configs"]}
    assert {"namespace", "pod", "__metrics_path__", "__address__"} <= targets
    proc = run(promtool, "check", "config", str(PROM / "prometheus-k8s.yml"))
    if "kubernetes_sd_configs not found" in proc.stdout + proc.stderr:
        pytest.skip("this promtool was built without Kubernetes service discovery (Debian's is); "
                    "the config's structure was checked above")
    assert proc.returncode == 0, proc.stdout + proc.stderr
