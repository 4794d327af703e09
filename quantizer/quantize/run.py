"""`quantize_model`: a local SDXL / SDXL-Turbo folder to a VQ artifact, seven subsets in order (SPEC §3).

For each subset (down_blocks.0, .1, .2, mid_block, up_blocks.0, .1, .2):
  1. run the calibration trajectories through the student, whose earlier subsets are already
     quantized, with hooks collecting H for this subset's layers (`calibration`, `trajectories`);
  2. quantize every layer with `quantize_weight(W, H, AQConfig)`, seeded from (seed, layer name);
  3. swap the VQ layers in and record the subset in the checkpoint (`checkpoint`).
Then the artifact is written atomically by `save_artifact` and the checkpoint removed.

Under torchrun every rank runs its share of the prompts, H is all-reduced, the subset's layers are
split over the ranks and their results broadcast; rank 0 alone writes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from vqdm.errors import ConfigError, ModelFolderError, VQDMError
from vqdm.models import SUBSETS, detect_family, layer_bits, load_pipeline, quantize_layers, read_model_index
from vqdm.models import select_layers, subset_of, weight_matrix
from vqdm.quantizer.quantize.hessians import dist_info, plan_passes
from vqdm.quantizer.quantize.checkpoint import Checkpoint
from vqdm.quantizer.sampling import (CalibrationConfig, check_resolution, collect_hessians, load_prompts,
                                         preset_config, prompts_digest, unet_evaluations)

log = logging.getLogger(__name__)

SUPPORTED_CODEBOOKS = (2, 3, 4)  # SPEC §2: vqdm-2bit, -3bit, -4bit
SUPPORTED_NBITS = (8,)  # codes are stored as uint8
SUPPORTED_GROUP_SIZES = (8,)
PRESETS = ("sdxl", "sdxl-turbo")


class QuantizeStopped(VQDMError):
    """The run stopped after a subset because it was asked to (debugging / tests); resume continues it."""


def check_format_config(num_codebooks: int, nbits: int = 8, group_size: int = 8) -> None:
    """Refuse any (K, B, g) outside the SPEC's configurations, with the supported values."""
    if num_codebooks not in SUPPORTED_CODEBOOKS:
        raise ConfigError(f"--bits {num_codebooks} is not supported: choose 2, 3 or 4 (codebooks of 8-bit codes, groups of 8)")
    if nbits not in SUPPORTED_NBITS:
        raise ConfigError(f"codebook bits B={nbits} is not supported: codes are uint8, B must be 8")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ConfigError(f"group size g={group_size} is not supported: the kernels and format use g=8")


def make_aq_config(num_codebooks: int, nbits: int = 8, group_size: int = 8, **knobs):
    """An AQConfig with the format fields and any non-None knobs (beam_size, adam_steps, ...)."""
    from vqdm.quantizer import AQConfig

    check_format_config(num_codebooks, nbits, group_size)
    fields = {f.name for f in dataclasses.fields(AQConfig)}
    chosen = {k: v for k, v in knobs.items() if v is not None}
    unknown = sorted(set(chosen) - fields)
    if unknown:
        raise ConfigError(f"unknown AQ setting(s) {unknown}; AQConfig has {sorted(fields)}")
    try:
        return AQConfig(num_codebooks=num_codebooks, nbits=nbits, group_size=group_size, **chosen)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid AQ settings: {e}") from None


