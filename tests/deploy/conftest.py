"""Shared pieces for the deploy tests: repo paths, YAML loading, promtool, the metric names a
PromQL expression reads, and the metric names the real server exports on a live /metrics."""
from __future__ import annotations

import re
import shutil
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

# INTERIM until vqdm.server lands: the metric contract agreed with the server (SPEC §9).
_AGREED = {
    "counter": ["vqdm_requests_total", "vqdm_images_generated_total", "vqdm_errors_total",
                "vqdm_requests_cancelled_total"],
    "histogram": ["vqdm_request_duration_seconds", "vqdm_queue_wait_seconds",
                  "vqdm_denoise_step_duration_seconds", "vqdm_vae_decode_duration_seconds",
                  "vqdm_weight_decode_duration_seconds", "vqdm_batch_size"],
    "gauge": ["vqdm_queue_depth", "vqdm_in_flight_requests", "vqdm_model_weight_bytes",
              "vqdm_process_peak_rss_bytes", "vqdm_cuda_memory_allocated_bytes",
              "vqdm_cuda_memory_reserved_bytes", "vqdm_cuda_memory_peak_bytes", "vqdm_build_info",
              "vqdm_ready", "process_resident_memory_bytes"],
}


@pytest.fixture(scope="session")
def exported_metrics() -> set[str]:
    names = set(SCRAPE_SERIES)
    names.update(_AGREED["counter"] + _AGREED["gauge"])
    names.update(f"{h}{s}" for h in _AGREED["histogram"] for s in ("_bucket", "_sum", "_count"))
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
