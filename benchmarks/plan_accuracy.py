"""How close `vqdm plan --time` comes to a real `vqdm quantize` run, on whatever machine runs it.

    .venv/bin/python benchmarks/plan_accuracy.py --case tiny-sdxl-all --make-model tiny-sdxl \
        --workdir /tmp/plan_acc --json benchmarks/results/plan_accuracy.json -- --num-prompts 2 --steps 2 \
        --resolution 64 --batch-size 2 --beam 2 --adam-steps 2 --max-rounds 1 --kmeans-iters 5 --damping 0.1 \
        --init-passes 1 --tolerance 0.01 --device cpu
    .venv/bin/python benchmarks/plan_accuracy.py --case sdxl-mid_block-single-file \
        --model /tmp/i28/full/sdxl-fp16.safetensors --real-from /tmp/full28/sdxl-vq3-mid --workdir /tmp/plan_acc \
        --json benchmarks/results/plan_accuracy.json -- --subsets mid_block --max-stats-gb 5.0 --num-prompts 2 \
        --batch-size 2 --steps 1 --resolution 256 --guidance 1 --beam 1 --max-rounds 0 --kmeans-iters 1 \
        --init-passes 0 --device cpu   # the artifact and file of benchmarks/quantize_full_sdxl.py --export
    .venv/bin/python benchmarks/plan_accuracy.py --case sdxl-mid_block \
        --make-model sdxl --workdir /tmp/plan_acc --json benchmarks/results/plan_accuracy.json -- \
        --subsets mid_block --max-stats-gb 5 --num-prompts 2 --batch-size 2 --steps 1 --resolution 256 \
        --guidance 1 --beam 1 --kmeans-iters 1 --init-passes 1 --max-rounds 1 --cg-iters 2 --device cpu

    .venv/bin/python benchmarks/plan_accuracy.py --markdown benchmarks/results/plan_accuracy.json  # README table

The flags after `--` are `vqdm quantize`'s (and `vqdm plan --time`'s). Runs, as child processes:
  1. `vqdm make-model PRESET` into WORKDIR (skipped when the folder exists; full size: 10 GB fp32);
  2. `vqdm plan --model ... --time --json` with the flags: the projection (and how long the probe took);
  3. `vqdm quantize` with the same flags and the progress bar on, so it projects again at its start
     (the ETA's projection) and prints it beside the real time.
Real calibration and AQ seconds come from the artifact's manifest (per subset). The case is written
into --json under its name (other cases in the file are kept), with machine, commit and load.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import machine  # noqa: E402  (sibling module)

VQDM = [sys.executable, "-m", "vqdm.cli"]


def run(cmd: list[str]) -> tuple[str, float]:
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return proc.stdout, time.perf_counter() - t0


def markdown(path: str) -> str:
    """The README table of every case in a results file."""
    rows = ["| case | probe | projected: calibration + AQ = total | real: calibration + AQ = total | real ÷ projected "
            "(total; calibration, AQ) | load before / after |", "|---|---|---|---|---|---|"]
    for name, c in json.loads(Path(path).read_text())["cases"].items():
        p, r, q = c["projected"], c["real"], c["ratio_real_over_projected"]
        rows.append(f"| {name} (`{' '.join(c['flags'])}`) | {p['probe_seconds']:.0f} s | "
                    f"{p['calibration_seconds']:.1f} + {p['aq_seconds']:.1f} = {p['seconds']:.1f} s | "
                    f"{r['calibration_seconds']:.1f} + {r['aq_seconds']:.1f} = {r['seconds']:.1f} s | "
                    f"{q['total']:.2f} ({q['calibration']:.2f}, {q['aq']:.2f}) | "
                    f"{c['loadavg_1min']['before']:.1f} / {c['loadavg_1min']['after']:.1f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--markdown"]:  # print the README table of a results file
        print(markdown(argv[1]))
        return 0
    ours, flags = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", required=True, help="name of this case in the results file")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--make-model", metavar="PRESET", help="architecture preset (tiny-sdxl, sdxl), made in WORKDIR")
    src.add_argument("--model", type=Path, help="an existing model: diffusers folder or single-file checkpoint")
    ap.add_argument("--real-from", type=Path, metavar="ARTIFACT",
                    help="an artifact quantized earlier from --model with the same flags (e.g. by "
                         "quantize_full_sdxl.py): its manifest gives the real seconds, and no quantize runs")
    ap.add_argument("--workdir", required=True, type=Path)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--json", help="results file (the case is merged into it)")
    args = ap.parse_args(ours)

    model = args.model or args.workdir / args.make_model
    if not model.exists():
        run([*VQDM, "make-model", args.make_model, "--out", str(model)])
    family = "sdxl-turbo" if "turbo" in (args.make_model or "") else "sdxl"
    load_before, origin = os.getloadavg()[0], machine("cpu")  # the commit that runs, before anything changes
    out, plan_wall = run([*VQDM, "plan", "--model", str(model), "--bits", str(args.bits), "--time", "--json", *flags])
    projection = json.loads(out)["time"]
    artifact, quantize_wall, at_start = args.real_from, None, None
    if artifact is None:
        artifact = args.workdir / f"{args.case}-vq{args.bits}"
        shutil.rmtree(artifact, ignore_errors=True)
        out, quantize_wall = run([*VQDM, "quantize", "--model", str(model), "--preset", family, "--bits",
                                  str(args.bits), "--out", str(artifact), *flags])
        at_start = float(re.search(r"calibration \+ AQ [\d.]+ s, projected ([\d.]+) s", out).group(1))
    manifest = json.loads((artifact / "unet" / "manifest.json").read_text())
    subsets = manifest["calibration"]["subsets"]
    real = {"calibration_seconds": sum(s["calibration_seconds"] for s in subsets),
            "aq_seconds": sum(s["quantization_seconds"] for s in subsets)}
    real["seconds"] = real["calibration_seconds"] + real["aq_seconds"]
    case = {
        "model": str(args.model or args.make_model), "real_from": str(args.real_from) if args.real_from else None,
        "flags": flags, "bits": args.bits,
        "projected": {k: projection[k] for k in ("seconds", "calibration_seconds", "aq_seconds", "probe_seconds")},
        "projected_at_quantize_start_seconds": at_start,
        "real": real, "quantize_wall_seconds": quantize_wall, "plan_wall_seconds": plan_wall,
        "ratio_real_over_projected": {"total": real["seconds"] / projection["seconds"],
                                      "calibration": real["calibration_seconds"] / projection["calibration_seconds"],
                                      "aq": real["aq_seconds"] / projection["aq_seconds"],
                                      "total_vs_quantize_start": real["seconds"] / at_start if at_start else None},
        "loadavg_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "machine": origin,
        "command": "benchmarks/plan_accuracy.py " + " ".join(argv),
    }
    print(json.dumps(case, indent=2))
    if args.json:
        path = Path(args.json)
        result = json.loads(path.read_text()) if path.exists() else {"benchmark": "plan_accuracy", "cases": {}}
        result["cases"][args.case] = case
        path.write_text(json.dumps(result, indent=2) + "\n")
    if args.real_from is None:
        shutil.rmtree(artifact, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
