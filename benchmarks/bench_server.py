"""Server throughput and latency at concurrency 1, 4, 16 with batching on vs off, one run.

Starts `vqdm serve` twice on loopback (max batch size N, then 1), drives each with closed-loop
clients (each sends its next request when the previous one returns) for a fixed number of
requests per concurrency level, and reports images/s, p50/p95/p99 latency and the mean batch
size the server formed (from its own /metrics). Only loopback traffic; every loop is bounded.

    python benchmarks/bench_server.py --json benchmarks/results/bench_server_cpu.json
    python benchmarks/bench_server.py --model DIR --size 512x512 --steps 4   # a real artifact

With no --model the server's embedded default (tiny SDXL, its prebuilt K=2 artifact) is measured.

`--compare-compile MODE --models-json FILE` measures served latency instead: VQ against dense served
the same way, and compiled against eager. FILE (written by `served_models.py`) names pairs of a VQ
artifact and a dense folder with the request body for each pair (`--pairs LABEL...`: only those).
One server runs every model with `--compile MODE` (compiled at start-up, inside warm-up), then one
with `--compile off`; each model
gets warm-up requests, then sequential timed requests (concurrency 1, batching off). Ratios per pair:
VQ / dense compiled (`served_ratio`), VQ / dense eager, eager / compiled for each. The JSON is
rewritten after each server, so a run stopped midway keeps what it measured; each compiled
server's `vqdm_compiled_steps_total` shows which calls ran compiled and why others fell back.

    python benchmarks/bench_server.py --compare-compile reduce-overhead --models-json DIR/models.json \
        --device cuda --requests 3 --json benchmarks/results/gpu_served.json
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


PROMPT = "a lighthouse at dusk, oil painting"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, args, max_batch: int, models: dict[str, str] | None = None, extra: list[str] = ()) -> None:
        """`vqdm serve` on a free loopback port, ready: `models` NAME -> PATH (default: --model as
        'bench', else the embedded default), `extra` more flags."""
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "vqdm.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--max-batch-size", str(max_batch), "--max-queue-size", "256", "--log-level", "warning",
               "--max-n", "1", "--device", args.device, *extra]
        models = models if models is not None else ({"bench": args.model} if args.model else {})
        for name, path in models.items():
            cmd += ["--model", f"{name}={path}"]
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

    def metric_samples(self, prefix: str) -> list:
        text = httpx.get(self.base + "/metrics", timeout=10).text
        return [s for f in text_string_to_metric_families(text) for s in f.samples if s.name.startswith(prefix)]

    def batch_stats(self) -> tuple[float, float]:
        vals = {s.name: s.value for s in self.metric_samples("vqdm_batch_size")}
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
    body = {"prompt": PROMPT, "num_inference_steps": args.steps, "size": args.size}
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


def sequential_latency(server: Server, body: dict, warmup: int, requests: int) -> dict:
    """Warm-up requests, then `requests` one at a time: client-side latency of each."""
    lat, errors = [], []
    with httpx.Client(base_url=server.base, timeout=600) as c:
        for i in range(warmup + requests):
            t0 = time.perf_counter()
            r = c.post("/v1/images/generations", json={**body, "seed": i})
            if r.status_code != 200:
                errors.append(f"{r.status_code}: {r.text[:200]}")
            elif i >= warmup:
                lat.append(time.perf_counter() - t0)
    out = {"requests": requests, "warmup": warmup, "latencies_s": [round(x, 4) for x in lat], "errors": errors}
    if lat:
        out.update(p50_s=round(float(np.median(lat)), 4), min_s=round(min(lat), 4))
    return out


def _ratio(num: dict | None, den: dict | None) -> float | None:
    if not num or not den or "p50_s" not in num or "p50_s" not in den:
        return None
    return round(num["p50_s"] / den["p50_s"], 4)


def compare_compile(args) -> dict:
    """Served latency of each pair's VQ and dense model, eager then compiled (module docstring)."""
    pairs = json.loads(Path(args.models_json).read_text())
    if args.pairs:
        unknown = sorted(set(args.pairs) - set(pairs))
        if unknown:
            raise SystemExit(f"--pairs {' '.join(unknown)}: not in {args.models_json} (it has {', '.join(pairs)})")
        pairs = {label: pairs[label] for label in args.pairs}
    models = {f"{label}-{kind}": pair[kind] for label, pair in pairs.items() for kind in ("vq", "dense")}
    result = {"command": "python " + " ".join(sys.argv), "machine": machine(),
              "config": {"device": args.device, "compile": args.compare_compile, "requests": args.requests,
                         "warmup": args.warmup, "pairs": pairs, "server_args": args.server_arg},
              "servers": {}, "pairs": {}}
    # Compiled first: its VQ / dense ratio is the figure a run stopped midway should still have.
    for mode in (args.compare_compile, "off"):
        t0 = time.perf_counter()
        entry: dict = {"mode": mode}
        result["servers"][mode] = entry
        try:
            server = Server(args, 1, models, ["--compile", mode, *args.server_arg])
        except SystemExit as e:  # a server that does not start: recorded, the other mode still runs
            entry["error"] = str(e)
            summarize_pairs(result, args.compare_compile)
            write_json(args.json, result)
            continue
        entry["startup_s"] = round(time.perf_counter() - t0, 2)
        try:
            for label, pair in pairs.items():
                for kind in ("vq", "dense"):
                    body = {"prompt": PROMPT, **pair["body"], "model": f"{label}-{kind}"}
                    entry[f"{label}-{kind}"] = sequential_latency(server, body, args.warmup, args.requests)
                    print(f"{mode:16s} {label}-{kind:5s} p50 {entry[f'{label}-{kind}'].get('p50_s')}s", flush=True)
            entry["compiled_steps"] = {",".join(f"{k}={v}" for k, v in sorted(s.labels.items())): s.value
                                       for s in server.metric_samples("vqdm_compiled_steps_total")}
        finally:
            server.stop()
        summarize_pairs(result, args.compare_compile)
        write_json(args.json, result)
    return result