def layer_seed(seed: int, name: str) -> int:
    """A per-layer seed from (run seed, layer name): independent of order, rank and resume point."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


@dataclass
class QuantizeResult:
    out: Path
    layers: dict[str, dict]  # name -> {subset, n, d, rel_error, bits, seconds, rows}
    subsets: list[dict]  # per subset: name, layers, calibration/quantization seconds, resumed
    seconds: float


@dataclass
class _Run:
    """Everything a subset needs, fixed for the whole run."""

    pipe: Any
    calib: CalibrationConfig
    prompts: list[str]
    aq: Any
    seed: int
    rank: int
    world: int
    max_stats_bytes: int | None
    progress: bool
    layer_stats: dict[str, dict] = field(default_factory=dict)


def init_distributed() -> tuple[int, int]:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1); (rank, world)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist_info()


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def default_device() -> str:
    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()}"
    return "cpu"


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _check_paths(model_dir: Path, out: Path, ckpt: Checkpoint, resume: bool, force: bool) -> None:
    """Refuse, before any work, every output situation that could lose data or mix two runs."""
    if resume and force:
        raise ConfigError("--resume and --force exclude each other: resume a run, or start over")
    m, o = model_dir.resolve(), out.resolve()
    if o == m or m in o.parents or o in m.parents:
        raise ConfigError(f"--out {out} overlaps the source model folder {model_dir}: choose another output folder")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.exists() and not force:
        if resume:
            raise FileExistsError(f"{out} already exists: that run finished, nothing to resume (use --force to redo it)")
        raise FileExistsError(f"{out} already exists (use --force to overwrite, or choose another --out)")
    if resume and not ckpt.exists():
        raise ConfigError(f"--resume: no checkpoint at {ckpt.path} (run without --resume to start)")
    if ckpt.exists() and not (resume or force):
        raise ConfigError(f"an interrupted run left a checkpoint at {ckpt.path}: pass --resume to continue it "
                          "or --force to start over")


def quantize_model(model_dir: str | Path, preset: str, bits: int, out: str | Path, *,
                   calibration: CalibrationConfig | None = None, aq_options: dict | None = None,
                   nbits: int = 8, group_size: int = 8, resume: bool = False,
                   force: bool = False, device: str | None = None, dtype: str | torch.dtype | None = None,
                   max_stats_bytes: int | None = None, stop_after_subset: int | None = None,
                   progress: bool = True) -> QuantizeResult:
    """Quantize the U-Net of the diffusers folder `model_dir` to K=`bits` codebooks; write the artifact `out`.

    `preset` ('sdxl' / 'sdxl-turbo') picks the calibration recipe; `calibration` replaces it whole
    (build it with `preset_config(preset, steps=..., ...)`). `aq_options` are AQConfig fields
    (beam_size, ...). `calibration.seed` seeds everything. `max_stats_bytes` bounds the memory
    of the H sums held at once (a subset is then calibrated in several passes). `stop_after_subset`
    raises QuantizeStopped once that subset (0-6) is checkpointed, as an interruption would.
    Raises ConfigError / ModelFolderError / FileExistsError / CheckpointError before any output is
    written when the inputs are wrong.
    """
    start = time.perf_counter()
    model_dir, out = Path(model_dir), Path(out)
    if preset not in PRESETS:
        raise ConfigError(f"unknown --preset {preset!r}: choose sdxl or sdxl-turbo")
    check_format_config(bits, nbits, group_size)
    calib = calibration if calibration is not None else preset_config(preset)
    seed = calib.seed  # one seed for latents, noise, row sampling and AQ
    aq = make_aq_config(bits, nbits, group_size, **(aq_options or {}))
    read_model_index(model_dir)
    if (model_dir / "unet" / "manifest.json").is_file():
        raise ModelFolderError(f"{model_dir} is already a vqdm artifact: quantize the original diffusers folder")
    family = detect_family(model_dir)
    if family != preset:
        log.warning("%s looks like %s but --preset %s was given: calibrating with the %s recipe",
                    model_dir, family, preset, preset)
    prompts = load_prompts(calib.prompts_file)
    ckpt = Checkpoint.for_output(out)
    _check_paths(model_dir, out, ckpt, resume, force)

    rank, world = dist_info()
    device = device or default_device()
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    torch_dtype = torch_dtype or (torch.float16 if torch.device(device).type == "cuda" else torch.float32)
    pipe = load_pipeline(model_dir, dtype=torch_dtype, device=device)
    check_resolution(pipe, calib.resolution)
    indivisible = [n for n, m in select_layers(pipe.unet) if weight_matrix(m).shape[1] % group_size]
    if indivisible:
        raise ConfigError(f"group size {group_size} does not divide the input width of {indivisible[0]}")

    from vqdm.models.artifact import unet_fingerprint

    identity = _normalise({
        "unet_sha256": unet_fingerprint(source_dir=model_dir), "preset": preset,
        "format": {"num_codebooks": bits, "nbits": nbits, "group_size": group_size},
        "aq": _aq_dict(aq), "seed": seed, "calibration": calib.to_dict(), "prompts_sha256": prompts_digest(prompts),
    })  # not device, dtype or the memory budget: a run may resume elsewhere, or in more passes after an OOM
    if resume:
        state = ckpt.load(identity)
    elif rank == 0:
        state = ckpt.start(identity)
    _barrier(world)
    if rank != 0:
        state = ckpt.load(identity)

    run = _Run(pipe, calib, prompts, aq, seed, rank, world, max_stats_bytes, progress)
    subsets_info: list[dict] = []
    for entry in state["finished"]:  # restore the student exactly as it was swapped in
        tensors = ckpt.load_subset(entry)
        quantize_layers(pipe.unet, bits, lambda name, w, t=tensors: t[name], group_size, names=list(tensors))
        run.layer_stats.update(entry["layers"])
        subsets_info.append({**entry.get("info", {}), "resumed": True})
    done = {entry["index"] for entry in state["finished"]}
    if done:
        log.info("resuming %s: %d of %d subsets restored from %s", out, len(done), len(SUBSETS), ckpt.path)

    bar = tqdm(total=len(SUBSETS), initial=len(done), desc="subsets", unit="subset", disable=not progress or rank != 0)
    for index, subset in enumerate(SUBSETS):
        if index in done:
            continue
        tensors, stats, info = _quantize_subset(run, subset)
        quantize_layers(pipe.unet, bits, lambda name, w: tensors[name], group_size, names=list(tensors))
        run.layer_stats.update(stats)
        subsets_info.append(info)
        if rank == 0:
            ckpt.save_subset(state, index, subset, tensors, stats, info)
        _barrier(world)
        bar.update(1)
        log.info("subset %d/%d %s: %d layers, calibration %.1f s, quantization %.1f s, median rel. error %s",
                 index + 1, len(SUBSETS), subset, info["layers"], info["calibration_seconds"],
                 info["quantization_seconds"], info["median_rel_error"])
        if stop_after_subset is not None and index >= stop_after_subset:
            bar.close()
            raise QuantizeStopped(f"stopped after subset {index} ({subset}) as asked; "
                                  f"continue with --resume (checkpoint {ckpt.path})")
    bar.close()

    if rank == 0:
        from vqdm.models.artifact import save_artifact

        manifest = {
            "quantization": {"method": "aq", **_aq_dict(aq), "seed": seed},
            "layers": run.layer_stats,
            "base_model": {"name": model_dir.resolve().name, "family": family,
                           "unet_sha256": identity["unet_sha256"]},
            "calibration": {"preset": preset, **calib.to_dict(), "prompts_sha256": identity["prompts_sha256"],
                            "prompt_lines": len(prompts), "unet_evaluations": unet_evaluations(calib),
                            "scheduler": "DDIMScheduler" if calib.scheduler == "ddim" else type(pipe.scheduler).__name__,
                            "statistic": "H = mean x x^T over every token / conv output position, fp64, no damping",
                            "world_size": world, "dtype": str(torch_dtype).replace("torch.", ""),
                            "subsets": subsets_info},
        }
        save_artifact(pipe, out, manifest, source_dir=model_dir, overwrite=force)
        ckpt.remove()
    _barrier(world)
    return QuantizeResult(out, run.layer_stats, subsets_info, time.perf_counter() - start)


def _quantize_subset(run: _Run, subset: str) -> tuple[dict, dict, dict]:
    """Calibrate and quantize one subset's layers; (tensors by layer, stats by layer, subset info)."""
    from vqdm.quantizer import quantize_weight

    unet = run.pipe.unet
    layers = [(n, m) for n, m in select_layers(unet) if subset_of(n) == subset]
    modules = dict(layers)
    passes = plan_passes(layers, run.max_stats_bytes)
    tensors: dict[str, tuple] = {}
    stats: dict[str, dict] = {}
    calib_s = quant_s = 0.0
    quiet = not run.progress or run.rank != 0
    for p, names in enumerate(passes):
        label = subset if len(passes) == 1 else f"{subset} [{p + 1}/{len(passes)}]"
        t0 = time.perf_counter()
        with tqdm(desc=f"{label} calibration", unit="batch", leave=False, disable=quiet) as bar:
            calibrated = collect_hessians(run.pipe, names, run.calib, run.prompts, progress=bar)
        hessians, counts, groups = calibrated.hessians, calibrated.counts, calibrated.groups
        calib_s += time.perf_counter() - t0

        t0 = time.perf_counter()
        mine = _assign(names, modules, run.world)[run.rank]
        last_user = {owner: members[-1] for owner, members in groups.items()}
        shared_with = {m: owner for owner, members in groups.items() for m in members}
        with tqdm(total=len(mine), desc=f"{label} quantize", unit="layer", leave=False, disable=quiet) as bar:
            for name in names:
                if name in mine:
                    w = weight_matrix(modules[name]).detach().to(hessians[name].device, torch.float32)
                    torch.manual_seed(layer_seed(run.seed, name))
                    t1 = time.perf_counter()
                    qw = quantize_weight(w, hessians[name], _layer_config(run.aq, run.seed, name))
                    seconds = time.perf_counter() - t1
                    tensors[name] = (qw.codes.to("cpu", torch.uint8), qw.codebooks.detach().to("cpu", torch.float32),
                                     qw.scales.detach().to("cpu", torch.float32))
                    stats[name] = {"rel_error": _rel_error(qw, w, hessians[name]), "seconds": seconds}
                    bar.update(1)
                    bar.set_postfix(rel_error=f"{stats[name]['rel_error']:.3g}")
                if name == last_user.get(shared_with.get(name)):
                    for member in groups[shared_with[name]]:  # free a shared H once its last user is done
                        hessians.pop(member, None)
        if run.world > 1:
            _share_results(names, modules, run, mine, tensors, stats)
        for name in names:
            n, d = weight_matrix(modules[name]).shape
            stats[name].update(subset=subset, n=n, d=d, bits=layer_bits(n, d, run.aq.num_codebooks, 8, run.aq.group_size),
                               rows=counts.get(name, 0), shares_h_with=shared_with.get(name) if shared_with.get(name) != name else None)
        quant_s += time.perf_counter() - t0
    errors = sorted(s["rel_error"] for s in stats.values())
    info = {"subset": subset, "layers": len(layers), "calibration_seconds": calib_s, "quantization_seconds": quant_s,
            "median_rel_error": errors[len(errors) // 2] if errors else None, "passes": len(passes)}
    return tensors, stats, info


def _layer_config(aq, seed: int, name: str):
    """The run's AQConfig with its seed (if it has one) set per layer."""
    if "seed" in {f.name for f in dataclasses.fields(aq)}:
        return dataclasses.replace(aq, seed=layer_seed(seed, name))
    return aq


def _rel_error(qw, w: torch.Tensor, h: torch.Tensor) -> float:
    """L(Ŵ)/L(0) = tr(ΔW H ΔWᵀ) / tr(W H Wᵀ), from the quantizer's stats when it reports it."""
    value = getattr(qw, "rel_error", None)
    if value is None and isinstance(getattr(qw, "stats", None), dict):
        value = qw.stats.get("rel_error")
    if value is not None:
        return float(value)
    from vqdm.quantizer.layer.error import relative_error

    return float(relative_error(w, qw.dequantize(), h))


def _assign(names: list[str], modules: dict, world: int) -> list[set[str]]:
    """Split layers over ranks by size (largest first to the least loaded rank): same on every rank."""
    load = [0] * world
    shares: list[set[str]] = [set() for _ in range(world)]
    for name in sorted(names, key=lambda n: (-weight_matrix(modules[n]).numel(), n)):
        r = min(range(world), key=lambda i: (load[i], i))
        shares[r].add(name)
        load[r] += weight_matrix(modules[name]).numel()
    return shares


def _share_results(names: list[str], modules: dict, run: _Run, mine: set[str], tensors: dict, stats: dict) -> None:
    """Broadcast each layer's result from the rank that quantized it to all others."""
    dist = torch.distributed
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    owners = _assign(names, modules, run.world)
    k, g = run.aq.num_codebooks, run.aq.group_size
    for name in names:
        src = next(r for r, share in enumerate(owners) if name in share)
        n, d = weight_matrix(modules[name]).shape
        if name in mine:
            codes, books, scales = (t.to(dev) for t in tensors[name])
            extra = torch.tensor([stats[name]["rel_error"], stats[name]["seconds"]], dtype=torch.float64, device=dev)
        else:
            codes = torch.empty(n, d // g, k, dtype=torch.uint8, device=dev)
            books = torch.empty(k, 2**run.aq.nbits, g, dtype=torch.float32, device=dev)
            scales = torch.empty(n, dtype=torch.float32, device=dev)
            extra = torch.empty(2, dtype=torch.float64, device=dev)
        for t in (codes, books, scales, extra):
            dist.broadcast(t, src)
        tensors[name] = (codes.cpu(), books.cpu(), scales.cpu())
        stats[name] = {"rel_error": float(extra[0]), "seconds": float(extra[1])}


def _aq_dict(aq) -> dict:
    return {k: v for k, v in dataclasses.asdict(aq).items() if isinstance(v, (int, float, str, bool, type(None)))}


def _normalise(obj: dict) -> dict:
    # What the checkpoint compares must survive a JSON round trip unchanged (tuples -> lists).
    return json.loads(json.dumps(obj))
