"""deploy/compose.yaml: parses, and every file, port and path it names lines up with the repo, the
Dockerfile, the Prometheus config and the Grafana provisioning."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def interpolate(value: str) -> str:
    """Compose's ${VAR:-default} with no variables set: the defaults."""
    return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", value)


def dockerfile_expose() -> int:
    (port,) = re.findall(r"^EXPOSE\s+(\d+)", (REPO / "Dockerfile").read_text(), re.M)
    return int(port)


def binds(service: dict) -> list[tuple[Path, str, bool]]:
    """(host path, container path, read-only) for every bind mount, short or long syntax."""
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            if v["type"] == "bind":
                out.append((DEPLOY / interpolate(v["source"]), v["target"], bool(v.get("read_only"))))
        else:
            src, dst, *mode = interpolate(v).split(":")
            if src.startswith((".", "/")):
                out.append((DEPLOY / src, dst, "ro" in mode))
    return out


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_services_and_build(compose):
    assert set(compose["services"]) == {"vqdm", "prometheus", "grafana"}
    build = compose["services"]["vqdm"]["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert context == REPO and (context / build["dockerfile"]).is_file()
    assert build["args"]["CUDA"] == "", "the default compose image is the CPU one"
    for name in ("prometheus", "grafana"):
        image = compose["services"][name]["image"]
        assert re.search(r":v?\d+\.\d+\.\d+$", image), f"{name}: pin an exact image version, not {image}"


def test_every_bind_mount_exists_in_the_repo_and_is_read_only(compose):
    for name, service in compose["services"].items():
        for host, target, read_only in binds(service):
            assert host.exists(), f"{name}: mount source {host} is not in the repo"
            assert read_only, f"{name}: {host} -> {target} should be mounted read-only"


def test_vqdm_port_models_and_read_only_root(compose):
    vqdm = compose["services"]["vqdm"]
    port = dockerfile_expose()
    published = [interpolate(p).rsplit(":", 1)[-1] for p in vqdm["ports"]]
    assert published == [str(port)]
    assert vqdm["environment"]["VQDM_PORT"] == str(port)
    assert [t for _, t, _ in binds(vqdm)] == ["/models"], "artifacts at the image's documented path"
    assert vqdm["read_only"] is True and "/tmp" in vqdm["tmpfs"], "read-only root needs a writable /tmp"


def test_vqdm_environment_is_valid_server_settings(compose, server_settings):
    env = {k: interpolate(str(v)) for k, v in compose["services"]["vqdm"]["environment"].items()}
    settings = server_settings(env, "compose.yaml vqdm.environment")
    assert (settings.host, settings.port) == ("0.0.0.0", dockerfile_expose())
    assert settings.model_specs()[0].path is None and not settings.api_keys, "unset: embedded default, open"
    grace = re.fullmatch(r"(\d+)s", compose["services"]["vqdm"]["stop_grace_period"])
    from vqdm.server.drain import grace_period_s

    assert grace_period_s(settings.shutdown_timeout_s) <= int(grace.group(1)), "compose must not kill the drain"


def test_prometheus_scrapes_vqdm_and_loads_the_mounted_rules(compose):
    prom = compose["services"]["prometheus"]
    mounts = {target: host for host, target, _ in binds(prom)}
    (config_flag,) = [c for c in prom["command"] if c.startswith("--config.file=")]
    config_path = config_flag.split("=", 1)[1]
    config = yaml.safe_load(mounts[config_path].read_text())
    for rule_file in config["rule_files"]:
        in_container = str(Path(config_path).parent / rule_file)
        assert in_container in mounts, f"rule file {rule_file} is not mounted at {in_container}"
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "vqdm"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"vqdm:{dockerfile_expose()}"]


def test_grafana_reaches_prometheus_by_service_name(compose):
    cfg = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    url = cfg["datasources"][0]["url"]
    prom_ports = [interpolate(p).rsplit(":", 1)[-1] for p in compose["services"]["prometheus"]["ports"]]
    assert url == f"http://prometheus:{prom_ports[0]}"
    assert compose["services"]["grafana"]["environment"]["GF_SECURITY_ADMIN_USER"] == "admin"


def test_gpu_override_only_changes_the_vqdm_build_and_devices():
    gpu = yaml.safe_load((DEPLOY / "compose.gpu.yaml").read_text())
    assert set(gpu["services"]) == {"vqdm"}
    vqdm = gpu["services"]["vqdm"]
    cuda = vqdm["build"]["args"]["CUDA"]
    assert re.fullmatch(r"cu\d{3}", cuda) and vqdm["image"].endswith(f":{cuda}")
    (device,) = vqdm["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
