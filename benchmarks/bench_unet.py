"""One denoising step of the full-size SDXL U-Net (2.6 B params, random init): dense vs VQ.

    python benchmarks/bench_unet.py --resolution 1024 --bits 3 --json FILE
        [--device cpu|cuda] [--preset sdxl|sdxl-turbo] [--dtypes fp32,bf16] [--steps 1]
        [--budgets 0,0.25,0.5,1] [--policy none] [--compile [MODE]] [--cuda-graph]

Each (variant, dtype) runs in its own subprocess, so peak RSS (and CUDA peak memory) is honest:
the VQ U-Net is built on the meta device and materialised as VQ directly, never as dense first
(`--in-process`, for dry runs: all in this process, no process start each, no peak RSS).
Batch: CFG batch 2 for SDXL, 1 for Turbo (guidance 0). Keys (SPEC §7): latency_ratio_fp32,
latency_ratio_bf16, weight_memory_ratio_fp32, peak_rss_ratio; GPU runs add latency_ratio_fp16.
`--budgets` (fractions of the dense weight bytes) adds the cache-budget sweep for the plot
(`--plot JSON... --out PNG` draws it). VQ codes are random: speed does not depend on their values.

`--compile [MODE]` (torch.compile mode: default, reduce-overhead, max-autotune) times, in the
same run, eager dense, compiled dense, eager VQ and compiled VQ: each worker times its model eagerly,
then compiles it the way `vqdm serve --compile` does (vqdm.models.compile.compile_unet). The first compiled call (compile + one step) is `compile_s`; warm-up steps then
absorb recompiles and CUDA-graph recording before the timed steps. The JSON's "compile" section
holds every variant's step, compile seconds and graph breaks, and the ratios compiled VQ / eager
dense, compiled VQ / compiled dense, eager VQ / eager dense and compiled / eager. With
`--cuda-graph` on CUDA each step is also captured as one CUDA graph, compiled too (reduce-overhead
records its own graphs: its compiled step is its graph step).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import machine  # noqa: E402  (sibling module)
from vqdm.models import build_unet, replace_with_vq, resident_weight_bytes, vq_modules  # noqa: E402
from vqdm.models.compile import COMPILE_MODES, compile_unet  # noqa: E402
from vqdm.models.weight_cache import install_weight_cache  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------
# worker: one model, one dtype, in its own process
# ----------------------------------------------------------------------------------------------
def build(preset: str, variant: str, bits: int, dtype: torch.dtype, device: str, seed: int = 0):
    """Materialise the U-Net straight in `dtype` on `device` (dense or VQ), from a meta skeleton."""
    from diffusers.utils import logging as dlogging  # deferred: diffusers is heavy, and only a worker builds

    dlogging.set_verbosity_error()  # casting a meta skeleton's dtype is fine here

    torch.manual_seed(seed)
    unet = build_unet(preset, device="meta")
    if variant == "vq":
        replace_with_vq(unet, num_codebooks=bits)
    unet = unet.to(dtype).to_empty(device=device)  # dtype while still on meta: no fp32 copy
    vq = {id(m) for _, m in vq_modules(unet)}
    vq_params = {id(p) for m in unet.modules() if id(m) in vq for p in m.parameters()}
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        randomize_vq(unet, gen)
        for m in unet.modules():
            if id(m) not in vq and hasattr(m, "reset_parameters") and not list(m.children()):
                m.reset_parameters()
                vq_params.update(id(p) for p in m.parameters(recurse=False))
        for p in unet.parameters():  # parameters held by modules without reset_parameters
            if id(p) not in vq_params:
                p.normal_(0.0, 0.02, generator=gen)
        bad = [n for n, p in unet.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise RuntimeError(f"uninitialised parameters after materialising: {bad[:5]}")
    return unet.eval()


@torch.no_grad()
def randomize_vq(unet, gen: torch.Generator) -> None:
    """Random codes in every VQ layer, Ŵ entries at the dense default init's spread (std 1/sqrt(3d))
    so activations match a dense U-Net's; biases zero."""
    for _, m in vq_modules(unet):
        m.codes.copy_(torch.randint(0, 256, m.codes.shape, device=m.codes.device, generator=gen, dtype=torch.uint8))
        m.codebooks.normal_(0.0, m.num_codebooks ** -0.5, generator=gen)
        m.scales.fill_((3 * m.d) ** -0.5)
        if m.bias is not None:
            m.bias.zero_()


