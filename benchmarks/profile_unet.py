"""Dense vs VQ U-Net steps in one process, interleaved, then where each step's CPU time goes by aten op.

    python benchmarks/profile_unet.py [--preset sdxl-turbo] [--resolution 512] [--bits 3] [--dtype fp32]
        [--pairs 4] [--out benchmarks/results/profile_unet_cpu_sdxl_turbo_512_fp32.txt]

bench_unet.py runs each variant in its own process (so each has its own peak RSS), minutes apart; on a
shared VM the dense step alone then varies by 10-15% between runs. Here both U-Nets live in one process
and their steps alternate (`--pairs` of them, after one warm-up each), so a neighbour's load falls on both
alike: the median ratio is the figure to compare. Then one profiled step of each (torch.profiler,
key_averages by self CPU time). The native decode has no aten op of its own: its time is what the VQ
step has beyond the dense one outside the listed ops (on the FBGEMM fallback it shows as
aten::_embedding_bag_forward_only + aten::mul + aten::copy_). Batch: 1 for Turbo, 2 for SDXL (CFG).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # siblings: bench_unet (the U-Net builder), provenance


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="sdxl-turbo")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--rows", type=int, default=14, help="ops listed per profile")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from bench_unet import DTYPES, build, cfg_batch, inputs
    from provenance import machine
    from torch.profiler import ProfilerActivity, profile

    from vqdm.kernels import cpu_native

    dt = DTYPES[a.dtype]
    unets = {v: build(a.preset, v, a.bits, dt, "cpu") for v in ("dense", "vq")}
    batch = cfg_batch(a.preset)
    kw = inputs(unets["dense"], a.resolution, batch, dt, "cpu")  # the same inputs bench_unet times
    steps: dict[str, list[float]] = {"dense": [], "vq": []}
    lines = [f"# python {' '.join(sys.argv)}", f"# {machine('cpu')}", f"# threads {torch.get_num_threads()}, "
             f"native decode: {cpu_native.status().reason}", ""]
    with torch.inference_mode():
        for unet in unets.values():
            unet(**kw)  # warm-up: allocations, the decode library, oneDNN primitives
        for _ in range(a.pairs):
            for v, unet in unets.items():
                t0 = time.perf_counter()
                unet(**kw)
                steps[v].append(time.perf_counter() - t0)
        med = {v: statistics.median(s) for v, s in steps.items()}
        lines.append(f"{a.preset} {a.resolution}² batch {batch} {a.dtype} {a.bits}-bit, {a.pairs} interleaved pairs: "
                     f"dense {med['dense']:.2f} s, VQ {med['vq']:.2f} s (median), VQ / dense {med['vq'] / med['dense']:.3f}; "
                     f"steps dense {[round(x, 2) for x in steps['dense']]}, VQ {[round(x, 2) for x in steps['vq']]}")
        for v, unet in unets.items():
            with profile(activities=[ProfilerActivity.CPU]) as p:
                unet(**kw)
            lines += ["", f"## {v}: one profiled step", p.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows)]
    text = "\n".join(lines)
    print(text)
    out = a.out or HERE / "results" / f"profile_unet_cpu_{a.preset.replace('-', '_')}_{a.resolution}_{a.dtype}.txt"
    out.write_text(text + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
