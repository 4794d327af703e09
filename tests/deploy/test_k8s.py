"""deploy/k8s: every manifest parses, kustomize references resolve, the objects reference each
other, the image and the server consistently (ports, probe paths, user, labels, config map,
metric names), and each rendered variant (base, overlays/cpu, overlays/gpu) is valid against the
Kubernetes API schema."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from vqdm.server.drain import grace_period_s

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
# Oldest Kubernetes release we promise to work on (policy/v1 PDB, autoscaling/v2 HPA, sizeLimit).
KUBE_VERSION = "1.30"
VARIANTS = ("base", "overlays/cpu", "overlays/gpu")


def docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def by_kind(objs: list[dict]) -> dict[str, dict]:
    """{kind: object}; a second object of a kind (the peers' headless Service) as "Kind/name"."""
    out: dict[str, dict] = {}
    for o in objs:
        key = o["kind"] if o["kind"] not in out else f"{o['kind']}/{o['metadata']['name']}"
        assert key not in out, f"two {key} objects"
        out[key] = o
    return out


def base_objects() -> dict[str, dict]:
    kust = docs(K8S / "base" / "kustomization.yaml")[0]
    return by_kind([d for r in kust["resources"] for d in docs(K8S / "base" / r)])


def container(deployment: dict) -> dict:
    (c,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "vqdm"]
    return c


def dockerfile(pattern: str) -> str:
    (value,) = re.findall(pattern, (REPO / "Dockerfile").read_text(), re.M)
    return value


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict[str, dict]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not found: cannot render the kustomize variants (raw manifests are "
                    "checked by the other tests)")
    out = {}
    for variant in VARIANTS:
        proc = subprocess.run([kubectl, "kustomize", str(K8S / variant)], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, f"{variant}: {proc.stderr}"
        out[variant] = by_kind([d for d in yaml.safe_load_all(proc.stdout) if d])
    return out


def test_every_manifest_parses_and_names_itself():
    files = sorted(K8S.rglob("*.yaml"))
    assert len(files) >= 10
    for f in files:
        for d in docs(f):
            if isinstance(d, list):  # a JSON 6902 patch
                assert all({"op", "path"} <= set(op) for op in d), f
                continue
            if "apiVersion" in d:
                assert d.get("kind"), f
            if d.get("kind") not in (None, "Kustomization", "Component"):
                assert d["metadata"]["name"], f


def test_kustomize_references_resolve():
    for kust_file in K8S.rglob("kustomization.yaml"):
        here = kust_file.parent
        kust = docs(kust_file)[0]
        for ref in kust.get("resources", []):
            target = here / ref
            assert target.is_file() or (target / "kustomization.yaml").is_file(), f"{kust_file}: {ref}"
        for ref in kust.get("components", []):
            comp = docs(here / ref / "kustomization.yaml")[0]
            assert comp["kind"] == "Component", f"{kust_file}: {ref} is not a Component"
        for patch in kust.get("patches", []):
            assert (here / patch["path"]).is_file(), f"{kust_file}: {patch['path']}"


def test_deployment_matches_the_image_and_the_server():
    objs = base_objects()
    dep = objs["Deployment"]
    c = container(dep)
    pod = dep["spec"]["template"]
    (port,) = c["ports"]
    assert port["containerPort"] == int(dockerfile(r"^EXPOSE\s+(\d+)")), "container port = EXPOSE"
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port["containerPort"])
    assert pod["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    # The startup probe waits for the model load (/readyz); liveness is /healthz (503 when stuck).
    for probe, path in (("startupProbe", "/readyz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert c[probe]["httpGet"] == {"path": path, "port": port["name"]}, probe
    assert c["readinessProbe"]["periodSeconds"] < c["livenessProbe"]["periodSeconds"] * 2
    security = pod["spec"]["securityContext"]
    assert str(security["runAsUser"]) == dockerfile(r"^USER\s+(\d+)"), "same uid as the image's USER"
    assert security["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"] for v in pod["spec"]["volumes"]}
    assert "/tmp" in mounts and set(mounts.values()) <= volumes, "writable /tmp on a read-only root"
    res = c["resources"]
    assert {"cpu", "memory"} <= set(res["requests"]) and "memory" in res["limits"]
    env = {e["name"]: e for e in c["env"]}
    threads = env["VQDM_CPU_THREADS"]
    assert threads["valueFrom"]["resourceFieldRef"]["resource"] == "requests.cpu", "torch threads = CPU request"
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["VQDM_ADVERTISE_URL"]["value"] == f"http://$(POD_IP):{port['containerPort']}"
    (env_from,) = c["envFrom"]
    assert env_from["configMapRef"]["name"] == objs["ConfigMap"]["metadata"]["name"]
    assert objs["ConfigMap"]["data"]["VQDM_PORT"] == str(port["containerPort"])
    assert c["image"].split(":")[0] == "vqdm"


def test_service_pdb_and_hpa_select_the_deployment():
    objs = base_objects()
    dep = objs["Deployment"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    svc = objs["Service"]
    assert svc["spec"]["selector"].items() <= labels.items()
    (svc_port,) = svc["spec"]["ports"]
    assert svc_port["targetPort"] in {p["name"] for p in container(dep)["ports"]}
    pdb = objs["PodDisruptionBudget"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = objs["HorizontalPodAutoscaler"]
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", dep["metadata"]["name"])
    # The PDB must leave room to evict: it can only hold if more replicas run than it protects.
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"] <= dep["spec"]["replicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    # In-cluster Prometheus keeps exactly these pods.
    prom = yaml.safe_load((REPO / "deploy/prometheus/prometheus-k8s.yml").read_text())
    keep = next(r for j in prom["scrape_configs"] for r in j["relabel_configs"]
                if r["source_labels"] == ["__meta_kubernetes_pod_label_app_kubernetes_io_name"])
    assert re.fullmatch(keep["regex"], labels["app.kubernetes.io/name"])


def test_config_maps_are_valid_server_settings(server_settings):
    base = server_settings(base_objects()["ConfigMap"]["data"], "base ConfigMap")
    assert base.host == "0.0.0.0" and base.model_specs()[0].path is None
    (patch,) = docs(K8S / "components/models-pvc/patch-configmap.yaml")
    merged = {**base_objects()["ConfigMap"]["data"], **patch["data"]}
    specs = server_settings(merged, "models-pvc ConfigMap").model_specs()
    assert specs and all(str(s.path).startswith("/models/") for s in specs)
    # The queue-depth target is one batch per replica, and a full queue holds several batches.
    (op,) = docs(K8S / "components/queue-depth-hpa/patch-hpa.yaml")[0]
    target = float(op["value"][0]["pods"]["target"]["averageValue"])
    assert target == base.max_batch_size and target * 2 <= base.max_queue_size


def test_shutdown_fits_in_the_grace_period_in_every_variant(rendered, server_settings):
    """Kubernetes kills the pod at terminationGracePeriodSeconds, counted from the preStop hook's
    start: the server's own shutdown timeout must end before that, or in-flight work is lost."""
    for variant, objs in rendered.items():
        settings = server_settings(objs["ConfigMap"]["data"], f"{variant} ConfigMap")
        pod = objs["Deployment"]["spec"]["template"]["spec"]
        pre_stop = container(objs["Deployment"])["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep"
        budget = grace_period_s(settings.shutdown_timeout_s, float(pre_stop[1]))
        assert budget <= pod["terminationGracePeriodSeconds"], f"{variant}: {budget} s of shutdown"


def test_peers_reach_every_replica_by_the_advertised_port(server_settings):
    """VQDM_PEERS names the headless Service on the container port: the addresses it resolves to
    are the ones each replica advertises, so a job id's replica token matches one of them."""
    objs = base_objects()
    settings = server_settings(objs["ConfigMap"]["data"], "base ConfigMap")
    peers = objs["Service/vqdm-peers"]
    assert peers["spec"]["clusterIP"] == "None" and peers["spec"]["publishNotReadyAddresses"] is True
    assert peers["spec"]["selector"] == objs["Service"]["spec"]["selector"]
    (entry,) = settings.peers
    host, port = entry.removeprefix("dns:").rsplit(":", 1)
    assert host == peers["metadata"]["name"] and int(port) == peers["spec"]["ports"][0]["port"]
    port_no = container(objs["Deployment"])["ports"][0]["containerPort"]
    assert int(port) == port_no


def test_grace_periods_cover_the_drain_in_the_raw_manifests(server_settings):
    """Without kubectl: the base and the GPU component, each with its own drain timeout."""
    objs = base_objects()
    base = server_settings(objs["ConfigMap"]["data"], "base ConfigMap")
    pre_stop = float(container(objs["Deployment"])["lifecycle"]["preStop"]["exec"]["command"][1])
    grace = objs["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace_period_s(base.shutdown_timeout_s, pre_stop) <= grace
    gpu_cm = docs(K8S / "components/gpu/patch-configmap.yaml")[0]["data"]
    gpu = server_settings({**objs["ConfigMap"]["data"], **gpu_cm}, "gpu ConfigMap")
    gpu_grace = docs(K8S / "components/gpu/patch-deployment.yaml")[0]["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"]
    assert grace_period_s(gpu.shutdown_timeout_s, pre_stop) <= gpu_grace


def test_rendered_variants_are_valid_kubernetes_objects(rendered):
    kv = pytest.importorskip("kubernetes_validate", reason="`pip install kubernetes-validate` for schema checks")
    for variant, objs in rendered.items():
        for kind, obj in objs.items():
            try:
                kv.validate(obj, KUBE_VERSION, strict=True)
            except Exception as e:  # noqa: BLE001 - report which object failed and why
                pytest.fail(f"{variant}: {kind}/{obj['metadata']['name']}: {str(e).splitlines()[0]}")


def test_overlays_mount_artifacts_read_only_at_models(rendered):
    for variant in ("overlays/cpu", "overlays/gpu"):
        objs = rendered[variant]
        dep = objs["Deployment"]
        (mount,) = [m for m in container(dep)["volumeMounts"] if m["mountPath"] == "/models"]
        assert mount["readOnly"] is True
        (vol,) = [v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
        claim = vol["persistentVolumeClaim"]
        assert claim["readOnly"] is True and claim["claimName"] == objs["PersistentVolumeClaim"]["metadata"]["name"]
        models = objs["ConfigMap"]["data"]["VQDM_MODELS"]
        for entry in models.split(","):
            name, path = entry.split("=", 1)
            assert name and path.startswith("/models/"), entry
    assert "PersistentVolumeClaim" not in rendered["base"], "the base serves the embedded default"


def test_gpu_overlay_requests_a_gpu_runs_the_cuda_image_and_scales_on_queue_depth(rendered, exported_metrics):
    gpu, cpu = rendered["overlays/gpu"], rendered["overlays/cpu"]
    c = container(gpu["Deployment"])
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    compose_gpu = yaml.safe_load((REPO / "deploy/compose.gpu.yaml").read_text())
    assert c["image"] == f"vqdm:{compose_gpu['services']['vqdm']['build']['args']['CUDA']}"
    # Probes and ports are the base's, untouched by the patches.
    assert c["readinessProbe"] == container(cpu["Deployment"])["readinessProbe"]
    assert "nvidia.com/gpu" not in container(cpu["Deployment"])["resources"].get("limits", {})
    (metric,) = gpu["HorizontalPodAutoscaler"]["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    # The Prometheus adapter serves that name from a series the server exports.
    values = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    (rule,) = [r for r in values["rules"]["custom"] if r["name"]["as"] == name]
    series = re.match(r"(\w+)\{", rule["seriesQuery"]).group(1)
    assert series in exported_metrics
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    (cpu_metric,) = cpu["HorizontalPodAutoscaler"]["spec"]["metrics"]
    assert cpu_metric["type"] == "Resource"
