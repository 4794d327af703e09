"""Server throughput and latency at concurrency 1, 4, 16 with batching on vs off, one run.

Starts `vqdm serve` twice on loopback (max batch size N, then 1), drives each with closed-loop
clients (each sends its next request when the previous one returns) for a fixed number of
requests per concurrency level, and reports images/s, p50/p95/p99 latency and the mean batch
size the server formed (from its own /metrics). Only loopback traffic; every loop is bounded.

    python benchmarks/bench_server.py --json benchmarks/results/bench_server_cpu.json
    python benchmarks/bench_server.py --model DIR --size 512x512 --steps 4   # a real artifact

With no --model the server's embedded default (tiny SDXL, its prebuilt K=2 artifact) is measured.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import machine  # noqa: E402  (sibling module)
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, args, max_batch: int) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "vqdm.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--max-batch-size", str(max_batch), "--max-queue-size", "256", "--log-level", "warning",
               "--max-n", "1", "--device", args.device]
        if args.model:
            cmd += ["--model", f"bench={args.model}"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("VQDM_")}
        self.proc = subprocess.Popen(cmd, env=env)
        deadline = time.monotonic() + args.startup_timeout
        while True:
            try:
                if httpx.get(self.base + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"server (max batch {max_batch}) did not become ready")
            time.sleep(0.2)
        self.model = httpx.get(self.base + "/v1/models", timeout=5).json()["data"][0]["id"]

    def batch_stats(self) -> tuple[float, float]:
        text = httpx.get(self.base + "/metrics", timeout=10).text
        vals = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name in ("vqdm_batch_size_sum", "vqdm_batch_size_count")}
        return vals.get("vqdm_batch_size_sum", 0.0), vals.get("vqdm_batch_size_count", 0.0)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


async def closed_loop(server: Server, concurrency: int, total: int, body: dict) -> dict:
    latencies: list[float] = []
    server_timings: dict[str, list[float]] = {}
    errors = 0
    counter = iter(range(total))

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal errors
        for i in counter:  # shared iterator: `total` requests over all clients, then stop
            t0 = time.perf_counter()
            r = await c.post("/v1/images/generations", json={**body, "seed": i})
            if r.status_code == 200:
                latencies.append(time.perf_counter() - t0)
                for k, v in r.json()["timings"].items():
                    server_timings.setdefault(k, []).append(v)
            else:
                errors += 1

    sum0, count0 = server.batch_stats()
    async with httpx.AsyncClient(base_url=server.base, timeout=600, limits=httpx.Limits(max_connections=64)) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*[client(c) for _ in range(concurrency)])
        wall = time.perf_counter() - t0
    sum1, count1 = server.batch_stats()
    lat = np.array(latencies)
    return {
        "concurrency": concurrency, "requests": total, "errors": errors, "wall_s": round(wall, 4),
        "images_per_s": round(len(lat) / wall, 4),
        "p50_s": round(float(np.percentile(lat, 50)), 4), "p95_s": round(float(np.percentile(lat, 95)), 4),
        "p99_s": round(float(np.percentile(lat, 99)), 4),
        "mean_batch": round((sum1 - sum0) / max(count1 - count0, 1), 3),
        "server_mean_s": {k: round(float(np.mean(v)), 4) for k, v in server_timings.items()},
    }


def run(args) -> dict:
    body = {"prompt": "a lighthouse at dusk, oil painting", "num_inference_steps": args.steps, "size": args.size}
    if args.guidance is not None:
        body["guidance_scale"] = args.guidance
    results: dict = {}
    for label, max_batch in (("batching_on", args.max_batch), ("batching_off", 1)):
        server = Server(args, max_batch)
        try:
            body["model"] = server.model
            asyncio.run(closed_loop(server, 2, args.warmup, body))  # warm caches and allocator
            results[label] = {"max_batch_size": max_batch, "levels": [
                asyncio.run(closed_loop(server, c, max(args.requests, c * args.min_rounds), body))
                for c in args.concurrency]}
        finally:
            server.stop()
        for level in results[label]["levels"]:
            print(f"{label:13s} c={level['concurrency']:3d}  {level['images_per_s']:7.2f} img/s  "
                  f"p50 {level['p50_s']:.3f}s  p95 {level['p95_s']:.3f}s  p99 {level['p99_s']:.3f}s  "
                  f"mean batch {level['mean_batch']:.2f}  errors {level['errors']}")
            print("    server means: " + "  ".join(f"{k} {v:.3f}" for k, v in level["server_mean_s"].items()))
    ratios = {}
    for on, off in zip(results["batching_on"]["levels"], results["batching_off"]["levels"]):
        ratios[str(on["concurrency"])] = {"throughput_on_over_off": round(on["images_per_s"] / off["images_per_s"], 3),
                                          "p50_on_over_off": round(on["p50_s"] / off["p50_s"], 3)}
        print(f"c={on['concurrency']:3d}: batching gives {ratios[str(on['concurrency'])]['throughput_on_over_off']:.2f}x "
              f"throughput, p50 x{ratios[str(on['concurrency'])]['p50_on_over_off']:.2f}")
    return {"command": "python " + " ".join(sys.argv), "machine": machine(),
            "config": {"model": args.model or "embedded default (vqdm-tiny-sdxl)", "size": args.size,
                       "steps": args.steps, "guidance": args.guidance, "device": args.device},
            "results": results, "ratios": ratios}


def markdown(result: dict) -> str:
    """The results table for docs/server.md."""
    rows = ["| concurrency | batching | images/s | p50 s | p95 s | p99 s | mean batch | throughput on/off |",
            "|---|---|---|---|---|---|---|---|"]
    for on, off in zip(result["results"]["batching_on"]["levels"], result["results"]["batching_off"]["levels"]):
        ratio = result["ratios"][str(on["concurrency"])]["throughput_on_over_off"]
        for label, lv in ((f"on (max {result['results']['batching_on']['max_batch_size']})", on), ("off", off)):
            rows.append(f"| {lv['concurrency']} | {label} | {lv['images_per_s']:.2f} | {lv['p50_s']:.3f} | "
                        f"{lv['p95_s']:.3f} | {lv['p99_s']:.3f} | {lv['mean_batch']:.2f} | "
                        f"{f'**{ratio:.2f}x**' if lv is on else ''} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="artifact or diffusers folder (default: the embedded tiny model)")
    p.add_argument("--size", default="128x128")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--guidance", type=float)
    p.add_argument("--device", default="auto")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=48, help="requests per concurrency level (at least 3 per client)")
    p.add_argument("--min-rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--max-batch", type=int, default=8, help="max batch size with batching on")
    p.add_argument("--startup-timeout", type=float, default=600)
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--table", metavar="JSON", help="print the Markdown table of an earlier run and exit")
    args = p.parse_args()
    if args.table:
        print(markdown(json.loads(Path(args.table).read_text())))
        return
    out = run(args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
