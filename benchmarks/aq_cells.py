"""CPU seconds and errors of AQ on chosen (layer, K) cells of the trained MiniLM layers of
quant_quality.py, one thread, time as process_time: on a shared, loaded machine the wall clock of
two runs is not comparable, their CPU time is. One JSON line per cell.

    python benchmarks/aq_cells.py encoder.layer.3.attention.output.dense:3,encoder.layer.3.intermediate.dense:3 \\
        [--aq cg_iters=20 --aq relative_tolerance=0.01] > after.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quant_quality as qq  # noqa: E402  (sibling script: model, sentences and H collection)
from provenance import git_commit  # noqa: E402

from vqdm.quantizer import AQConfig, quantize_weight, relative_error  # noqa: E402
from vqdm.quantizer.sampling import load_prompts  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cells", help="comma-separated LAYER:K")
    ap.add_argument("--aq", action="append", default=[], metavar="FIELD=VALUE", help="AQConfig override (a JSON value)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from transformers import AutoModel, AutoTokenizer  # deferred: heavy, and --help needs none of it

    knobs = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.aq)}
    cells = [(c.rsplit(":", 1)[0], int(c.rsplit(":", 1)[1])) for c in args.cells.split(",")]
    path = qq.model_dir()
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval().float()
    names = sorted({n for n, _ in cells})
    h_cal, _ = qq.collect_hessians(model, tok, qq.read_lines(qq.SENTENCES), names)
    h_out, _ = qq.collect_hessians(model, tok, load_prompts(None), names)
    modules = dict(model.named_modules())
    commit = git_commit()
    for name, k in cells:
        w = modules[name].weight.detach().float().clone()
        cpu, wall = time.process_time(), time.perf_counter()
        qw = quantize_weight(w, h_cal[name], AQConfig(num_codebooks=k, seed=0, **knobs))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        w_hat = qw.dequantize()
        print(json.dumps({"layer": name, "method": f"aq{k}", "aq": knobs, "rel_error": relative_error(w, w_hat, h_cal[name]),
                          "rel_error_heldout": relative_error(w, w_hat, h_out[name]), "cpu_seconds": cpu,
                          "wall_seconds": wall, "rounds": qw.rounds,
                          "seconds_by_phase": qw.stats["seconds_by_phase"], "commit": commit}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
