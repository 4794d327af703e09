"""Seconds to AQ-quantize one layer of each main SDXL shape, where the time goes, and the whole U-Net.

    .venv/bin/python benchmarks/quant_speed.py --json benchmarks/results/quant_speed_cpu.json
    .venv/bin/python benchmarks/quant_speed.py --shapes 1280x1280 --rounds 1     # a quick look

Shapes (n outputs × d inputs): attention 1280×1280, feed-forward up 10240×1280, feed-forward down
1280×5120 and the 3×3 conv 1280×(3·3·1280) = 1280×11520, at K = 3 (B = 8, g = 8, beam 8, AQConfig's
default search: least-squares codebooks, damping 0.2, k-means on 256 points per centroid; pass
`--aq cg_iters=0 --aq adam_steps=100 --aq kmeans_points_per_centroid=0 --aq damping=0` for the SPEC's
recipe). Every shape runs `--rounds` rounds (codebook fit + beam search) after the residual k-means init; per-phase seconds come from `quantize_weight`'s own timers. Random weights
and a calibration H from random activations with unequal channel scales: the work per round does
not depend on the values, only the number of rounds to converge does, which `--converge` measures
on the 1280×1280 layer (the SPEC stop rule, < 1% gain per round).

Projection: each of SDXL's 771 quantized layers is costed as init + rounds × (seconds per round),
both scaled by n·d from the measured shape with the nearest d (ties: nearest n); beam search and
Adam are linear in n for a fixed d, the d-dependence comes from the nearest measured d. It is an estimate of one
process on this machine; `torchrun` splits layers over ranks (docs/quantizer.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import machine  # noqa: E402  (sibling module)

from vqdm.quantizer import AQConfig
from vqdm.quantizer import quantize_weight
from vqdm.models import build_unet, layer_dims, select_layers
from vqdm.quantizer.quantize.time_plan import CALIBRATION_ROWS, project_layers, synthetic_problem

AQ_DEFAULTS = AQConfig()

SHAPES = {"attn 1280x1280": (1280, 1280), "ff.up 10240x1280": (10240, 1280), "ff.down 1280x5120": (1280, 5120),
          "conv3x3 1280x11520": (1280, 11520)}
def time_layer(name: str, n: int, d: int, k: int, rounds: int, seed: int, converge: bool, device: str = "cpu",
               knobs: dict | None = None, cpu_time: bool = False) -> dict:
    w, h = synthetic_problem(n, d, seed)
    cfg = AQConfig(num_codebooks=k, seed=seed, max_rounds=100 if converge else rounds,
                   relative_tolerance=AQ_DEFAULTS.relative_tolerance if converge else 0.0, device=device,
                   **(knobs or {}))
    cpu0 = time.process_time()
    qw = quantize_weight(w, h, cfg)
    cpu = time.process_time() - cpu0
    phases = dict(qw.stats["seconds_by_phase"])
    if cpu_time:  # one thread on a shared machine: the phases' wall seconds scaled to the CPU time they got
        phases = {key: v * cpu / qw.seconds for key, v in phases.items()}
    done = qw.rounds
    per_round = (phases.get("lsq", 0.0) + phases["adam"] + phases["beam"] + phases["loss"]) / max(done, 1)
    total = cpu if cpu_time else qw.seconds
    passes_seconds = phases["cholesky"] + phases["pass_fit"] + phases["pass_search"]
    init_seconds = phases["kmeans"] + passes_seconds
    row = {"shape": name, "n": n, "d": d, "K": k, "rounds": done, "seconds": total, "seconds_by_phase": phases,
           "init_seconds": init_seconds, "seconds_per_round": per_round,
           "beam_fraction": phases["beam"] / total, "adam_fraction": phases["adam"] / total,
           "lsq_fraction": phases.get("lsq", 0.0) / total,
           "kmeans_fraction": phases["kmeans"] / total,
           "passes_fraction": passes_seconds / total,
           "rel_error": qw.rel_error, "init_rel_error": qw.stats["init_rel_error"],
           "rel_error_history": [r["rel_error"] for r in qw.stats["history"]]}
    print(f"{name:<22} K={k} rounds={done:<3} {total:7.1f} s  init {init_seconds:6.1f} s "
          f"(passes {row['passes_fraction']:.0%} of all)  "
          f"per round {per_round:6.1f} s  beam {row['beam_fraction']:.0%} fit {row['lsq_fraction']:.0%} "
          f"adam {row['adam_fraction']:.0%} "
          f"rel_error {qw.rel_error:.4f}", flush=True)
    return row


def project_unet(rows: list[dict], rounds: float) -> dict:
    """Whole-U-Net seconds: each SDXL layer costed from the measured shape with the nearest d
    (`vqdm.quantizer.quantize.time_plan.project_layers`, which `vqdm plan --time` uses too)."""
    shapes = [layer_dims(m) for _, m in select_layers(build_unet("sdxl", device="meta"))]
    p = project_layers(shapes, rows, rounds)
    return {"rounds_assumed": rounds, "seconds": p["seconds"], "hours": p["seconds"] / 3600,
            "init_seconds": p["init_seconds"], "seconds_by_reference_shape": p["seconds_by_reference_shape"]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(f"{n}x{d}" for n, d in SHAPES.values()),
                    help="n x d pairs, comma-separated (default: the four SDXL shapes)")
    ap.add_argument("--codebooks", type=int, default=3, help="K (default 3)")
    ap.add_argument("--aq", action="append", default=[], metavar="FIELD=VALUE",
                    help="AQConfig override, e.g. --aq adam_steps=100 (repeatable)")
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds per shape after the init (default 2)")
    ap.add_argument("--converge", action=argparse.BooleanOptionalAction, default=True,
                    help="also run 1280x1280 to the SPEC stop rule to count rounds (default on)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--device", default="cpu", help="where AQ runs: cpu or cuda (default cpu)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="seconds are the process's CPU seconds (use with --threads 1 on a shared machine: a busy "
                         "neighbour inflates wall time, not CPU time)")
    ap.add_argument("--ranks", type=int, default=1,
                    help="processes the layers are split over (torchrun --nproc-per-node; default 1): the "
                         "projection divides by it")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--reproject", metavar="JSON",
                    help="recompute the projection of an earlier run's JSON (rows, rounds, ranks) and rewrite it")
    return ap.parse_args(argv)


def reproject(path: str) -> None:
    """Recompute the projection of an earlier run's JSON at `path` and rewrite it there."""
    result = json.loads(Path(path).read_text())
    conv = result["converged"]
    rounds = conv["rounds"] if conv else result["projection"]["rounds_assumed"]
    ranks = result["projection"].get("ranks", 1)
    projection = project_unet(result["layers"], rounds)
    projection.update(ranks=ranks, hours_one_process=projection["hours"], hours=projection["hours"] / ranks)
    result["projection"] = projection
    Path(path).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{projection['hours_one_process']:.1f} h in one process, {projection['hours']:.1f} h over {ranks} rank(s)")


