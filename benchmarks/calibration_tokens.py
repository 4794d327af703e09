"""How AQ's layer error depends on the number of calibration tokens, with and without H damping.

The trained MiniLM layers of `quant_quality.py` (default: transformer layer 3, its 6 Linears), AQ at
K = 3: H from the first N calibration sentences for several N, the quantized weight measured on that
H ("calibration") and on the held-out H from the 378 image prompts. With few tokens per input
dimension H is noisy: the search fits the noise, the in-sample error looks better than it is and
the held-out error is worse; damping the search's H (`AQConfig.damping`) trades a little of the
first for the second.

    python benchmarks/calibration_tokens.py --json benchmarks/results/calibration_tokens.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quant_quality as qq  # noqa: E402  (sibling script: model, sentences, H collection, one cell)
from vqdm.quantizer.sampling import load_prompts  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="3", help="transformer layer indices (default 3)")
    ap.add_argument("--texts", default="15,30,60,125,250", help="calibration sentence counts")
    ap.add_argument("--dampings", default="0,0.2", help="AQConfig.damping values")
    ap.add_argument("--codebooks", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    torch.set_num_threads(1)
    # imported here, after the offline switches above: the hub reads them when it is imported
    from transformers import AutoModel, AutoTokenizer

    path = qq.model_dir()
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval().float()
    picked = [int(x) for x in args.layers.split(",")]
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("encoder.layer.")
             and int(n.split(".")[2]) in picked]
    modules = dict(model.named_modules())
    sentences = qq.read_lines(qq.SENTENCES)
    h_out, tok_out = qq.collect_hessians(model, tokenizer, load_prompts(None), names)
    counts, dampings = [int(x) for x in args.texts.split(",")], [float(x) for x in args.dampings.split(",")]
    tasks, tokens = [], {}
    for count in counts:
        h_cal, tokens[count] = qq.collect_hessians(model, tokenizer, sentences[:count], names)
        for n in names:
            for damping in dampings:
                tasks.append({"layer": n, "method": f"aq{args.codebooks}", "k": args.codebooks, "beam": 8,
                              "adam_steps": None, "cg_iters": None, "damping": damping, "max_rounds": 100, "seed": 0,
                              "w": modules[n].weight.detach().float().clone(), "h": h_cal[n], "h_heldout": h_out[n],
                              "threads": 1, "texts": count})
    t0 = time.perf_counter()
    cells = []
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        for task, res in zip(tasks, pool.map(qq.run_task, tasks)):
            cells.append({"texts": task["texts"], "tokens": tokens[task["texts"]], "damping": task["damping"],
                          **{k: res[k] for k in ("layer", "rel_error", "rel_error_heldout", "cpu_seconds", "rounds")}})
            print(json.dumps(cells[-1]), flush=True)
    summary = []
    for count in counts:
        for damping in dampings:
            mine = [c for c in cells if c["texts"] == count and c["damping"] == damping]
            summary.append({"texts": count, "tokens": tokens[count], "damping": damping,
                            "median_rel_error": statistics.median(c["rel_error"] for c in mine),
                            "median_rel_error_heldout": statistics.median(c["rel_error_heldout"] for c in mine)})
    print("\n| sentences | tokens | damping | median rel. error (calibration H) | held-out H | held-out / calibration |")
    print("|---|---|---|---|---|---|")
    for r in summary:
        print(f"| {r['texts']} | {r['tokens']} | {r['damping']} | {r['median_rel_error']:.5f} | "
              f"{r['median_rel_error_heldout']:.5f} | {r['median_rel_error_heldout'] / r['median_rel_error']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "benchmark": "calibration_tokens", "layers": names, "K": args.codebooks, "heldout_tokens": tok_out,
            "summary": summary, "cells": cells, "seconds": time.perf_counter() - t0,
            "command": "benchmarks/calibration_tokens.py " + " ".join(argv if argv is not None else sys.argv[1:])},
            indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
