"""Latency cost of LoRA adapters on the full-size SDXL VQ U-Net step (CPU or CUDA), and memory per adapter.

    python benchmarks/bench_lora.py --resolution 512 --bits 3 --ranks 16,64 --rounds 2 \
        --json benchmarks/results/bench_lora_cpu_512.json

The U-Net is built as in bench_unet.py (meta skeleton materialised straight as VQ, random codes:
speed does not depend on their values). Each adapter is a random rank-r LoRA on kohya-ss's default
SDXL target set (every Linear inside the transformer blocks plus proj_in / proj_out), written as a
diffusers-layout state dict and read by the same parser the server uses, held in fp16 and applied
unmerged (vqdm.models.lora). Configurations are timed interleaved (none, r16, r64, none, ...), one
warm-up step each first, so machine load drifts hit them alike; the figure per configuration is
the minimum over rounds, and ratios are against "none" from the same run.
Memory per adapter: bytes held at rest (fp16 A and B) and bytes of the active branch (A and B cast
to the compute dtype, built when a batch activates the adapter set).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_unet import DTYPES, build, inputs  # noqa: E402

from vqdm.models.lora import LoraRuntime, parse_lora  # noqa: E402
from vqdm.models import VQLinear  # noqa: E402

KOHYA_PARENTS = ("attentions.",)  # Transformer2DModel blocks: kohya-ss's UNET_TARGET_REPLACE_MODULE


def lora_state_dict(unet, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """A random LoRA in the diffusers layout on every Linear inside the U-Net's transformer blocks."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in unet.named_modules():
        if isinstance(m, (torch.nn.Linear, VQLinear)) and any(p in name for p in KOHYA_PARENTS):
            sd[f"unet.{name}.lora_A.weight"] = (torch.randn(rank, m.in_features, generator=g) / m.in_features ** 0.5).half()
            sd[f"unet.{name}.lora_B.weight"] = (torch.randn(m.out_features, rank, generator=g) * 0.01).half()
    return sd


def step(unet, kw, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode():
        y = unet(**kw).sample
    if device == "cuda":
        torch.cuda.synchronize()
    if not torch.isfinite(y).all():
        raise RuntimeError("non-finite U-Net output")
    return time.perf_counter() - t0


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="sdxl")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--ranks", default="16,64")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default); on a CPU "
                    "shared with other jobs, 1 avoids OpenMP threads spinning against each other")
    ap.add_argument("--json", help="write the results here")
    return ap.parse_args()


def add_adapters(unet, ranks: list[int]) -> tuple[LoraRuntime, dict]:
    """A runtime on `unet` holding one random adapter per rank, named r<rank> (seeded by the rank)."""
    rt = LoraRuntime(types.SimpleNamespace(unet=unet))
    adapters = {}
    for r in ranks:
        a = parse_lora(lora_state_dict(unet, r, seed=r), {}, types.SimpleNamespace(unet=unet), f"r{r}", "random")
        rt.add(a)
        adapters[f"r{r}"] = a
    return rt, adapters


@dataclasses.dataclass
class Timings:
    warm: dict[str, float]  # the warm-up step of each configuration
    times: dict[str, list[float]]  # every timed step, per configuration
    branch_bytes: dict[str, int]  # bytes of the active branch (A and B in the compute dtype), per adapter


def time_configs(unet, kw, device: str, rt: LoraRuntime, configs: list[str], rounds: int) -> Timings:
    """One warm-up step per configuration, then `rounds` interleaved rounds (none, r16, r64, none, ...)."""
    timings = Timings(warm={}, times={c: [] for c in configs}, branch_bytes={})

    def run(cfg: str) -> float:
        if cfg == "none":
            return step(unet, kw, device)
        with rt.activate([(cfg, 1.0)]):
            timings.branch_bytes[cfg] = sum(b.down.numel() * b.down.element_size() + b.up.numel() * b.up.element_size()
                                            for b in rt._branches.values())
            return step(unet, kw, device)

    for cfg in configs:
        timings.warm[cfg] = run(cfg)
        print(f"warm-up {cfg}: {timings.warm[cfg]:.2f}s", flush=True)
    for i in range(rounds):
        for cfg in configs:
            timings.times[cfg].append(run(cfg))
            print(f"round {i} {cfg}: {timings.times[cfg][-1]:.2f}s", flush=True)
    return timings


def results(args: argparse.Namespace, batch: int, build_s: float, adapters: dict, timings: Timings) -> dict:
    """The JSON record: minimum step per configuration, ratios against "none", memory per adapter."""
    configs = list(timings.times)
    best = {c: min(ts) for c, ts in timings.times.items()}
    return {
        "preset": args.preset, "resolution": args.resolution, "bits": args.bits, "batch": batch,
        "device": args.device, "dtype": args.dtype, "rounds": args.rounds, "build_s": round(build_s, 2),
        "target_set": "kohya-ss default: every Linear in the transformer blocks (attn1/attn2 q,k,v,out; ff; "
                      "proj_in/out)",
        "command": "python " + " ".join(sys.argv),
        "machine": {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
                    "threads": torch.get_num_threads(),
                    "loadavg_at_end": os.getloadavg()},
        "step_s": {c: round(best[c], 3) for c in configs},
        "steps_s": {c: [round(t, 3) for t in ts] for c, ts in timings.times.items()},
        "warmup_s": {c: round(t, 3) for c, t in timings.warm.items()},
        "latency_ratio": {c: round(best[c] / best["none"], 4) for c in adapters},
        "adapters": {name: {"rank": a.rank, "layers": len(a.layers), "params": a.nbytes // 2,
                            "bytes_fp16": a.nbytes, "active_branch_bytes": timings.branch_bytes[name]}
                     for name, a in adapters.items()},
    }


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype, device = DTYPES[args.dtype], args.device
    ranks = [int(r) for r in args.ranks.split(",")]

    t0 = time.perf_counter()
    unet = build(args.preset, "vq", args.bits, dtype, device)
    build_s = time.perf_counter() - t0
    batch = 2 if args.preset == "sdxl" else 1  # CFG batch for SDXL
    kw = inputs(unet, args.resolution, batch, dtype, device)
    rt, adapters = add_adapters(unet, ranks)
    timings = time_configs(unet, kw, device, rt, ["none"] + list(adapters), args.rounds)
    out = results(args, batch, build_s, adapters, timings)
    print(json.dumps({k: out[k] for k in ("step_s", "latency_ratio", "adapters")}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