def time_shapes(args: argparse.Namespace, knobs: dict) -> tuple[list[dict], dict | None]:
    """One row per --shapes entry, then (with --converge) the 1280x1280 layer run to the stop rule."""
    names = {f"{n}x{d}": k for k, (n, d) in SHAPES.items()}
    rows = []
    for spec in args.shapes.split(","):
        n, d = (int(v) for v in spec.lower().split("x"))
        rows.append(time_layer(names.get(spec, spec), n, d, args.codebooks, args.rounds, args.seed, converge=False,
                               device=args.device, knobs=knobs, cpu_time=args.cpu_time))
    converged = None
    if args.converge:
        converged = time_layer("attn 1280x1280 (to convergence)", 1280, 1280, args.codebooks, 0, args.seed, converge=True,
                               device=args.device, knobs=knobs, cpu_time=args.cpu_time)
    return rows, converged


def print_table(args: argparse.Namespace, rows: list[dict], converged: dict | None, rounds: int,
                projection: dict) -> None:
    print(f"\nprojected SDXL U-Net (771 layers, K={args.codebooks}, {rounds} rounds each, {args.device}, "
          f"{args.threads} thread(s) per process, {'CPU' if args.cpu_time else 'wall'} time): "
          f"{projection['hours_one_process']:.1f} h in one process, {projection['hours']:.1f} h over {args.ranks} rank(s)")
    print("\n| layer (n×d) | K | rounds | seconds | init (k-means + passes) | per round | beam search | codebook fit | Adam |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows + ([converged] if converged else []):
        print(f"| {r['shape']} | {r['K']} | {r['rounds']} | {r['seconds']:.1f} | {r['init_seconds']:.1f} | "
              f"{r['seconds_per_round']:.1f} | {r['beam_fraction']:.0%} | {r['lsq_fraction']:.0%} | {r['adam_fraction']:.0%} |")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.reproject:
        reproject(args.reproject)
        return 0

    torch.set_num_threads(args.threads)
    knobs = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.aq)}
    settings = dataclasses.asdict(AQConfig(num_codebooks=args.codebooks, **knobs))
    rows, converged = time_shapes(args, knobs)
    rounds = converged["rounds"] if converged else args.rounds
    projection = project_unet(rows, rounds)
    projection["ranks"] = args.ranks
    projection["hours_one_process"] = projection["hours"]
    projection["hours"] = projection["hours_one_process"] / args.ranks
    print_table(args, rows, converged, rounds, projection)
    result = {"benchmark": "quant_speed", "layers": rows, "converged": converged, "projection": projection,
              "settings": {**{k: v for k, v in settings.items() if k not in ("device", "seed", "max_rounds",
                                                                              "relative_tolerance")},
                           "K": args.codebooks, "calibration_rows": CALIBRATION_ROWS, "seed": args.seed},
              "machine": {**machine("cuda" if args.device.startswith("cuda") else "cpu"), "threads": args.threads,
                          "cpu_time": args.cpu_time, "ranks": args.ranks, "device": args.device},
              "command": "benchmarks/quant_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
