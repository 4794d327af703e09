"""gpu_summary.json from what benchmarks/run_gpu.sh has written so far: rewritten after each step,
so a run stopped at any point leaves a summary of the steps before it.

    python benchmarks/gpu_summary.py OUTDIR --device DEVICE [--compile NOTE]
                                     [--step NAME --rc RC --seconds S --limit S]

Keys (issue 25): device, commit, unet_graph_ratio_sdxl_1024, unet_graph_ratio_turbo_512,
served_ratio_turbo_512, served_ratio_sdxl_1024, served_speedup_vs_eager. A figure that is missing is
null with `<key>_reason` beside it (its step failed, timed out or did not run, or the result lacks
it); `<key>_how` says what each figure divides. `steps` holds each step's exit status and seconds.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import git_commit  # noqa: E402  (sibling module)

SUMMARY = "gpu_summary.json"
UNET = {"unet_graph_ratio_sdxl_1024": ("unet_sdxl_1024", "gpu_unet_sdxl_1024.json"),
        "unet_graph_ratio_turbo_512": ("unet_turbo_512", "gpu_unet_turbo_512.json")}
SERVED_FILE, SERVED_STEP = "gpu_served.json", "served"
# Each figure from the first of its pairs that was served: on a GPU, SDXL 1024² is served only when
# the time budget leaves room for it (run_gpu.sh), and the speed-up then comes from Turbo 512².
SERVED = {"served_ratio_turbo_512": (("turbo_512",), "served_ratio"),
          "served_ratio_sdxl_1024": (("sdxl_1024",), "served_ratio"),
          "served_speedup_vs_eager": (("sdxl_1024", "turbo_512"), "speedup_vs_eager_vq")}
PAIR_NAMES = {"sdxl_1024": "SDXL 1024²", "turbo_512": "Turbo 512²"}
HOW = {"served_ratio": "served latency p50 (client side, one request at a time), VQ / dense, both `vqdm serve "
                       "--compile {mode}`",
       "speedup_vs_eager_vq": "served latency p50 of the VQ model, `--compile off` / `--compile {mode}` ({pair})"}
# In order of preference: on a GPU the step replayed as one CUDA graph, compiled then eager; on CPU
# (the dry run) there is no graph, and the compiled step stands in.
UNET_RATIOS = {"cuda": [("graph_compiled_vq_over_compiled_dense",
                         "VQ / dense U-Net step, both compiled (mode {mode}) and replayed from CUDA graphs, {dtype}"),
                        ("graph_eager_vq_over_eager_dense",
                         "VQ / dense U-Net step, eager modules replayed as one CUDA graph (the compiled ones failed), "
                         "{dtype}")],
               "cpu": [("compiled_vq_over_compiled_dense",
                        "VQ / dense U-Net step, both torch.compile(mode={mode}), {dtype} (CPU: no CUDA graph)")]}


def _step_reason(steps: dict, name: str) -> str:
    s = steps.get(name)
    if s is None:
        return f"step {name} did not run"
    if s["status"] == "timeout":
        return f"step {name} timed out after {s['limit_s']} s"
    return f"step {name} failed (exit {s['rc']}); see gpu_run.log"


def unet_figure(out: Path, steps: dict, step: str, file: str) -> tuple[float | None, str, str | None]:
    """(ratio, how, reason): the first ratio of UNET_RATIOS the result holds."""
    path = out / file
    if not path.exists():
        return None, "", _step_reason(steps, step)
    r = json.loads(path.read_text())
    comp = r.get("compile") or {}
    for dtype, c in comp.items():
        if dtype in ("mode", "backend"):
            continue
        for key, how in UNET_RATIOS["cuda" if r["device"] == "cuda" else "cpu"]:
            if c["ratios"].get(key) is not None:
                return c["ratios"][key], how.format(mode=comp["mode"], dtype=dtype), None
        errors = "; ".join(f"{k}: {v}" for k, v in c.get("errors", {}).items())
        return None, "", f"{file} has no graph ratio" + (f" ({errors})" if errors else "")
    return None, "", f"{file} has no compiled runs (bench_unet.py ran without --compile)"


def served_figure(out: Path, steps: dict, labels: tuple[str, ...], key: str) -> tuple[float | None, str, str | None]:
    path = out / SERVED_FILE
    if not path.exists():
        return None, "", _step_reason(steps, SERVED_STEP)
    r = json.loads(path.read_text())
    mode = r["config"]["compile"]
    served = [label for label in labels if label in r["config"]["pairs"]]
    if not served:
        return None, "", (f"{SERVED_FILE}: {' or '.join(PAIR_NAMES[x] for x in labels)} not served: it did not fit in "
                          "the time budget (see gpu_run.log)")
    label = served[0]
    value = r.get("pairs", {}).get(label, {}).get(key)
    if value is not None:
        return value, HOW[key].format(mode=mode, pair=PAIR_NAMES[label]), None
    errors = [f"--compile {m}: {e['error']}" for m, e in r["servers"].items() if "error" in e]
    errors += [f"--compile {m} {name}: {v['errors'][0]}" for m, e in r["servers"].items() for name, v in e.items()
               if isinstance(v, dict) and v.get("errors")]
    # The first error says why; the rest are in the file and gpu_run.log.
    why = (errors[0][:300] + (f" (+{len(errors) - 1} more in {SERVED_FILE})" if len(errors) > 1 else "")) if errors else (_step_reason(steps, SERVED_STEP) if SERVED_STEP in steps and steps[SERVED_STEP]["status"] != "ok"
                                else "the run stopped before this pair was measured")
    return None, "", f"{SERVED_FILE}: no {key} for {label} ({why})"


def summarize(out: Path, device: str, steps: dict, compile_note: str = "") -> dict:
    summary: dict = {"device": device, "commit": git_commit(), "compile": compile_note}
    figures = {k: unet_figure(out, steps, *v) for k, v in UNET.items()}
    figures |= {k: served_figure(out, steps, *v) for k, v in SERVED.items()}
    for key, (value, how, reason) in figures.items():
        summary[key] = value
        summary[f"{key}_how" if reason is None else f"{key}_reason"] = how if reason is None else reason
    summary["steps"] = steps
    return summary


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--device", required=True, help='the GPU\'s name, or "cpu-dry-run"')
    ap.add_argument("--compile", default="", help="how the run compiled (recorded as is)")
    ap.add_argument("--step", help="the step that just ended")
    ap.add_argument("--rc", type=int, default=0, help="its exit status (124 or 137: stopped by its time limit)")
    ap.add_argument("--seconds", type=float, default=0.0)
    ap.add_argument("--limit", type=float, default=0.0, help="its time limit in seconds")
    a = ap.parse_args(argv)
    path = a.out / SUMMARY
    steps = json.loads(path.read_text()).get("steps", {}) if path.exists() else {}
    if a.step:
        status = "ok" if a.rc == 0 else "timeout" if a.rc in (124, 137) else "failed"
        steps[a.step] = {"status": status, "rc": a.rc, "seconds": round(a.seconds, 1), "limit_s": a.limit}
    tmp = path.with_suffix(".json.partial")
    tmp.write_text(json.dumps(summarize(a.out, a.device, steps, a.compile), indent=1) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    main()