def cfg_batch(preset: str) -> int:
    """U-Net rows of one image: 2 with classifier-free guidance (SDXL), 1 without (Turbo)."""
    return 1 if preset.endswith("turbo") else 2


def inputs(unet, resolution: int, batch: int, dtype: torch.dtype, device: str):
    g = torch.Generator(device="cpu").manual_seed(1)
    lat = resolution // 8
    cfg = unet.config
    text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim  # 1280 for SDXL
    mk = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    return dict(sample=mk(batch, cfg.in_channels, lat, lat), timestep=torch.tensor(500.0, device=device),
                encoder_hidden_states=mk(batch, 77, cfg.cross_attention_dim),
                added_cond_kwargs={"text_embeds": mk(batch, text_dim), "time_ids": mk(batch, 6)})


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _machine_busy_s() -> float:
    """CPU seconds all processes on this machine have run (from /proc/stat; 0 where unavailable)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# On a shared CPU a step counts only if other processes used < 5% of its wall time on the machine;
# up to EXTRA_TRIES (--busy-retries) more steps are run to collect undisturbed ones.
FOREIGN_CPU_FRACTION = 0.05
EXTRA_TRIES = 4
STEP_LOG: list[dict] = []


def time_steps(unet, kw, steps: int, device: str) -> list[float]:
    """Wall seconds of `steps` undisturbed steps (all steps tried, if fewer were undisturbed)."""
    clean, tried = [], []
    with torch.no_grad():
        while len(clean) < steps and len(tried) < steps + (EXTRA_TRIES if device == "cpu" else 0):
            _sync(device)
            busy0, own0, t0 = _machine_busy_s(), _own_cpu_s(), time.perf_counter()
            y = unet(**kw).sample
            _sync(device)
            wall = time.perf_counter() - t0
            foreign = max(0.0, (_machine_busy_s() - busy0) - (_own_cpu_s() - own0))
            tried.append(wall)
            STEP_LOG.append({"wall_s": wall, "foreign_cpu_s": round(foreign, 2)})
            if device != "cpu" or foreign < FOREIGN_CPU_FRACTION * wall:
                clean.append(wall)
            if not torch.isfinite(y).all():
                raise RuntimeError("non-finite U-Net output")
    return clean or tried


def time_graph(unet, kw, steps: int) -> float:
    """One step captured as a CUDA graph (no per-kernel launch cost), min over replays."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(s):
        for _ in range(2):
            unet(**kw)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(g):
        unet(**kw)
    ts = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        g.replay()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def _graph_counts() -> tuple[int, int]:
    """(graph breaks, graphs compiled) that Dynamo counted since its counters were last cleared."""
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]


