"""Writing and reading a full-size SDXL single-file checkpoint (original layout), time and peak RSS (issue 28).

    .venv/bin/python benchmarks/single_file_io.py --workdir /tmp/sf \
        --json benchmarks/results/single_file_io.json

Each step is a child process whose peak RSS comes from wait4:
  1. `vqdm make-model sdxl --single-file F --dtype fp16`: seeded random weights built in fp16 (the
     U-Net is initialised in fp32, then cast) and streamed to F one tensor at a time;
  2. `vqdm plan --model F --bits 3`: the header only (refusal checks, architecture, family);
  3. this script's `--read F`: `load_pipeline(F, dtype=fp16)`, the whole pipeline in memory.
F stays in --workdir (about 7 GB) for the commands that come after it (quantize, export, generate).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VQDM = [sys.executable, "-m", "vqdm.cli"]


def run(cmd: list[str]) -> dict:
    """Run `cmd`, wait4 for its peak RSS; {command, seconds, peak_rss_bytes, output}."""
    print("$", shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    print(output, end="", flush=True)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed:\n{output}")
    return {"command": shlex.join(cmd[len(VQDM):] if cmd[:len(VQDM)] == VQDM else cmd[1:]),
            "seconds": round(time.perf_counter() - t0, 1), "peak_rss_bytes": usage.ru_maxrss * 1024,
            "output_tail": output[-2000:]}


def read(path: str) -> None:
    """The child of step 3: load the file as a fp16 pipeline, print the load seconds and what it holds."""
    import torch

    from vqdm.models import load_pipeline

    t0 = time.perf_counter()
    pipe = load_pipeline(path, dtype=torch.float16)
    seconds = time.perf_counter() - t0
    params = {c: sum(p.numel() for p in getattr(pipe, c).parameters())
              for c in ("unet", "text_encoder", "text_encoder_2", "vae")}
    print(json.dumps({"load_seconds": round(seconds, 1), "parameters": params}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--json", help="results file to write")
    ap.add_argument("--preset", default="sdxl", help="architecture (default sdxl; tiny-sdxl: a dry run of the script)")
    ap.add_argument("--read", metavar="FILE", help=argparse.SUPPRESS)  # the child of step 3
    args = ap.parse_args()
    if args.read:
        return read(args.read)

    from benchmarks.provenance import machine

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    f = work / f"{args.preset}-fp16.safetensors"
    steps = {"write": run([*VQDM, "make-model", args.preset, "--single-file", str(f), "--dtype", "fp16", "--force"]),
             "plan": run([*VQDM, "plan", "--model", str(f), "--bits", "3"]),
             "read": run([sys.executable, __file__, "--workdir", str(work), "--read", str(f)])}
    steps["read"].update(json.loads(steps["read"]["output_tail"].strip().splitlines()[-1]))
    record = {"benchmark": "single_file_io", "preset": args.preset, "file": str(f), "file_bytes": f.stat().st_size, "steps": steps,
              "machine": machine("cpu"), "loadavg_at_end": os.getloadavg(),
              "note": "write = building seeded random weights (U-Net initialised in fp32, then cast) + streaming "
                      "them; read = header checks + every tensor read and cast into a fp16 pipeline"}
    print(json.dumps({k: v for k, v in record.items() if k != "steps"}, indent=2))
    for name, s in steps.items():
        print(f"{name:>5}: {s['seconds']:7.1f} s, peak RSS {s['peak_rss_bytes'] / 2**30:.2f} GiB")
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
