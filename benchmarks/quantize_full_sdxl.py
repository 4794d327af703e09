"""`vqdm quantize` end to end on the full-size SDXL architecture, on whatever machine runs it (issue 14.4).

    .venv/bin/python benchmarks/quantize_full_sdxl.py --workdir /tmp/fullsize \
        --json benchmarks/results/quantize_full_sdxl.json

Runs the real commands, each as a child process whose peak RSS comes from wait4:
  1. `vqdm make-model sdxl` (seeded random weights, fp32; skipped when WORKDIR/sdxl exists);
  2. `vqdm quantize --bits 3 --subsets down_blocks.0,mid_block --calibrate-skipped`: every one of the
     seven subsets is calibrated in order, within `--max-stats-gb` (so up_blocks.0, 22 GiB of fp64 H
     sums at full size, runs in several passes); the smallest subset and the mid block are quantized,
     the H of the other five is collected and discarded (their AQ is what a CPU cannot afford);
  3. `vqdm inspect` (hashes every file) and `vqdm generate` (one step, small size) from the artifact;
  4. `vqdm plan --preset sdxl --bits 3`, whole and for the same subsets, to compare bytes.
The quantize settings are cheap on purpose (CLI flags below, all recorded): 2 prompts x 1 step at
256^2 without CFG, and AQ = the residual k-means init only (`--max-rounds 0 --kmeans-iters 1 --init-passes 0`).
With `--subsets mid_block --no-calibrate-skipped --aq-args '--beam 1 --kmeans-iters 1 --init-passes 1
--max-rounds 1 --cg-iters 2'` the mid block gets one sequential pass and one round: 15.8 min of AQ on
the 2-core CPU (`benchmarks/results/quantize_full_sdxl_mid_round.json`). They show the pipeline runs at full size in bounded memory, not what quality the SPEC
settings reach. `--resume` continues
an interrupted quantize run from its last finished subset. Weights and artifact stay in --workdir.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import git_commit  # noqa: E402  (sibling module)

VQDM = [sys.executable, "-m", "vqdm.cli"]
SUBSETS_QUANTIZED = "down_blocks.0,mid_block"
# Cheap settings for a loaded 2-core CPU (state them: they are the run's, not the SPEC's).
CALIBRATION = ["--num-prompts", "2", "--batch-size", "2", "--steps", "1", "--resolution", "256", "--guidance", "1"]
AQ = ["--beam", "1", "--max-rounds", "0", "--kmeans-iters", "1", "--init-passes", "0"]


class LoadSampler(threading.Thread):
    """The 1-minute load average every `period` seconds while the benchmark runs."""

    def __init__(self, period: float = 30.0) -> None:
        super().__init__(daemon=True)
        self.period, self.samples, self._stop = period, [], threading.Event()

    def run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(self.period)

    def stop(self) -> dict:
        self._stop.set()
        s = self.samples or [os.getloadavg()[0]]
        return {"loadavg_1min_mean": round(statistics.fmean(s), 2), "loadavg_1min_max": round(max(s), 2),
                "samples": len(s), "period_s": self.period}


def run(cmd: list[str], log: Path) -> dict:
    """Run `cmd` (output to `log` and ours), wait4 for its peak RSS; {seconds, peak_rss_bytes, rc, output}."""
    print("$", shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        for line in proc.stdout:
            f.write(line)
            f.flush()
            lines.append(line)
            print(line, end="", flush=True)
        _, status, usage = os.wait4(proc.pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    proc.returncode = rc
    out = {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_bytes": usage.ru_maxrss * 1024, "rc": rc,
           "command": shlex.join(["vqdm", *cmd[len(VQDM):]]), "log": str(log)}
    if rc != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed with exit code {rc}; see {log}")
    out["output"] = "".join(lines)
    return out


def machine() -> dict:
    mem = {k: int(v.split()[0]) * 1024 for k, v in (l.split(":", 1) for l in open("/proc/meminfo")) if k in
           ("MemTotal", "MemAvailable")}
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "mem_total_bytes": mem.get("MemTotal"), "mem_available_at_start_bytes": mem.get("MemAvailable"),
            "torch": torch.__version__, "python": platform.python_version()}


def _bytes(path: Path) -> int | None:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else None


def subset_rows(manifest: dict) -> list[dict]:
    """Per subset: quantized or statistics only, passes, H bytes, seconds, median rel. error."""
    rows = []
    for info in manifest["calibration"]["subsets"]:
        rows.append({k: info.get(k) for k in ("subset", "quantized", "layers", "passes", "h_bytes", "max_pass_h_bytes",
                                             "calibration_seconds", "quantization_seconds", "median_rel_error",
                                             "resumed")})
    return rows


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, required=True, help="model, artifact and logs go here (not the repo)")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--max-stats-gb", type=float, default=5.0)
    ap.add_argument("--subsets", default=SUBSETS_QUANTIZED)
    ap.add_argument("--resume", action="store_true", help="continue an interrupted quantize run")
    ap.add_argument("--aq-args", default=shlex.join(AQ), help=f"AQ flags of the quantize run (default: {shlex.join(AQ)!r})")
    ap.add_argument("--no-calibrate-skipped", action="store_true",
                    help="calibrate only the quantized subsets (default: all seven, the others' H discarded)")
    ap.add_argument("--artifact-name", default="sdxl-vq3-partial", help="artifact folder inside --workdir")
    ap.add_argument("--model", type=Path, help="quantize this model (a diffusers folder or a single-file checkpoint, "
                                               "e.g. from `vqdm make-model sdxl --single-file F --dtype fp16`) "
                                               "instead of WORKDIR/sdxl, made by `vqdm make-model sdxl` when absent")
    ap.add_argument("--export", action="store_true",
                    help="also `vqdm export --single-file` the artifact, and generate from that file")
    ap.add_argument("--skip-quantize", action="store_true",
                    help="the artifact exists: only inspect, generate and plan (its quantize figures come from "
                         "the manifest, and no quantize RSS is measured)")
    return ap.parse_args()


@dataclasses.dataclass
class Phases:
    """What the child processes gave: each measured phase (`run`'s dict), and the JSON of inspect and plan."""
    runs: dict[str, dict]
    quantize_cmd: list[str]
    inspect: dict
    plan_all: dict
    plan_same: dict


def run_phases(args: argparse.Namespace, work: Path, model: Path, art: Path) -> Phases:
    """make-model (when absent), quantize (unless --skip-quantize), inspect, generate, then plan twice."""
    phases = {}
    if not model.exists() and args.model is None:
        phases["make_model"] = run([*VQDM, "make-model", "sdxl", "--out", str(model), "--seed", "0"], work / "make_model.log")
    quantize_cmd = [*VQDM, "quantize", "--model", str(model), "--preset", "sdxl", "--bits", "3", "--out", str(art),
                    "--subsets", args.subsets, *([] if args.no_calibrate_skipped else ["--calibrate-skipped"]),
                    "--max-stats-gb", str(args.max_stats_gb), *CALIBRATION, *shlex.split(args.aq_args),
                    "--device", "cpu", "--no-progress"]
    if args.resume:
        quantize_cmd.append("--resume")
    if not args.skip_quantize:
        phases["quantize"] = run(quantize_cmd, work / f"{args.artifact_name}.quantize.log")
    phases["inspect"] = run([*VQDM, "inspect", str(art)], work / f"{args.artifact_name}.inspect.log")
    inspect = json.loads(subprocess.run([*VQDM, "inspect", str(art), "--json"], check=True, capture_output=True,
                                        text=True).stdout)
    served = art
    if args.export:
        served = art.with_name(art.name + ".safetensors")
        phases["export"] = run([*VQDM, "export", str(art), "--single-file", str(served), "--force"],
                               work / f"{args.artifact_name}.export.log")
        phases["inspect_file"] = run([*VQDM, "inspect", str(served)], work / f"{args.artifact_name}.inspect_file.log")
    if model.is_file():  # `vqdm plan` reads the checkpoint file itself (its header: architecture and family)
        phases["plan_model"] = run([*VQDM, "plan", "--model", str(model), "--bits", "3", "--subsets", args.subsets],
                                   work / f"{args.artifact_name}.plan_model.log")
    phases["generate"] = run([*VQDM, "generate", "a lighthouse at dusk, oil painting", "--model", str(served),
                              "-o", str(work / f"{args.artifact_name}.png"), "--steps", "1", "--size", "256x256", "--guidance", "1",
                              "--seed", "0", "--device", "cpu", "--dtype", "float32"], work / f"{args.artifact_name}.generate.log")
    plan_all = json.loads(subprocess.run([*VQDM, "plan", "--preset", "sdxl", "--bits", "3", "--json"], check=True,
                                         capture_output=True, text=True).stdout)
    plan_same = json.loads(subprocess.run([*VQDM, "plan", "--preset", "sdxl", "--bits", "3", "--subsets", args.subsets,
                                           "--json"], check=True, capture_output=True, text=True).stdout)
    return Phases(phases, quantize_cmd, inspect, plan_all, plan_same)


def record_quantize(record: dict, ph: Phases, manifest: dict, subsets: list[dict], max_stats_gb: float) -> None:
    """Add the phases' seconds and RSS, the artifact's and the plan's bytes, and the per-subset figures to `record`."""
    phases = ph.runs
    for name, p in phases.items():
        record["phase_seconds"][name] = p["seconds"]
        record["phase_peak_rss_bytes"][name] = p["peak_rss_bytes"]
    record["phase_seconds"]["calibration_all_subsets"] = round(sum(s["calibration_seconds"] for s in subsets), 1)
    record["phase_seconds"]["aq_quantized_subsets"] = round(sum(s["quantization_seconds"] for s in subsets), 1)
    record["peak_rss_bytes"] = max(p["peak_rss_bytes"] for p in phases.values())
    record["peak_rss_note"] = ("ru_maxrss of each child (wait4): resident pages, including the fp32 source weights "
                               "that safetensors maps from disk (file-backed, reclaimable), so it overstates the "
                               "anonymous memory a run needs")
    record["subsets_quantized"] = manifest["quantization"]["subsets"]
    record["subsets_calibrated"] = [s["subset"] for s in subsets]
    record["artifact_unet_bytes"] = manifest["bytes"]["unet_stored"]
    record["artifact_weights_file_bytes"] = manifest["bytes"]["weights_file"]
    record["plan_unet_bytes"] = ph.plan_all["unet_bytes"]
    record["plan_unet_bytes_same_subsets"] = ph.plan_same["unet_bytes"]
    record["plan_dense_fp16_bytes"] = ph.plan_all["dense_fp16_bytes"]
    record["bits_per_weight"] = manifest["bits_per_weight"]
    record["command"] = (phases["quantize"]["command"] if "quantize" in phases
                         else shlex.join(["vqdm", *ph.quantize_cmd[len(VQDM):]]))
    record["commands"] = {name: p["command"] for name, p in phases.items()}
    record["benchmark_command"] = shlex.join(["python", *sys.argv])
    record["settings"] = {"calibration": manifest["calibration"], "aq": manifest["quantization"],
                          "max_stats_gb": max_stats_gb}
    record["settings"]["calibration"] = {k: v for k, v in manifest["calibration"].items() if k != "subsets"}
    layers = manifest["layers"]
    record["layers_quantized"] = len(layers)
    record["layers_by_subset"] = {s["subset"]: s["layers"] for s in subsets}
    record["quantized_weights"] = sum(e["n"] * e["d"] for e in layers)
    record["aq_seconds_per_million_weights"] = round(
        sum(e["seconds"] for e in layers) / (record["quantized_weights"] / 1e6), 3)
    record["subsets"] = subsets
    for s in subsets:
        errs = sorted(e["rel_error"] for e in layers if e.get("subset") == s["subset"])
        if errs:
            s["max_rel_error"] = errs[-1]


def record_checks(record: dict, ph: Phases, png: Path) -> None:
    """Add what inspect and generate reported, and the tail of the quantize output, to `record`."""
    inspect = ph.inspect
    record["inspect"] = {"integrity": inspect["integrity"], "layers": inspect["layers"],
                         "bits_per_weight_quantized": inspect["bits_per_weight_quantized"],
                         "bits_per_weight_unet": inspect["bits_per_weight_unet"], "unet_bytes": inspect["unet_bytes"],
                         "median_rel_error": inspect["median_rel_error"], "output": ph.runs["inspect"]["output"]}
    gen = ph.runs["generate"]
    if "export" in ph.runs:
        f = Path(ph.runs["generate"]["command"].split("--model ")[1].split(" ")[0])
        record["export"] = {"file": str(f), "file_bytes": f.stat().st_size, "seconds": ph.runs["export"]["seconds"],
                            "peak_rss_bytes": ph.runs["export"]["peak_rss_bytes"],
                            "output": ph.runs["export"]["output"][-2000:],
                            "inspect_output": ph.runs["inspect_file"]["output"][-3000:]}
    if "plan_model" in ph.runs:
        record["plan_model"] = {"command": ph.runs["plan_model"]["command"], "output": ph.runs["plan_model"]["output"][-3000:]}
    record["generate"] = {"seconds": gen["seconds"], "peak_rss_bytes": gen["peak_rss_bytes"],
                          "png_bytes": png.stat().st_size, "output": gen["output"][-2000:]}
    if "quantize" in ph.runs:
        record["quantize_summary_tail"] = "\n".join(ph.runs["quantize"]["output"].splitlines()[-12:])


def main() -> int:
    args = parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    model, art = args.model.resolve() if args.model else work / "sdxl", work / args.artifact_name
    load = LoadSampler()
    load.start()
    started = time.time()
    record: dict = {"device": "cpu", "machine": machine(), "commit": git_commit(), "model": str(model),
                    "model_bytes": _bytes(model), "phase_seconds": {}, "phase_peak_rss_bytes": {}}
    ph = run_phases(args, work, model, art)

    manifest = json.loads((art / "unet" / "manifest.json").read_text())
    subsets = subset_rows(manifest)
    record_quantize(record, ph, manifest, subsets, args.max_stats_gb)
    record_checks(record, ph, work / f"{args.artifact_name}.png")
    record["wall_seconds"] = round(time.time() - started, 1)
    record["machine_load"] = load.stop()
    record["workdir"] = str(work)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
