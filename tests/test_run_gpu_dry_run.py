"""benchmarks/run_gpu.sh on the CPU (DRY_RUN=1): every step the GPU run takes, on tiny models, writes
the summary's keys marked "cpu-dry-run"; a step stopped by its time limit leaves the results before
it and a null with the reason; an unknown target is a usage error."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = "benchmarks/run_gpu.sh"
KEYS = ("device", "commit", "unet_graph_ratio_sdxl_1024", "unet_graph_ratio_turbo_512", "served_ratio_turbo_512",
        "served_ratio_sdxl_1024", "served_speedup_vs_eager")
FIGURES = KEYS[2:]
FILES = ("gpu_preflight.txt", "gpu_run.log", "gpu_layers.json", "gpu_unet_turbo_512.json", "gpu_unet_sdxl_1024.json",
         "gpu_served.json", "gpu_summary.json")


def run_script(*args: str, out: Path, work: Path, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("VQDM_", "T_", "OUT"))}
    full.update(DRY_RUN="1", PYTHON=sys.executable, WORK=str(work), **env)
    full.pop("PYTEST_XDIST_WORKER", None)
    return subprocess.run(["bash", SCRIPT, *args, str(out)], cwd=REPO, env=full, capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out, work = tmp_path_factory.mktemp("gpu_out"), tmp_path_factory.mktemp("gpu_work")
    t0 = time.perf_counter()
    proc = run_script("all", out=out, work=work)
    seconds = time.perf_counter() - t0
    print(f"dry run of `run_gpu.sh all`: {seconds:.1f}s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, work, json.loads((out / "gpu_summary.json").read_text())


def test_dry_run_writes_every_file_and_figure(dry_run):
    out, _, summary = dry_run
    assert [f for f in FILES if not (out / f).is_file()] == []
    assert summary["device"] == "cpu-dry-run"
    assert summary["commit"] and summary["commit"] != "unknown"
    missing = {k: summary.get(f"{k}_reason") for k in FIGURES if summary.get(k) is None}
    assert missing == {}
    assert all(summary[k] > 0 and summary[f"{k}_how"] for k in FIGURES)
    assert {s["status"] for s in summary["steps"].values()} == {"ok"}
    assert set(summary["steps"]) == {"tests", "layers", "unet_turbo_512", "unet_sdxl_1024", "served"}
    preflight = (out / "gpu_preflight.txt").read_text()
    assert "vqdm imports ok" in preflight and "diffusers" in preflight


def test_dry_run_went_through_compiled_serving(dry_run):
    out, _, _ = dry_run
    served = json.loads((out / "gpu_served.json").read_text())
    compiled = served["servers"][served["config"]["compile"]]
    assert compiled["mode"] != "off"
    # The compiled server's requests ran the compiled U-Nets: none fell back to eager.
    steps = {k: v for k, v in compiled["compiled_steps"].items() if v}
    assert steps and all("fallback=none" in k for k in steps), compiled["compiled_steps"]
    assert all(not v["errors"] for k, v in compiled.items() if k.endswith(("-vq", "-dense")))
    unet = json.loads((out / "gpu_unet_sdxl_1024.json").read_text())
    ratios = unet["compile"]["fp32"]["ratios"]
    assert all(v is not None for v in ratios.values()), unet["compile"]["fp32"]


def test_a_step_stopped_by_its_time_limit_keeps_the_steps_before_it(dry_run, tmp_path):
    first, work, before = dry_run
    out = tmp_path / "out"
    shutil.copytree(first, out)
    proc = run_script("served", out=out, work=work, T_SERVED="1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "gpu_summary.json").read_text())
    assert summary["steps"]["served"]["status"] == "timeout"
    for key in ("served_ratio_turbo_512", "served_ratio_sdxl_1024", "served_speedup_vs_eager"):
        assert summary[key] is None
        assert summary[f"{key}_reason"] == "step served timed out after 1.0 s"
    # The U-Net figures from the earlier steps stay, with their files.
    for key in ("unet_graph_ratio_sdxl_1024", "unet_graph_ratio_turbo_512"):
        assert summary[key] == before[key]
    assert (out / "gpu_unet_sdxl_1024.json").is_file() and not (out / "gpu_served.json").exists()


def test_unknown_target_is_a_usage_error(tmp_path):
    proc = run_script("unet-sdxl", out=tmp_path, work=tmp_path)
    assert proc.returncode == 2
    assert "unknown target 'unet-sdxl'" in proc.stderr and "usage: bash benchmarks/run_gpu.sh" in proc.stderr
    assert list(tmp_path.iterdir()) == []  # nothing run, nothing written


def test_sdxl_not_served_for_lack_of_time_is_null_with_the_reason(dry_run, tmp_path):
    # What a GPU run writes when SDXL 1024² did not fit in the budget: gpu_served.json with Turbo only.
    first, _, _ = dry_run
    served = json.loads((first / "gpu_served.json").read_text())
    for part in (served["config"]["pairs"], served["pairs"]):
        part.pop("sdxl_1024")
    (tmp_path / "gpu_served.json").write_text(json.dumps(served))
    subprocess.run([sys.executable, "benchmarks/gpu_summary.py", str(tmp_path), "--device", "cpu-dry-run"], cwd=REPO,
                   check=True)
    summary = json.loads((tmp_path / "gpu_summary.json").read_text())
    assert summary["served_ratio_sdxl_1024"] is None
    assert "SDXL 1024² not served: it did not fit in the time budget" in summary["served_ratio_sdxl_1024_reason"]
    assert summary["served_ratio_turbo_512"] == served["pairs"]["turbo_512"]["served_ratio"]
    assert summary["served_speedup_vs_eager"] == served["pairs"]["turbo_512"]["speedup_vs_eager_vq"]
    assert summary["served_speedup_vs_eager_how"].endswith("(Turbo 512²)")
