"""Error and time of each `--time-budget` rung (vqdm.quantizer.quantize.budget.LADDER) against the default search.

    .venv/bin/python benchmarks/aq_budget_ladder.py --json benchmarks/results/aq_budget_ladder.json

Layers: Linear layers of the trained all-MiniLM-L6-v2 (as benchmarks/quant_quality.py, whose model
loading and calibration this reuses: H from benchmarks/sentences.txt), K = 3, B = 8, g = 8, one
thread. For every rung and layer: relative error tr(ΔW H ΔWᵀ)/tr(W H Wᵀ) and seconds; the rung's
`error_ratio` is the median over layers of its error / the default's, `time_ratio` likewise for
seconds. The package's LADDER holds the error ratios (tests/quantizer/quantize/test_budget.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import machine  # noqa: E402  (sibling module)
from quant_quality import SENTENCES, calibrate, load_model  # noqa: E402

from vqdm.quantizer import AQConfig, quantize_weight
from vqdm.quantizer.quantize.budget import LADDER

# q, attention output, FFN up and down of two encoder layers: both MiniLM shapes (384x384, 1536x384, 384x1536)
LAYERS = [f"encoder.layer.{i}.{part}" for i in (0, 3) for part in
          ("attention.self.query", "attention.output.dense", "intermediate.dense", "output.dense")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codebooks", type=int, default=3)
    ap.add_argument("--layers", type=int, default=len(LAYERS), help=f"use the first N of the {len(LAYERS)} layers")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    origin = machine("cpu")  # the commit that runs, before anything changes
    tokenizer, model = load_model()  # one thread
    names = LAYERS[: args.layers]
    cal = calibrate(model, tokenizer, names, SENTENCES, None)
    modules = dict(model.named_modules())
    cells = []
    for rung in LADDER:
        for name in names:
            w = modules[name].weight.detach().float().clone()
            t0 = time.perf_counter()
            qw = quantize_weight(w, cal.h[name], AQConfig(num_codebooks=args.codebooks, seed=0, **rung.knobs))
            cells.append({"rung": rung.name, "layer": name, "n": w.shape[0], "d": w.shape[1], "rel_error": qw.rel_error,
                          "seconds": time.perf_counter() - t0, "rounds": qw.rounds})
            print(f"{rung.name:<28} {name:<40} rel_error {qw.rel_error:.5f} {cells[-1]['seconds']:6.2f} s", flush=True)
    default = {c["layer"]: c for c in cells if c["rung"] == LADDER[0].name}
    ladder = []
    for rung in LADDER:
        mine = [c for c in cells if c["rung"] == rung.name]
        ladder.append({"rung": rung.name, "knobs": rung.knobs,
                       "error_ratio": round(statistics.median(c["rel_error"] / default[c["layer"]]["rel_error"] for c in mine), 3),
                       "time_ratio": round(statistics.median(c["seconds"] / default[c["layer"]]["seconds"] for c in mine), 3),
                       "median_rel_error": statistics.median(c["rel_error"] for c in mine),
                       "seconds": sum(c["seconds"] for c in mine)})
    print("\n| rung | error vs default | time vs default |\n|---|---|---|")
    for r in ladder:
        print(f"| {r['rung']} | {r['error_ratio']:.3f}x | {r['time_ratio']:.3f}x |")
    result = {"benchmark": "aq_budget_ladder", "codebooks": args.codebooks, "layers": names,
              "calibration_tokens": cal.tokens, "aq_defaults": dataclasses.asdict(AQConfig()), "ladder": ladder,
              "cells": cells, "machine": {**origin, "threads": torch.get_num_threads()},
              "command": "benchmarks/aq_budget_ladder.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