def summarize_pairs(result: dict, mode: str) -> None:
    eager, compiled = result["servers"].get("off", {}), result["servers"].get(mode, {})
    for label in result["config"]["pairs"]:
        ev, ed, cv, cd = (srv.get(f"{label}-{k}") for srv in (eager, compiled) for k in ("vq", "dense"))
        result["pairs"][label] = {
            "served_ratio": _ratio(cv, cd), "eager_served_ratio": _ratio(ev, ed),
            "speedup_vs_eager_vq": _ratio(ev, cv), "speedup_vs_eager_dense": _ratio(ed, cd),
            "compiled_vq_over_eager_dense": _ratio(cv, ed)}


def write_json(path: str | None, result: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(path + ".partial")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(path)  # never a half-written file, even when the run is killed


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
    p.add_argument("--compare-compile", metavar="MODE",
                   help="served latency, VQ vs dense, eager vs `vqdm serve --compile MODE` (needs --models-json)")
    p.add_argument("--models-json", help="pairs to serve (benchmarks/served_models.py writes it)")
    p.add_argument("--pairs", nargs="+", metavar="LABEL", help="serve only these pairs of --models-json (default: all)")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="one more `vqdm serve` argument (repeatable), e.g. --server-arg=--no-verify-artifacts")
    args = p.parse_args()
    if args.table:
        print(markdown(json.loads(Path(args.table).read_text())))
        return
    if args.compare_compile:
        if not args.models_json:
            p.error("--compare-compile needs --models-json")
        result = compare_compile(args)
        missing = [label for label, r in result["pairs"].items() if r["served_ratio"] is None]
        if missing or not result["pairs"]:
            raise SystemExit(f"no compiled served ratio for {', '.join(missing) or 'any pair'}: see the errors above"
                             + (f" and in {args.json}" if args.json else ""))
        return
    out = run(args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
