"""Start-up and request latency of `vqdm serve` (the embedded default) on a quiet machine and beside
busy cores, with the server's thread policy (server.threads) and, for comparison, a forced count.

    python benchmarks/cpu_contention.py [--burners 1] [--requests 5] [--threads auto,2] [--repeat 2]
                                        [--json FILE]

Each case starts a fresh server and measures: seconds from spawn to /readyz 200, then the median
wall time of `--requests` sequential requests (the model's default size, 4 steps). "busy" runs
`--burners` processes of `while True: pass` (nice 0) beside it for the whole case. `--threads 2`
passes --cpu-threads 2 (what torch picks by itself on a 2-core machine): the case the thread
policy fixes. A case that is not ready within `--ready-timeout` seconds is reported as such.
`--repeat` alternates quiet and busy runs that many times (on a shared machine the background
load drifts; alternating spreads the drift over both) and reports each case's median.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_case(threads: str, burners: int, n_requests: int, ready_timeout: float) -> dict:
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(burners)]
    port = free_port()
    cmd = [sys.executable, "-m", "vqdm.cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    if threads != "auto":
        cmd += ["--cpu-threads", threads]
    env = {k: v for k, v in os.environ.items() if not k.startswith("VQDM_") and k != "OMP_NUM_THREADS"}
    base = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = {"threads": threads, "burners": burners}
    try:
        while True:
            try:
                if httpx.get(base + "/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() - t0 > ready_timeout or proc.poll() is not None:
                out["ready_s"] = None
                return out
            time.sleep(0.2)
        out["ready_s"] = round(time.monotonic() - t0, 2)
        lat = []
        for i in range(n_requests):
            t = time.monotonic()
            r = httpx.post(base + "/v1/images/generations", json={"prompt": f"a harbour {i}", "num_inference_steps": 4,
                                                                  "seed": i}, timeout=600)
            r.raise_for_status()
            lat.append(time.monotonic() - t)
        out["request_median_s"] = round(statistics.median(lat), 3)
        out["request_all_s"] = [round(x, 3) for x in lat]
        return out
    finally:
        proc.terminate()
        proc.wait(60)
        for h in hogs:
            h.kill()
            h.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--burners", type=int, default=1)
    ap.add_argument("--requests", type=int, default=5)
    ap.add_argument("--threads", default="auto", help="comma list: auto and/or counts")
    ap.add_argument("--ready-timeout", type=float, default=300)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args()
    print(f"CPUs (affinity): {len(os.sched_getaffinity(0))}; load average before: {os.getloadavg()}", flush=True)
    runs = []
    for threads in args.threads.split(","):
        for _ in range(args.repeat):
            for burners in (0, args.burners):
                row = run_case(threads, burners, args.requests, args.ready_timeout)
                runs.append(row)
                print(json.dumps(row), flush=True)
    rows = []
    for threads in args.threads.split(","):
        for burners in (0, args.burners):
            same = [r for r in runs if r["threads"] == threads and r["burners"] == burners]
            ready = [r["ready_s"] for r in same]
            row = {"threads": threads, "burners": burners,
                   "ready_s": None if None in ready else statistics.median(ready)}
            if row["ready_s"] is not None:
                row["request_median_s"] = statistics.median(r["request_median_s"] for r in same)
            rows.append(row)
    print("\n| threads | busy cores | ready (s) | request median (s) |\n|---|---|---|---|")
    for r in rows:
        ready = r["ready_s"] if r["ready_s"] is not None else f"> {args.ready_timeout:.0f}"
        print(f"| {r['threads']} | {r['burners']} | {ready} | {r.get('request_median_s', '-')} |")
    for threads in args.threads.split(","):
        quiet, busy = [r for r in rows if r["threads"] == threads]
        if quiet.get("ready_s") and busy.get("ready_s"):
            print(f"threads={threads}: start-up {busy['ready_s'] / quiet['ready_s']:.2f}x, request "
                  f"{busy['request_median_s'] / quiet['request_median_s']:.2f}x busy vs quiet")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": runs, "medians": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