def time_compiled(unet, kw, a) -> dict:
    """The U-Net compiled as `vqdm serve --compile` compiles it (vqdm.models.compile: whole graph,
    static shapes): seconds of the first call (compile + one step), then warm-up steps (CUDA-graph
    recording, autotuning) and the timed steps; graph breaks counted."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    res: dict = {"mode": a.compile, "backend": a.compile_backend}
    try:
        compiled = compile_unet(unet, a.compile, a.compile_backend)
        _sync(a.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            compiled(**kw)
        _sync(a.device)
        res["compile_s"] = time.perf_counter() - t0
        res["warmup_s"] = time_steps(compiled, kw, max(a.warmup, 2), a.device)
        ts = time_steps(compiled, kw, a.steps, a.device)
        res.update(step_s=min(ts), steps_s=ts)
        if a.device == "cuda" and a.cuda_graph:
            # reduce-overhead replays its own CUDA graphs; another capture around them is not allowed.
            res["graph_step_s"] = res["step_s"] if a.compile == "reduce-overhead" else time_graph(compiled, kw, max(a.steps, 3))
    except Exception as e:  # noqa: BLE001 - report it beside the eager figures, which stay valid
        res["error"] = f"{type(e).__name__}: {e}"[:500]
    res["graph_breaks"], res["graphs"] = _graph_counts()
    print(f"  [{a.variant} {a.dtype} compiled {a.compile}] " + (f"step {res['step_s']:.3f}s (compile {res['compile_s']:.1f}s, "
          f"{res['graph_breaks']} graph breaks)" if "step_s" in res else res["error"]), file=sys.stderr, flush=True)
    return res


def worker(a) -> dict:
    global EXTRA_TRIES, STEP_LOG
    EXTRA_TRIES, STEP_LOG = a.busy_retries, []
    dtype = DTYPES[a.dtype]
    torch.set_num_threads(a.threads or torch.get_num_threads())
    t0 = time.perf_counter()
    unet = build(a.preset, a.variant, a.bits, dtype, a.device)
    build_s = time.perf_counter() - t0
    batch = cfg_batch(a.preset)
    kw = inputs(unet, a.resolution, batch, dtype, a.device)
    weights = resident_weight_bytes(unet)
    res = {"variant": a.variant, "dtype": a.dtype, "bits": a.bits if a.variant == "vq" else None,
           "build_s": build_s, "weight_bytes": weights["stored"], "dense_equiv_bytes": weights[f"dense_{'fp32' if dtype == torch.float32 else 'fp16'}"]}
    policies = [a.policy] if a.variant == "vq" else ["none"]
    if a.variant == "vq" and a.budgets:
        dense_bytes = sum(m.n * m.d for m in unet.modules() if hasattr(m, "codes")) * dtype.itemsize
        policies = [f"budget={int(float(f) * dense_bytes)}" for f in a.budgets.split(",")]
    runs = []
    for pol in policies:
        cache = install_weight_cache(unet, pol) if a.variant == "vq" else None
        warm = time_steps(unet, kw, a.warmup, a.device)  # fills a budget cache; Triton autotunes
        ts = time_steps(unet, kw, a.steps, a.device)
        stats = cache.stats() if cache is not None else {}
        runs.append({"policy": pol, "step_s": min(ts), "steps_s": ts, "warmup_s": warm,
                     "cache_bytes": stats.get("bytes_resident", 0), "cache": stats,
                     "resident_bytes": weights["stored"] + stats.get("bytes_resident", 0)})
        print(f"  [{a.variant} {a.dtype} {pol}] step {min(ts):.3f}s (warmup {warm[0]:.3f}s)", file=sys.stderr, flush=True)
        if cache is not None:
            install_weight_cache(unet, "none")
            del cache
    res["runs"] = runs
    res["step_s"] = runs[0]["step_s"]
    if a.device == "cuda" and a.cuda_graph:
        install_weight_cache(unet, "none")
        try:
            res["graph_step_s"] = time_graph(unet, kw, max(a.steps, 3))
        except Exception as e:  # noqa: BLE001 - report, do not lose the eager figures
            res["graph_error"] = f"{type(e).__name__}: {e}"[:500]
    if a.compile:
        install_weight_cache(unet, a.policy if a.variant == "vq" else "none")
        res["compiled"] = time_compiled(unet, kw, a)
    # In-process workers share one process: its peak is every variant's so far, no variant's own.
    res["peak_rss_bytes"] = None if a.in_process else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    res["step_log"] = STEP_LOG  # every step run, with the CPU time other processes used meanwhile
    if a.device == "cuda":
        res["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return res


# ----------------------------------------------------------------------------------------------
# driver: subprocess per (variant, dtype), ratios vs dense in the same run
# ----------------------------------------------------------------------------------------------
def run_worker(args, variant: str, dtype: str, budgets: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--variant", variant, "--dtype", dtype, "--preset", args.preset,
           "--resolution", str(args.resolution), "--bits", str(args.bits), "--device", args.device,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--policy", args.policy,
           "--busy-retries", str(args.busy_retries)]
    if budgets:
        cmd += ["--budgets", budgets]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.cuda_graph:
        cmd += ["--cuda-graph"]
    if args.compile and not budgets:
        cmd += ["--compile", args.compile, "--compile-backend", args.compile_backend]
    waited = _wait_quiet(args.wait_quiet)
    print(f"$ {variant} {dtype}{' budgets ' + budgets if budgets else ''}", file=sys.stderr, flush=True)
    load_before = os.getloadavg()[0]
    if args.in_process:
        res = worker(argparse.Namespace(**{**vars(args), "variant": variant, "dtype": dtype, "budgets": budgets,
                                           "compile": None if budgets else args.compile}))
    else:
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
        res = json.loads(out.strip().splitlines()[-1])
    # Other processes on a shared CPU skew one variant more than the other: keep the evidence.
    res["loadavg_1min_before_after"] = [load_before, os.getloadavg()[0]]
    res["waited_for_quiet_s"] = waited
    return res


def _wait_quiet(max_s: float, threshold: float = 0.6) -> float:
    """Wait (up to max_s) until the 1-minute load average drops below threshold; seconds waited."""
    t0 = time.time()
    while max_s > 0 and os.getloadavg()[0] > threshold and time.time() - t0 < max_s:
        time.sleep(10)
    return time.time() - t0


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or den is None else round(num / den, 4)


def compile_summary(dense: dict, vq: dict) -> dict:
    """Eager and compiled steps of dense and VQ side by side, with their ratios (None where a compile
    failed: its error is in the variant's "compiled" entry)."""
    dc, vc = dense.get("compiled", {}), vq.get("compiled", {})
    step = {"eager_dense": dense["step_s"], "compiled_dense": dc.get("step_s"),
            "eager_vq": vq["step_s"], "compiled_vq": vc.get("step_s")}
    out = {"step_s": step,
           "compile_s": {"dense": dc.get("compile_s"), "vq": vc.get("compile_s")},
           "graph_breaks": {"dense": dc.get("graph_breaks"), "vq": vc.get("graph_breaks")},
           "errors": {k: c["error"] for k, c in (("dense", dc), ("vq", vc)) if "error" in c},
           "ratios": {"compiled_vq_over_eager_dense": _ratio(step["compiled_vq"], step["eager_dense"]),
                      "compiled_vq_over_compiled_dense": _ratio(step["compiled_vq"], step["compiled_dense"]),
                      "eager_vq_over_eager_dense": _ratio(step["eager_vq"], step["eager_dense"]),
                      "compiled_over_eager_vq": _ratio(step["compiled_vq"], step["eager_vq"]),
                      "compiled_over_eager_dense": _ratio(step["compiled_dense"], step["eager_dense"])}}
    if "graph_step_s" in dc or "graph_step_s" in vc or "graph_step_s" in dense:
        graph = {"eager_dense": dense.get("graph_step_s"), "compiled_dense": dc.get("graph_step_s"),
                 "eager_vq": vq.get("graph_step_s"), "compiled_vq": vc.get("graph_step_s")}
        out["graph_step_s"] = graph
        out["ratios"].update(
            graph_compiled_vq_over_compiled_dense=_ratio(graph["compiled_vq"], graph["compiled_dense"]),
            graph_eager_vq_over_eager_dense=_ratio(graph["eager_vq"], graph["eager_dense"]),
            graph_compiled_vq_over_eager_dense=_ratio(graph["compiled_vq"], graph["eager_dense"]))
    return out


def plot_cache_curve(paths: list[str], out_png: str) -> None:
    """Step latency vs resident U-Net weight memory: dense, VQ with no cache, and each cache budget."""
    import matplotlib  # deferred: only --plot needs it, and it is slow to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for path, color in zip(paths, ["tab:blue", "tab:orange", "tab:green", "tab:red"]):
        with open(path) as f:
            r = json.load(f)
        for dt, runs in r["runs"].items():
            if "budget_sweep" not in runs:
                continue
            dense, vq = runs["dense"], runs["vq"]
            pts = [(vq["weight_bytes"], vq["step_s"])] + [(x["resident_bytes"], x["step_s"]) for x in runs["budget_sweep"]["runs"]]
            pts.sort()
            label = f"{r['preset']} {r['resolution']}² {r['bits']}-bit VQ, {dt}, {r['device']}"
            ax.plot([p[0] / 1e9 for p in pts], [p[1] for p in pts], "o-", color=color, label=label)
            ax.plot([dense["weight_bytes"] / 1e9], [dense["step_s"]], "*", ms=14, color=color,
                    label=f"dense {dt} ({r['resolution']}²)")
    ax.set_xlabel("resident U-Net weight memory (GB): VQ weights + cached dense weights")
    ax.set_ylabel("one denoising step (s)")
    ax.set_title("Weight-cache budget: latency vs memory (CFG batch 2)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    print(f"wrote {out_png}")


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--bits", type=int, default=3, choices=(2, 3, 4))
    ap.add_argument("--preset", default="sdxl")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", default=None, help="default: cpu fp32,bf16; cuda fp16,bf16")
    ap.add_argument("--steps", type=int, default=1, help="timed steps (min is reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--policy", default="none", help="weight-cache policy of the VQ runs")
    ap.add_argument("--budgets", default=None, help="cache budget sweep, fractions of dense bytes, e.g. 0,0.5,1")
    ap.add_argument("--budget-dtypes", default="fp32,fp16", help="dtypes that get the budget sweep")
    ap.add_argument("--plot", nargs="+", default=None, metavar="JSON",
                    help="instead of running: plot step latency vs resident weight memory from these results")
    ap.add_argument("--out", default="benchmarks/results/bench_cache_budget.png", help="PNG for --plot")
    ap.add_argument("--dense-from", default=None, metavar="JSON",
                    help="reuse the dense runs of an earlier result (same preset, resolution, machine)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--busy-retries", type=int, default=EXTRA_TRIES,
                    help="CPU: extra steps run, at most, when other processes disturbed a timed one (0: none)")
    ap.add_argument("--wait-quiet", type=float, default=0,
                    help="before each subprocess, wait up to this many seconds for the CPU load to drop")
    ap.add_argument("--cuda-graph", action="store_true", help="GPU: also time the step as a captured CUDA graph")
    ap.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES,
                    help="also time each model compiled in this torch.compile mode, as `vqdm serve --compile` "
                         "compiles it (default: 'default')")
    ap.add_argument("--compile-backend", default="inductor",
                    help="torch.compile backend (aot_eager: traces the same graph without generating code, for dry runs)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--in-process", action="store_true",
                    help="run every variant in this process, not one subprocess each: no process start per "
                         "variant, but no peak RSS either (peak_rss_ratio is left out; for dry runs)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="dense", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.plot:
        plot_cache_curve(a.plot, a.out)
        return None
    if a.worker:
        print(json.dumps(worker(a)))
        return None
    dtypes = (a.dtypes or ("fp32,bf16" if a.device == "cpu" else "fp16,bf16")).split(",")
    result = {"preset": a.preset, "resolution": a.resolution, "bits": a.bits, "device": a.device,
              "dense_from": a.dense_from, "in_process": a.in_process,
              "policy": a.policy, "batch": 1 if a.preset.endswith("turbo") else 2,
              "command": "python " + " ".join(sys.argv), "machine": machine(a.device), "runs": {}}
    reuse = json.load(open(a.dense_from))["runs"] if a.dense_from else {}
    for dt in dtypes:
        dense = reuse[dt]["dense"] if dt in reuse else run_worker(a, "dense", dt)
        vq = run_worker(a, "vq", dt)
        result["runs"][dt] = {"dense": dense, "vq": vq}
        result[f"latency_ratio_{dt}"] = vq["step_s"] / dense["step_s"]
        if dt == "fp32":
            result["weight_memory_ratio_fp32"] = dense["weight_bytes"] / vq["weight_bytes"]
            if not a.in_process:
                result["peak_rss_ratio"] = dense["peak_rss_bytes"] / vq["peak_rss_bytes"]
        if "graph_step_s" in dense and "graph_step_s" in vq:
            result[f"latency_ratio_{dt}_cuda_graph"] = vq["graph_step_s"] / dense["graph_step_s"]
        if a.device == "cuda":
            result[f"cuda_peak_memory_ratio_{dt}"] = dense["cuda_peak_allocated_bytes"] / vq["cuda_peak_allocated_bytes"]
        print(f"{dt}: dense {dense['step_s']:.3f}s  vq {vq['step_s']:.3f}s  ratio {result[f'latency_ratio_{dt}']:.3f}",
              file=sys.stderr, flush=True)
        if a.compile:
            result.setdefault("compile", {"mode": a.compile, "backend": a.compile_backend})[dt] = compile_summary(dense, vq)
        if a.budgets and dt in a.budget_dtypes.split(","):
            result["runs"][dt]["budget_sweep"] = run_worker(a, "vq", dt, a.budgets)
    keys = [k for k in result if k.startswith(("latency_ratio", "weight_memory", "peak_rss", "cuda_peak"))]
    print(json.dumps({k: round(result[k], 4) for k in keys}, indent=1))
    if a.compile:
        print(json.dumps({dt: c["ratios"] for dt, c in result["compile"].items() if dt not in ("mode", "backend")}, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
