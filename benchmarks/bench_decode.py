"""The CPU decode alone and under its GEMM: FBGEMM vs the native C decode (vqdm.kernels.cpu_native).

    python benchmarks/bench_decode.py [--bits 2,3,4] [--rows 256] [--calls 30] [--json FILE]

Per SDXL weight shape: ns per decoded weight for each decoder (fp32 and bf16 outputs), then F.linear
on the freshly decoded weight against the dense weight at M rows (M = 256: the 1280-channel stage of
a Turbo 512² step), with non-temporal stores (what `decode_cpu` does above cpu_native.STREAM_MIN_BYTES)
and without. Calls are interleaved round-robin and the median reported, so a neighbour's load falls on
all variants alike. Writes benchmarks/results/bench_decode_cpu.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import machine  # noqa: E402  (sibling module)

from vqdm.kernels import cpu_native
from vqdm.kernels.cpu_decode import decode_cpu_fbgemm

# (name, n, d): SDXL's big linears and a 3x3 conv as [C_out, 9·C_in], and a cache-sized projection
SHAPES = [("ff.proj 1280->10240", 10240, 1280), ("ff.out 5120->1280", 1280, 5120),
          ("conv3x3 1280", 1280, 11520), ("attn.to_q 1280", 1280, 1280)]


def _median_ms(fns: dict, calls: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # first touch: scratch allocation, library load
    for _ in range(calls):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def bench_shape(n: int, d: int, k: int, rows: int, calls: int) -> dict:
    gen = torch.Generator().manual_seed(n + d + k)
    codes = torch.randint(0, 256, (n, d // 8, k), generator=gen, dtype=torch.uint8)
    cb, s = torch.randn(k, 256, 8, generator=gen), torch.rand(n, generator=gen)
    outs = {dt: torch.empty(n, d, dtype=dt) for dt in (torch.float32, torch.bfloat16)}
    x, w = torch.randn(rows, d, generator=gen), torch.randn(n, d, generator=gen)
    stream_min = cpu_native.STREAM_MIN_BYTES

    def native(out: torch.Tensor, stream: bool):
        cpu_native.STREAM_MIN_BYTES = 0 if stream else 1 << 62
        try:
            return cpu_native.decode(codes, cb, s, out)
        finally:
            cpu_native.STREAM_MIN_BYTES = stream_min

    decode = _median_ms({"fbgemm_fp32": lambda: decode_cpu_fbgemm(codes, cb, s, outs[torch.float32]),
                         "native_fp32": lambda: native(outs[torch.float32], False),
                         "fbgemm_bf16": lambda: decode_cpu_fbgemm(codes, cb, s, outs[torch.bfloat16]),
                         "native_bf16": lambda: native(outs[torch.bfloat16], False)}, calls)
    gemm = _median_ms({"dense": lambda: F.linear(x, w),
                       "fbgemm": lambda: F.linear(x, decode_cpu_fbgemm(codes, cb, s, outs[torch.float32])),
                       "native": lambda: F.linear(x, native(outs[torch.float32], False)),
                       "native_stream": lambda: F.linear(x, native(outs[torch.float32], True))}, calls)
    return {"n": n, "d": d, "k": k, "rows": rows, "decoded_fp32_bytes": n * d * 4,
            "decode_ns_per_weight": {key: round(ms * 1e6 / (n * d), 3) for key, ms in decode.items()},
            "linear_fp32_ms": {key: round(ms, 2) for key, ms in gemm.items()},
            "linear_fp32_vs_dense": {key: round(ms / gemm["dense"], 3) for key, ms in gemm.items() if key != "dense"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", default="3", help="codebooks K, comma-separated")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=Path(__file__).resolve().parent / "results" / "bench_decode_cpu.json")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    st = cpu_native.status()
    if not st.available:
        raise SystemExit(f"the native decode is unavailable here: {st.reason}")
    result = {"benchmark": "bench_decode", "command": "python " + " ".join(sys.argv), "machine": machine("cpu"),
              "threads": torch.get_num_threads(), "native_library": st.library,
              "stream_min_bytes": cpu_native.STREAM_MIN_BYTES, "rows": []}
    for k in (int(b) for b in a.bits.split(",")):
        for name, n, d in SHAPES:
            row = {"shape": name, **bench_shape(n, d, k, a.rows, a.calls)}
            result["rows"].append(row)
            print(f"K={k} {name:22s} decode ns/w {row['decode_ns_per_weight']}  linear/dense {row['linear_fp32_vs_dense']}",
                  flush=True)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(result, indent=1))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
