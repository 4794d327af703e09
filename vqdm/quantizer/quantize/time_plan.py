"""Projected wall time of `vqdm quantize` on this machine, from a short measured probe.

A run is calibration (each pass of each calibrated subset samples the calibration trajectories
through the U-Net, hooks summing x xᵀ of the pass's layers into fp64 H) then the AQ search of
every quantized layer. Both are projected from shapes and a probe:

Calibration: one forward of the U-Net on the meta device at the recipe's latent size (image batch 1)
counts matmul/conv FLOPs (`FlopCounterMode`), the elements every op writes, the ops dispatched,
and the rows each quantized layer sees. The probe measures this machine's fp32 GEMM FLOP/s, fp64
FLOP/s of xᵀx (the H sums), seconds per element written (SiLU), and seconds per dispatched op,
Python and module overhead included (a real forward of the tiny-sdxl U-Net over its op count). A
pass costs calls·ops·t_op + images·(FLOPs/R32 + elements·t_elem) + Σ rows·d²·2/R64 over the H
sums it keeps (layers reading one input share one).

AQ: `quantize_weight` with the run's settings, passes and rounds capped (`probe_aq`), on synthetic
problems (`synthetic_problem`) of up to PROBE_SHAPES reference shapes (n ≤ PROBE_MAX_N,
d ≤ PROBE_MAX_D); each layer is costed from the reference with the nearest d by `project_layers` (the projection of
`benchmarks/quant_speed.py`): phases scaled by n·d, n·d² or d³, the reference's rounds.

Not counted: loading the pipeline, the text encoders and scheduler, writing the artifact, and that
the student's earlier subsets run as VQ layers. The README ("Planning a run") has the measured
error of the projection against real runs.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from vqdm.models import build_unet, layer_dims, layers_in_subsets, select_layers
from vqdm.models.layer_selection import SUBSETS
from vqdm.quantizer.layer.aq import AQConfig, quantize_weight
from vqdm.quantizer.quantize.hessians import plan_passes
from vqdm.quantizer.sampling import SamplingConfig, plan_batches

CALIBRATION_ROWS = 2048  # activation rows behind a synthetic H
PROBE_MAX_N = 256  # reference shapes are cut to at most this many outputs ...
PROBE_MAX_D = 1280  # ... and inputs (larger d is extrapolated as n·d² and d³)
PROBE_SHAPES = 2
PROBE_PASSES = 1  # the probe runs at most this many sequential passes ...
PROBE_ROUNDS = 2  # ... and rounds; the rest are scaled from them
# Rounds to the default stop rule (0.005) after the default 8 passes: 4 on 1280x1280
# (benchmarks/results/quant_speed_cpu_k3_passes.json, "converged"); assumed when the probe hits its cap.
ROUNDS_TO_CONVERGE = 4
HOOK_OPS = 8  # ops a calibration hook dispatches per layer and call (view, cast, addmm, count)


def synthetic_problem(n: int, d: int, seed: int, rows: int = CALIBRATION_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """W ~ N(0, 1/d) and H = mean x xᵀ of activations with log-normal channel scales (float64).

    AQ's work per round depends on the shapes, not the values; the rounds to the stop rule do.
    """
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, d, generator=gen) / math.sqrt(d)
    channel = torch.exp(torch.randn(d, generator=gen))
    x = torch.randn(rows, d, generator=gen) * channel
    h = (x.T @ x).double() / rows
    h += torch.eye(d, dtype=torch.float64) * 1e-3 * h.diagonal().mean()  # full rank with few rows
    return w, h


# ---- AQ: per-layer projection from measured reference shapes --------------------------------

def nearest_reference(n: int, d: int, refs: Sequence[dict]) -> dict:
    """The measured reference with the nearest d (ties: nearest n), on a log scale."""
    return min(refs, key=lambda r: (abs(math.log(r["d"] / d)), abs(math.log(r["n"] / n))))


# How each phase of `quantize_weight` grows with the layer: n·d, n·d² (products with H) or d³.
PHASE_GROWTH = {"kmeans": "nd", "pass_search": "nd", "beam": "nd", "pass_fit": "nd2", "lsq": "nd2", "adam": "nd2",
                "loss": "nd2", "cholesky": "d3"}
ROUND_PHASES = ("lsq", "adam", "beam", "loss")


def layer_seconds(n: int, d: int, ref: dict) -> tuple[float, float]:
    """(init seconds, seconds per round) of an n×d layer, scaled from a measured reference row.

    A round's products with H (codebook fit, Adam, loss) cost n·d² and are scaled so; the beam
    search and the k-means init are scaled by n·d. The init's sequential passes: their codebook
    fits by n·d², their code choice (a beam step per group, plus the n·d²/2 error feedback, a small
    share) by n·d, and the one inverse Cholesky of H by d³. A reference may carry
    `fixed_seconds_by_phase`, the part of each phase that does not grow with n (per-call overhead,
    measured from two probe sizes): it is scaled by d alone. Beyond the largest measured d the
    n·d² and d³ parts are extrapolated, not measured.
    """
    n_scale, d_scale = n / ref["n"], d / ref["d"]
    phases, fixed, done = ref["seconds_by_phase"], ref.get("fixed_seconds_by_phase", {}), max(ref["rounds"], 1)
    init = per_round = 0.0
    for phase, growth in PHASE_GROWTH.items():
        in_d = {"nd": d_scale, "nd2": d_scale ** 2, "d3": d_scale ** 3}[growth]
        constant = fixed.get(phase, 0.0)
        seconds = in_d * (constant + (phases.get(phase, 0.0) - constant) * (1.0 if growth == "d3" else n_scale))
        if phase in ROUND_PHASES:
            per_round += seconds / done
        else:
            init += seconds
    return init, per_round


def project_layers(shapes: Iterable[tuple[int, int]], refs: Sequence[dict], rounds: float | None = None) -> dict:
    """AQ seconds of layers of `shapes` [(n, d)], each costed from its nearest reference.

    `rounds`: rounds per layer (None: each reference's own measured rounds). Returns seconds,
    init_seconds, seconds_by_reference_shape and layer_seconds (in the order of `shapes`).
    """
    total = init_total = 0.0
    by_shape: dict[str, float] = {}
    per_layer = []
    for n, d in shapes:
        ref = nearest_reference(n, d, refs)
        init, per_round = layer_seconds(n, d, ref)
        cost = init + (ref["rounds"] if rounds is None else rounds) * per_round
        init_total += init
        total += cost
        per_layer.append(cost)
        by_shape[ref["shape"]] = by_shape.get(ref["shape"], 0.0) + cost
    return {"seconds": total, "init_seconds": init_total, "seconds_by_reference_shape": by_shape,
            "layer_seconds": per_layer}


def reference_shapes(shapes: Iterable[tuple[int, int]], group_size: int, codebook_size: int) -> list[tuple[int, int]]:
    """Up to PROBE_SHAPES probe shapes: the capped input widths carrying the most n·d² work, each
    with the most outputs its layers have (capped), and enough groups for one codebook."""
    work: dict[int, float] = {}
    widest: dict[int, int] = {}
    for n, d in shapes:
        dc = min(d, PROBE_MAX_D)
        work[dc] = work.get(dc, 0.0) + n * d * d
        widest[dc] = max(widest.get(dc, 0), n)
    picked = sorted(sorted(work, key=lambda dc: -work[dc])[:PROBE_SHAPES])
    return [(max(min(widest[dc], PROBE_MAX_N), math.ceil(codebook_size * group_size / dc)), dc) for dc in picked]


def probe_config(aq: AQConfig) -> AQConfig:
    """The settings the probe runs: `aq` with at most PROBE_PASSES sequential passes and PROBE_ROUNDS rounds."""
    return dataclasses.replace(aq, init_passes=min(aq.init_passes, PROBE_PASSES), max_rounds=min(aq.max_rounds, PROBE_ROUNDS))


def probe_aq(shapes: Sequence[tuple[int, int]], aq: AQConfig, seed: int = 0) -> list[dict]:
    """`quantize_weight` timed on the reference shapes of `shapes`; one reference row per shape.

    Each reference runs `probe_config(aq)` at its n and at a quarter of it: per phase, what does
    not grow with n (per-call overhead, large on a busy machine) is kept apart
    (`fixed_seconds_by_phase`) so that it is not scaled up with the layer. The pass and round phases
    are scaled to `aq`'s passes and to the rounds `aq` would run: the probe's own when it met the
    stop rule before its cap, else ROUNDS_TO_CONVERGE (capped by `aq.max_rounds`).
    """
    probe = probe_config(aq)
    rows = []
    for n, d in reference_shapes(shapes, aq.group_size, aq.codebook_size):
        small = max(n // 4, math.ceil(aq.codebook_size * aq.group_size / d))
        timed = {}
        for size in (small, n) if small < n else (n,):
            w, h = synthetic_problem(size, d, seed)
            timed[size] = quantize_weight(w, h, dataclasses.replace(probe, seed=seed))
        qw = timed[n]
        phases = dict(qw.stats["seconds_by_phase"])
        fixed = {}
        if small < n:  # t = a + b·n per phase, from the two sizes
            low = timed[small].stats["seconds_by_phase"]
            for key, t in phases.items():
                slope = max((t - low[key]) / (n - small), 0.0)
                fixed[key] = min(max(t - slope * n, 0.0), t)
        scale = {key: 1.0 for key in phases}
        if probe.init_passes:
            for key in ("pass_fit", "pass_search"):
                scale[key] = aq.init_passes / probe.init_passes
        stopped = qw.rounds < probe.max_rounds
        rounds = qw.rounds if stopped or qw.rounds == aq.max_rounds else min(aq.max_rounds, ROUNDS_TO_CONVERGE)
        if qw.rounds:
            for key in ROUND_PHASES:
                scale[key] = rounds / qw.rounds
        rows.append({"shape": f"{n}x{d}", "n": n, "d": d, "rounds": rounds, "probe_rounds": qw.rounds,
                     "probe_seconds": sum(q.seconds for q in timed.values()),
                     "seconds_by_phase": {k: v * scale[k] for k, v in phases.items()},
                     "fixed_seconds_by_phase": {k: v * scale[k] for k, v in fixed.items()}})
    return rows


# ---- calibration: a meta-device census of one U-Net forward, costed at measured rates --------

@dataclass
class ForwardCensus:
    """One U-Net forward of one image, counted on the meta device."""

    flops: float  # matmul / conv / attention FLOPs
    elements: float  # elements written by all ops
    ops: int  # aten ops dispatched
    rows: dict[str, int]  # quantized layer -> rows it multiplies (tokens / conv output positions)
    owner: dict[str, str]  # layer -> first layer reading the same input (one shared H sum)


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        self.elements += sum(t.numel() for t in (out if isinstance(out, (tuple, list)) else [out])
                             if isinstance(t, torch.Tensor))
        return out


def unet_inputs(config, latent_side: int, device: str | torch.device = "meta") -> dict:
    """Inputs of one SDXL U-Net call for one image (77 text tokens)."""
    text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    return {"sample": torch.zeros(1, config.in_channels, latent_side, latent_side, device=device),
            "timestep": torch.tensor(500.0, device=device),
            "encoder_hidden_states": torch.zeros(1, 77, config.cross_attention_dim, device=device),
            "added_cond_kwargs": {"text_embeds": torch.zeros(1, text_dim, device=device),
                                  "time_ids": torch.zeros(1, 6, device=device)}}


@torch.no_grad()
def forward_census(unet: nn.Module, latent_side: int) -> ForwardCensus:
    """Count one forward of `unet` (meta device or not: only shapes are used) at `latent_side`²."""
    from torch.utils.flop_counter import FlopCounterMode

    meta = unet if next(unet.parameters()).device.type == "meta" else None
    if meta is None:
        with torch.device("meta"):
            meta = type(unet).from_config(unet.config)
    rows: dict[str, int] = {}
    owner: dict[str, str] = {}
    seen: dict[int, str] = {}
    held = []  # keeps inputs alive so their ids stay unique during the forward

    def hook(name):
        def fn(module, args, out):
            x = args[0]
            held.append(x)
            owner[name] = seen.setdefault(id(x), name)
            rows[name] = out.numel() // out.shape[1] if isinstance(module, nn.Conv2d) else out.numel() // out.shape[-1]
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in select_layers(meta)]
    try:
        with FlopCounterMode(display=False) as flops, _OpCounter() as ops:
            meta(**unet_inputs(meta.config, latent_side))
    finally:
        for h in handles:
            h.remove()
    return ForwardCensus(float(flops.get_total_flops()), float(ops.elements), ops.ops, rows, owner)


@dataclass
class MachineRates:
    """What this machine does per second (median of a few repeats of each micro-benchmark)."""

    gemm_flops: float  # fp32 matmul FLOP/s
    h_flops: float  # fp64 xᵀx FLOP/s
    element_seconds: float  # per element an elementwise op writes
    op_seconds: float  # per dispatched op, Python and module overhead included

    def forward_seconds(self, census: ForwardCensus, images: float, calls: float) -> float:
        return calls * census.ops * self.op_seconds + images * (census.flops / self.gemm_flops
                                                                + census.elements * self.element_seconds)


def _median_seconds(fn, repeats: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def measure_rates() -> MachineRates:
    """The four rates, in about a second or two on a CPU."""
    a, b = torch.randn(512, 1024), torch.randn(1024, 1024)
    gemm = 2 * 512 * 1024 * 1024 / _median_seconds(lambda: a @ b)
    x = torch.randn(1024, 512, dtype=torch.float64)
    h_rate = 2 * 1024 * 512 * 512 / _median_seconds(lambda: x.T @ x)
    e = torch.randn(1 << 22)
    element = _median_seconds(lambda: F.silu(e)) / e.numel()
    # per op: a real forward of the tiny U-Net (the same module code as the full one, tiny tensors)
    # over its op count, less what its FLOPs and elements cost at the rates above
    unet = build_unet("tiny-sdxl", device="cpu").eval()
    census = forward_census(unet, 8)
    inputs = unet_inputs(unet.config, 8, device="cpu")
    seconds = _median_seconds(lambda: unet(**inputs), repeats=3)
    op = max(seconds - census.flops / gemm - census.elements * element, 0.0) / census.ops
    return MachineRates(gemm, h_rate, element, op)


# ---- the whole run ---------------------------------------------------------------------------

@dataclass
class TimePlan:
    """The projected seconds of a `vqdm quantize` run; keys as in `vqdm plan --time --json`."""

    seconds: float
    calibration_seconds: float
    aq_seconds: float
    probe_seconds: float
    subsets: list[dict]  # per calibrated subset: name, quantized, layers, passes, pass_seconds, aq_seconds
    layer_seconds: dict[str, float]  # projected AQ seconds of each quantized layer
    references: list[dict]  # the probe's AQ rows
    rates: dict
    calibration: dict  # images, calls, latent side, FLOPs per image

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def pass_seconds(self, subset: str, index: int) -> float:
        """Projected seconds of calibration pass `index` of `subset`."""
        return next(s for s in self.subsets if s["subset"] == subset)["pass_seconds"][index]


def calibration_calls(calib: SamplingConfig) -> tuple[float, float]:
    """(U-Net image evaluations, U-Net calls) of one sampling of the whole calibration set."""
    batches = plan_batches(calib, ["x"])
    halves = 2 if calib.uses_cfg else 1
    return float(sum(len(b.prompts) * b.steps for b in batches) * halves), float(sum(b.steps for b in batches))


def plan_time(unet: nn.Module, aq: AQConfig, calib: SamplingConfig, latent_side: int,
              subsets: Sequence[str] = SUBSETS, calibrate_skipped: bool = False,
              max_stats_bytes: int | None = None, rates: MachineRates | None = None) -> TimePlan:
    """Project a `vqdm quantize` run of `unet` (meta device is enough) with these settings; probes first."""
    t0 = time.perf_counter()
    rates = rates or measure_rates()
    census = forward_census(unet, latent_side)
    layers = select_layers(unet)
    quantized = layers_in_subsets(layers, subsets)
    refs = probe_aq([layer_dims(m) for _, m in quantized], aq)
    probe_seconds = time.perf_counter() - t0
    aq_by_layer = dict(zip([n for n, _ in quantized],
                           project_layers([layer_dims(m) for _, m in quantized], refs)["layer_seconds"]))

    images, calls = calibration_calls(calib)
    per_call = images / max(calls, 1.0)
    forward = rates.forward_seconds(census, images, calls)
    cap = calib.max_rows_per_call
    out = []
    for subset in SUBSETS:
        if subset not in subsets and not calibrate_skipped:
            continue
        mine = layers_in_subsets(layers, [subset])
        modules = dict(mine)
        pass_seconds = []
        for names in plan_passes(mine, max_stats_bytes):
            h = 0.0
            for name in {census.owner.get(n, n): n for n in names}.values():  # one H sum per input read
                d = layer_dims(modules[name])[1]
                rows = census.rows.get(name, 0) * per_call
                rows = min(rows, cap) if cap else rows
                h += calls * (rows * d * d * 2 / rates.h_flops + rows * d * rates.element_seconds)
            pass_seconds.append(forward + h + calls * len(names) * HOOK_OPS * rates.op_seconds)
        aq_s = sum(aq_by_layer.get(n, 0.0) for n, _ in mine) if subset in subsets else 0.0
        out.append({"subset": subset, "quantized": subset in subsets, "layers": len(mine), "passes": len(pass_seconds),
                    "pass_seconds": pass_seconds, "calibration_seconds": sum(pass_seconds), "aq_seconds": aq_s})
    calibration_s = sum(s["calibration_seconds"] for s in out)
    aq_s = sum(aq_by_layer.values())
    return TimePlan(seconds=calibration_s + aq_s, calibration_seconds=calibration_s, aq_seconds=aq_s,
                    probe_seconds=probe_seconds, subsets=out, layer_seconds=aq_by_layer, references=refs,
                    rates=dataclasses.asdict(rates),
                    calibration={"images": images, "calls": calls, "latent_side": latent_side,
                                 "flops_per_image": census.flops, "ops_per_call": census.ops})
