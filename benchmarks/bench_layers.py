"""Per-layer latency: dense vs every VQ path, on the main SDXL layer shapes at the rows they see.

    python benchmarks/bench_layers.py [--device cpu|cuda] [--dtypes fp32,bf16] [--bits 4,3]
                                      [--sweep] [--quick] [--max-rows M] [--json FILE]

Rows (M): cross-attention k/v see 154 text tokens (77 x CFG batch 2); spatial layers see 1024,
4096 or 16384 rows (one image at 1024²: 32², 64², 128² latents). Each VQ path is timed against the
dense layer (same shape, same dtype) in the same run; ratio = VQ / dense. `--sweep` adds an M-sweep
on a few shapes (where the dispatch thresholds come from). VQ codes are random: speed does not
depend on their values.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import machine  # noqa: E402  (sibling module)

from vqdm.kernels import available_backends, choose_backend, vq_conv2d, vq_linear
from vqdm.kernels.cpu_decode import decode_cpu_scratch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Shape:
    name: str
    kind: str  # "linear" | "conv"
    n: int  # outputs (C_out)
    cin: int  # inputs (C_in for convs)
    m: int  # rows (convs: H·W of one image)
    ksize: int = 1

    @property
    def d(self) -> int:
        return self.cin * self.ksize * self.ksize


SDXL_SHAPES = [
    Shape("attn2.to_k 2048->640 (cross)", "linear", 640, 2048, 154),
    Shape("attn2.to_k 2048->1280 (cross)", "linear", 1280, 2048, 154),
    Shape("attn q/k/v/out 640", "linear", 640, 640, 4096),
    Shape("attn q/k/v/out 1280", "linear", 1280, 1280, 1024),
    Shape("ff.proj 640->5120", "linear", 5120, 640, 4096),
    Shape("ff.proj 1280->10240", "linear", 10240, 1280, 1024),
    Shape("ff.out 2560->640", "linear", 640, 2560, 4096),
    Shape("ff.out 5120->1280", "linear", 1280, 5120, 1024),
    Shape("resnet conv 3x3 320", "conv", 320, 320, 16384, 3),
    Shape("resnet conv 3x3 640", "conv", 640, 640, 4096, 3),
    Shape("resnet conv 3x3 1280", "conv", 1280, 1280, 1024, 3),
    Shape("up resnet conv 3x3 2560->1280", "conv", 1280, 2560, 1024, 3),
    Shape("shortcut 1x1 2560->1280", "conv", 1280, 2560, 1024, 1),
]
QUICK_SHAPES = [SDXL_SHAPES[1], SDXL_SHAPES[3], SDXL_SHAPES[10]]
SWEEP_SHAPES = [Shape("sweep 1280->1280", "linear", 1280, 1280, 0), Shape("sweep 2048->1280", "linear", 1280, 2048, 0),
                Shape("sweep 1280->10240", "linear", 10240, 1280, 0)]
SWEEP_ROWS = {"cpu": [1, 2, 4, 8, 16, 64], "cuda": [16, 64, 154, 256, 512, 1024, 2048, 4096]}


@dataclass
class Row:
    device: str
    dtype: str
    layer: str
    kind: str
    n: int
    d: int
    m: int
    bits: int
    path: str
    ms: float
    dense_ms: float
    ratio: float
    auto_choice: str
    graph_ms: float | None = None  # CUDA only: GPU time with launches replayed from a graph
    graph_ratio: float | None = None


def _time_cuda(fn, repeat: int) -> float:
    import triton.testing  # deferred: triton is there only on CUDA machines

    return triton.testing.do_bench(fn, warmup=25, rep=max(50, 10 * repeat), return_mode="median")


def random_layer(shape: Shape, k: int, device: str, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (shape.n, shape.d // 8, k), generator=gen, dtype=torch.uint8).to(device)
    codebooks = (torch.randn(k, 256, 8, generator=gen) / (8 * k) ** 0.5).to(device, torch.float16)
    scales = (torch.rand(shape.n, generator=gen) + 0.5).to(device, torch.float16) / shape.d ** 0.5
    bias = torch.randn(shape.n, generator=gen).to(device, dtype) * 0.01
    return codes, codebooks, scales, bias


def paths_for(shape: Shape, device: str, m: int, dtype: torch.dtype) -> list[str]:
    avail = available_backends(device)
    if device == "cpu":
        paths = ["cpu_decode"]
        lut_bytes = m * shape.d // 8 * 4 * 256 * 4
        if shape.kind == "linear" and "cpu_lut" in avail and lut_bytes <= 2**28:
            paths.append("cpu_lut")
        return paths
    paths = ["triton_decode"]
    if shape.kind == "linear" and dtype != torch.float32:
        paths.insert(0, "triton_fused")
    return [p for p in paths if p in avail]


def _time_interleaved(fns: dict[str, callable], device: str, repeat: int) -> dict[str, float]:
    """Median ms per candidate. On CPU the candidates run round-robin, so drift and other load on a
    shared machine hit dense and VQ alike; on CUDA each runs under triton's do_bench."""
    if device == "cuda":
        return {name: _time_cuda(fn, repeat) for name, fn in fns.items()}
    if device == "cuda_graph":  # GPU time alone: the calls replayed from a CUDA graph
        import triton.testing  # deferred: triton is there only on CUDA machines

        out = {}
        for name, fn in fns.items():
            try:
                out[name] = triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
            except Exception:  # noqa: BLE001 - a path that cannot be captured gets no graph figure
                out[name] = float("nan")
        return out
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def bench_shape(shape: Shape, m: int, k: int, device: str, dtype: torch.dtype, repeat: int) -> list[Row]:
    codes, cb, s, b = random_layer(shape, k, device, dtype)
    cb, s = cb.to(dtype), s.to(dtype)  # in memory the codebooks follow the model dtype
    dense_w = torch.randn(shape.n, shape.d, device=device, dtype=dtype) / shape.d ** 0.5
    if shape.kind == "linear":
        x = torch.randn(m, shape.d, device=device, dtype=dtype)
        dense = lambda: F.linear(x, dense_w, b)  # noqa: E731
        vq = lambda p: (lambda: vq_linear(x, codes, cb, s, b, backend=p))  # noqa: E731
        op = "linear"
    else:
        side = int(round(m ** 0.5))
        x = torch.randn(1, shape.cin, side, side, device=device, dtype=dtype)
        w4 = dense_w.view(shape.n, shape.cin, shape.ksize, shape.ksize)
        pad = (shape.ksize // 2,) * 2
        dense = lambda: F.conv2d(x, w4, b, 1, pad)  # noqa: E731
        vq = lambda p: (lambda: vq_conv2d(x, codes, cb, s, b, shape.cin, (shape.ksize,) * 2, (1, 1), pad,  # noqa: E731
                                          backend=p))
        op = "conv2d"
    fns = {"dense": dense}
    fns.update({p: vq(p) for p in paths_for(shape, device, m, dtype)})
    if device == "cpu":  # the decode alone: what a weight-cache hit saves
        fns["decode_only"] = lambda: decode_cpu_scratch(codes, cb, s, dtype)
    else:
        from vqdm.kernels.triton_vq import decode_triton  # deferred: needs triton, there only on CUDA machines

        fns["decode_only"] = lambda: decode_triton(codes, cb, s, dtype)
    with torch.no_grad():
        auto = choose_backend(op, x, codes, cb, s, b)
        ms = _time_interleaved(fns, device, repeat)
        gms = _time_interleaved(fns, "cuda_graph", repeat) if device == "cuda" else {}
    dt = str(dtype).removeprefix("torch.")
    return [Row(device, dt, shape.name, shape.kind, shape.n, shape.d, m, k, p, t, ms["dense"], t / ms["dense"], auto,
                gms.get(p), gms.get(p, 0) / gms["dense"] if gms else None)
            for p, t in ms.items()]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", default=None, help="comma list of fp32,fp16,bf16 (default: cpu fp32,bf16; cuda fp16,bf16)")
    ap.add_argument("--bits", default="4,3", help="comma list of 4,3,2 (K = bits)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--sweep", action="store_true", help="also sweep M on a few shapes")
    ap.add_argument("--quick", action="store_true", help="three shapes only")
    ap.add_argument("--max-rows", type=int, default=None, help="cap every M (dry runs: the same paths, tiny rows)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    dev = args.device
    dtypes = (args.dtypes or ("fp32,bf16" if dev == "cpu" else "fp16,bf16")).split(",")
    bits = [int(b) for b in args.bits.split(",")]
    rows: list[Row] = []
    jobs = [(sh, sh.m) for sh in (QUICK_SHAPES if args.quick else SDXL_SHAPES)]
    if args.sweep:
        jobs += [(sh, m) for sh in SWEEP_SHAPES for m in SWEEP_ROWS["cuda" if dev == "cuda" else "cpu"]]
    if args.max_rows:
        jobs = list(dict.fromkeys((sh.name, min(m, args.max_rows)) for sh, m in jobs))
        jobs = [(next(sh for sh in SDXL_SHAPES + SWEEP_SHAPES if sh.name == name), m) for name, m in jobs]
    print(f"{'dtype':5} {'layer':32} {'M':>6} {'K':>2} {'path':14} {'ms':>9} {'dense ms':>9} {'ratio':>6}  auto")
    for dt in dtypes:
        for k in bits:
            for sh, m in jobs:
                for r in bench_shape(sh, m, k, dev, DTYPES[dt], args.repeat):
                    rows.append(r)
                    if r.path != "dense":
                        g = f"  graph {r.graph_ms:8.4f} ms ratio {r.graph_ratio:5.2f}" if r.graph_ms is not None else ""
                        print(f"{dt:5} {r.layer[:32]:32} {r.m:6d} {k:2d} {r.path:14} {r.ms:9.3f} {r.dense_ms:9.3f} "
                              f"{r.ratio:6.2f}  {r.auto_choice}{g}", flush=True)
    out = {"machine": machine(dev), "command": " ".join(sys.argv), "rows": [asdict(r) for r in rows]}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
