"""`quantize_model`: a local SDXL / SDXL-Turbo folder to a VQ artifact, seven subsets in order (SPEC §3).

For each subset (down_blocks.0, .1, .2, mid_block, up_blocks.0, .1, .2):
  1. run the calibration trajectories through the student, whose earlier subsets are already
     quantized, with hooks collecting H for this subset's layers (`hessians`, `..sampling`);
  2. quantize every layer with `quantize_weight(W, H, AQConfig)`, seeded from (seed, layer name);
  3. swap the VQ layers in and record the subset in the checkpoint (`checkpoint`).
Then the artifact is written atomically by `save_artifact` and the checkpoint removed.

Under torchrun every rank runs its share of the prompts, H is all-reduced, the subset's layers are
split over the ranks and their results broadcast; rank 0 alone writes.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from tqdm.auto import tqdm

from vqdm.errors import ConfigError, ModelFolderError, VQDMError
from vqdm.models import (SUBSETS, SingleFileOptions, base_unet_sha256, detect_family, layer_bits, load_pipeline,
                         quantize_layers, read_model_index)
from vqdm.models import layers_in_subsets, parse_subsets, select_layers, weight_matrix
from vqdm.models.artifact import is_artifact, save_artifact
from vqdm.quantizer.layer.aq import quantize_weight
from vqdm.quantizer.layer.error import relative_error
from vqdm.quantizer.checkpoint import json_normalise
from vqdm.quantizer.quantize.checkpoint import QuantizeCheckpoint
from vqdm.quantizer.quantize.checks import check_paths
from vqdm.quantizer.quantize.config import layer_config, make_aq_config
from vqdm.quantizer.quantize.hessians import collect_hessians, dist_info, hessian_bytes, plan_passes
from vqdm.quantizer.recipes import recipe
from vqdm.quantizer.runtime import default_device, default_dtype
from vqdm.quantizer.sampling import (SamplingConfig, check_resolution, load_prompts, named_seed, prompts_digest,
                                     unet_evaluations)
from vqdm.vq_format import GROUP_SIZE, NBITS, VQFormat

log = logging.getLogger(__name__)


class QuantizeStopped(VQDMError):
    """The run stopped after a subset because it was asked to (debugging / tests); resume continues it."""


@dataclass
class QuantizeResult:
    out: Path
    layers: dict[str, dict]  # name -> {subset, n, d, rel_error, bits, seconds, rows}
    subsets: list[dict]  # per subset: name, layers, quantized, passes, H bytes, calibration/quantization seconds, resumed
    seconds: float
    projected_seconds: float | None = None  # the time plan's calibration + AQ seconds, when one was given


@dataclass
class _Run:
    """Everything a subset needs, fixed for the whole run."""

    pipe: Any
    calib: SamplingConfig
    prompts: list[str]
    aq: Any
    seed: int
    rank: int
    world: int
    max_stats_bytes: int | None
    progress: bool
    subsets: tuple[str, ...]  # the subsets to quantize; the others stay dense
    calibrate_skipped: bool  # still collect (and discard) the H of the others
    time_plan: Any = None  # a time_plan.TimePlan: the bar's ETA weighs each step by its projected seconds
    bar: Any = None  # the run's progress bar (`_progress_bar`)
    layer_stats: dict[str, dict] = field(default_factory=dict)
    subsets_info: list[dict] = field(default_factory=list)

    def advance(self, seconds: float, layers: int = 0) -> None:
        """Move the bar by a step's projected seconds (without a time plan: by its layers)."""
        if self.bar is None:
            return
        if layers:
            self.bar.layers_done += layers
            self.bar.set_postfix_str(f"{self.bar.layers_done}/{self.bar.layers_total} layers", refresh=False)
        self.bar.update(seconds if self.time_plan is not None else layers)


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


def quantize_model(model_dir: str | Path, preset: str, bits: int, out: str | Path, *,
                   calibration: SamplingConfig | None = None, aq_options: dict | None = None,
                   nbits: int = NBITS, group_size: int = GROUP_SIZE, resume: bool = False,
                   force: bool = False, device: str | None = None, dtype: str | torch.dtype | None = None,
                   max_stats_bytes: int | None = None, stop_after_subset: int | None = None,
                   subsets: str | Iterable[str] | None = None, calibrate_skipped: bool = False,
                   progress: bool = True, time_plan=None, single_file: SingleFileOptions | None = None) -> QuantizeResult:
    """Quantize the U-Net of the diffusers folder (or single-file checkpoint: `single_file`) `model_dir` to K=`bits` codebooks; write the artifact `out`.

    `preset` ('sdxl' / 'sdxl-turbo') picks the calibration recipe; `calibration` replaces it whole
    (build it with `recipe(preset).replace(steps=..., ...)`). `aq_options` are AQConfig
    fields (beam_size, ...). `calibration.seed` seeds everything. `max_stats_bytes` bounds the memory
    of the H sums held at once (a subset is then calibrated in several passes). `stop_after_subset`
    raises QuantizeStopped once that subset (0-6) is checkpointed, as an interruption would.
    `subsets` (names or "a,b"; default all seven) picks the subsets to quantize: the layers of the
    others stay dense in the artifact. `calibrate_skipped` still collects the others' H (and then
    discards it), to measure what calibrating them costs without paying for their AQ. `time_plan`
    (`time_plan.plan_time` of the same settings) makes the progress bar's ETA the projected seconds
    left, scaled by the measured pace so far.
    Raises ConfigError / ModelFolderError / FileExistsError / CheckpointError before any output is
    written when the inputs are wrong.
    """
    start = time.perf_counter()
    model_dir, out = Path(model_dir), Path(out)
    defaults = recipe(preset)  # an unknown preset is refused even when `calibration` is given
    calib = calibration if calibration is not None else defaults
    chosen = parse_subsets(subsets)
    VQFormat(bits, nbits, group_size).check_artifact()
    aq = make_aq_config(bits, nbits, group_size, **(aq_options or {}))
    family = _check_model(model_dir, preset, single_file)
    prompts = load_prompts(calib.prompts_file)
    ckpt = QuantizeCheckpoint.for_output(out)
    check_paths(model_dir, out, ckpt, resume, force)

    rank, world = dist_info()
    torch_dtype = default_dtype(dtype, default_device(device))
    pipe = _load_checked_pipeline(model_dir, calib, group_size, default_device(device), torch_dtype, single_file)

    identity = json_normalise({
        "unet_sha256": base_unet_sha256(model_dir), "preset": preset,
        "format": {"num_codebooks": bits, "nbits": nbits, "group_size": group_size},
        "aq": _aq_dict(aq), "seed": calib.seed, "calibration": calib.to_dict(), "prompts_sha256": prompts_digest(prompts),
        # only when not the default, so checkpoints of full runs keep their identity
        **({"subsets": list(chosen)} if chosen != SUBSETS else {}),
        **({"calibrate_skipped": True} if calibrate_skipped else {}),
    })  # not device, dtype or the memory budget: a run may resume elsewhere, or in more passes after an OOM
    state = _open_checkpoint(ckpt, identity, resume, rank, world)
    # one seed for latents, noise, row sampling and AQ
    run = _Run(pipe, calib, prompts, aq, calib.seed, rank, world, max_stats_bytes, progress, chosen, calibrate_skipped,
               time_plan)
    _quantize_subsets(run, ckpt, state, stop_after_subset)
    if rank == 0:
        manifest = {
            "quantization": {"method": "aq", **_aq_dict(aq), "seed": calib.seed, "subsets": list(chosen)},
            "layers": run.layer_stats,
            "base_model": {"name": model_dir.resolve().name, "family": family,
                           "unet_sha256": identity["unet_sha256"]},
            "calibration": _calibration_record(run, preset, identity["prompts_sha256"], torch_dtype),
        }
        # a single file's components are written from the loaded pipeline; a folder's are copied
        save_artifact(pipe, out, manifest, source_dir=model_dir if model_dir.is_dir() else None, overwrite=force)
        ckpt.remove()
    _barrier(world)
    return QuantizeResult(out, run.layer_stats, run.subsets_info, time.perf_counter() - start,
                          None if time_plan is None else time_plan.seconds)


def _load_checked_pipeline(model_dir: Path, calib: SamplingConfig, group_size: int, device: str,
                           dtype: torch.dtype, single_file: SingleFileOptions | None = None):
    """The dense pipeline, refused when the resolution or the group size does not fit its U-Net."""
    pipe = load_pipeline(model_dir, dtype=dtype, device=device, single_file=single_file)
    check_resolution(pipe, calib.resolution)
    indivisible = [n for n, m in select_layers(pipe.unet) if weight_matrix(m).shape[1] % group_size]
    if indivisible:
        raise ConfigError(f"group size {group_size} does not divide the input width of {indivisible[0]}")
    return pipe


def _check_model(model_dir: Path, preset: str, single_file: SingleFileOptions | None = None) -> str:
    """The family of the dense diffusers folder or single file `model_dir` (warned about when it is not `preset`'s)."""
    read_model_index(model_dir, single_file)
    if is_artifact(model_dir):
        raise ModelFolderError(f"{model_dir} is already a vqdm artifact: quantize the original diffusers folder")
    family = detect_family(model_dir, single_file)
    if family != preset:
        log.warning("%s looks like %s but --preset %s was given: calibrating with the %s recipe",
                    model_dir, family, preset, preset)
    return family


def _open_checkpoint(ckpt: QuantizeCheckpoint, identity: dict, resume: bool, rank: int, world: int) -> dict:
    """The run's checkpoint state: loaded on --resume, else started by rank 0 and read by the others."""
    if resume:
        state = ckpt.load(identity)
    elif rank == 0:
        state = ckpt.start(identity)
    _barrier(world)
    if rank != 0:
        state = ckpt.load(identity)
    return state


def _quantize_subsets(run: _Run, ckpt: QuantizeCheckpoint, state: dict, stop_after_subset: int | None) -> None:
    """Restore the checkpointed subsets into the student, then calibrate and quantize the rest in order."""
    unet, k, g = run.pipe.unet, run.aq.num_codebooks, run.aq.group_size
    for entry in state["finished"]:  # restore the student exactly as it was swapped in
        tensors = ckpt.load_subset(entry)
        quantize_layers(unet, k, lambda name, w, t=tensors: t[name], g, names=list(tensors))
        run.layer_stats.update(entry["layers"])
        run.subsets_info.append({**entry.get("info", {}), "resumed": True})
    done = {entry["index"] for entry in state["finished"]}
    if done:
        log.info("resuming: %d of %d subsets restored from %s", len(done), len(SUBSETS), ckpt.path)

    todo = [i for i, s in enumerate(SUBSETS) if s in run.subsets or run.calibrate_skipped]
    run.bar = bar = _progress_bar(run, done)
    for index, subset in enumerate(SUBSETS):
        if index in done or index not in todo:
            continue
        if subset in run.subsets:
            tensors, stats, info = _quantize_subset(run, subset)
        else:  # statistics only: the layers stay dense
            tensors, stats, info = {}, {}, _calibrate_subset(run, subset)
        quantize_layers(unet, k, lambda name, w: tensors[name], g, names=list(tensors))
        run.layer_stats.update(stats)
        run.subsets_info.append(info)
        if run.rank == 0:
            ckpt.save_subset(state, index, subset, tensors, stats, info)
        _barrier(run.world)
        log.info("subset %d/%d %s: %d layers, %s, calibration %.1f s in %d pass(es) (H %.2f GB), quantization %.1f s, "
                 "median rel. error %s", index + 1, len(SUBSETS), subset, info["layers"],
                 "quantized" if info["quantized"] else "statistics only, stays dense", info["calibration_seconds"],
                 info["passes"], info["h_bytes"] / 1e9, info["quantization_seconds"], info["median_rel_error"])
        if stop_after_subset is not None and index >= stop_after_subset:
            bar.close()
            raise QuantizeStopped(f"stopped after subset {index} ({subset}) as asked; "
                                  f"continue with --resume (checkpoint {ckpt.path})")
    bar.close()


def _progress_bar(run: _Run, done: set[int]):
    """The run's bar: layers done, and an ETA. With a time plan the bar counts projected seconds
    (each calibration pass and layer by its own), so tqdm's ETA (at the average pace, smoothing 0)
    is the projected time left scaled by how the run has kept to the projection so far."""
    todo = [s for i, s in enumerate(SUBSETS) if s in run.subsets and i not in done]
    done_layers = len(run.layer_stats)  # restored from the checkpoint
    total_layers = done_layers + len(layers_in_subsets(select_layers(run.pipe.unet), todo))
    if run.time_plan is not None:
        steps = {s["subset"]: s["calibration_seconds"] + s["aq_seconds"] for s in run.time_plan.subsets}
        total, initial = sum(steps.values()), sum(steps.get(SUBSETS[i], 0.0) for i in done)
    else:
        total, initial = total_layers, done_layers
    bar = tqdm(total=total, initial=initial, desc="quantize", smoothing=0,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]",
               disable=not run.progress or run.rank != 0)
    bar.layers_done, bar.layers_total = done_layers, total_layers
    bar.set_postfix_str(f"{done_layers}/{total_layers} layers", refresh=False)
    return bar


def _calibration_record(run: _Run, preset: str, prompts_sha256: str, dtype: torch.dtype) -> dict:
    """The manifest's "calibration" section."""
    calib = run.calib
    return {"preset": preset, **calib.to_dict(), "prompts_sha256": prompts_sha256,
            "prompt_lines": len(run.prompts), "unet_evaluations": unet_evaluations(calib),
            "scheduler": "DDIMScheduler" if calib.scheduler == "ddim" else type(run.pipe.scheduler).__name__,
            "statistic": "H = mean x x^T over every token / conv output position, fp64, no damping",
            "world_size": run.world, "dtype": str(dtype).replace("torch.", ""),
            "subsets": run.subsets_info}


def _h_bytes(calibrated, modules: dict) -> int:
    """Bytes of the fp64 H sums a pass held: one per sharing group."""
    return sum(hessian_bytes(modules[owner]) for owner in calibrated.groups)


def _calibrate_pass(run: _Run, subset: str, p: int, passes: list[list[str]]):
    """Collect H for pass `p` of a subset; (statistics, seconds)."""
    label = subset if len(passes) == 1 else f"{subset} [{p + 1}/{len(passes)}]"
    t0 = time.perf_counter()
    with tqdm(desc=f"{label} calibration", unit="batch", leave=False, disable=not run.progress or run.rank != 0) as bar:
        calibrated = collect_hessians(run.pipe, passes[p], run.calib, run.prompts, progress=bar)
    run.advance(run.time_plan.pass_seconds(subset, p) if run.time_plan is not None else 0.0)
    return calibrated, time.perf_counter() - t0


def _subset_info(subset: str, layers: list, passes: list, quantized: bool, calib_s: float, quant_s: float,
                 h_bytes: list[int], errors: list[float]) -> dict:
    errors = sorted(errors)
    return {"subset": subset, "layers": len(layers), "quantized": quantized, "calibration_seconds": calib_s,
            "quantization_seconds": quant_s, "median_rel_error": errors[len(errors) // 2] if errors else None,
            "passes": len(passes), "h_bytes": sum(h_bytes), "max_pass_h_bytes": max(h_bytes, default=0)}


def _calibrate_subset(run: _Run, subset: str) -> dict:
    """Collect one subset's H (in the same passes a quantizing run would) and discard it; the subset info."""
    layers = layers_in_subsets(select_layers(run.pipe.unet), [subset])
    passes = plan_passes(layers, run.max_stats_bytes)
    calib_s, h_bytes = 0.0, []
    for p in range(len(passes)):
        calibrated, seconds = _calibrate_pass(run, subset, p, passes)
        calib_s += seconds
        h_bytes.append(_h_bytes(calibrated, dict(layers)))
        del calibrated  # free this pass's H before the next one
    return _subset_info(subset, layers, passes, False, calib_s, 0.0, h_bytes, [])


def _quantize_subset(run: _Run, subset: str) -> tuple[dict, dict, dict]:
    """Calibrate and quantize one subset's layers; (tensors by layer, stats by layer, subset info)."""
    layers = layers_in_subsets(select_layers(run.pipe.unet), [subset])
    modules = dict(layers)
    passes = plan_passes(layers, run.max_stats_bytes)
    tensors: dict[str, tuple] = {}
    stats: dict[str, dict] = {}
    calib_s = quant_s = 0.0
    h_bytes: list[int] = []
    quiet = not run.progress or run.rank != 0
    for p, names in enumerate(passes):
        label = subset if len(passes) == 1 else f"{subset} [{p + 1}/{len(passes)}]"
        calibrated, seconds = _calibrate_pass(run, subset, p, passes)
        calib_s += seconds
        h_bytes.append(_h_bytes(calibrated, modules))

        t0 = time.perf_counter()
        mine = _assign(names, modules, run.world)[run.rank]
        shared_with = {m: owner for owner, members in calibrated.groups.items() for m in members}
        with tqdm(total=len(mine), desc=f"{label} quantize", unit="layer", leave=False, disable=quiet) as bar:
            _quantize_pass(run, names, modules, mine, calibrated, tensors, stats, bar)
        if run.world > 1:
            _share_results(names, modules, run, mine, tensors, stats)
            others = [n for n in names if n not in mine]  # the other ranks' layers, now done too
            run.advance(sum(run.time_plan.layer_seconds.get(n, 0.0) for n in others) if run.time_plan else 0.0,
                        layers=len(others))
        for name in names:
            n, d = weight_matrix(modules[name]).shape
            owner = shared_with.get(name)
            stats[name].update(subset=subset, n=n, d=d, bits=layer_bits(n, d, run.aq.num_codebooks, run.aq.nbits, run.aq.group_size),
                               rows=calibrated.counts.get(name, 0), shares_h_with=owner if owner != name else None)
        quant_s += time.perf_counter() - t0
    info = _subset_info(subset, layers, passes, True, calib_s, quant_s, h_bytes, [s["rel_error"] for s in stats.values()])
    return tensors, stats, info


def _quantize_pass(run: _Run, names: list[str], modules: dict, mine: set[str], calibrated, tensors: dict,
                   stats: dict, bar) -> None:
    """AQ of this rank's layers among `names`, each H freed once its last user is done."""
    hessians, groups = calibrated.hessians, calibrated.groups
    last_user = {owner: members[-1] for owner, members in groups.items()}
    shared_with = {m: owner for owner, members in groups.items() for m in members}
    for name in names:
        if name in mine:
            w = weight_matrix(modules[name]).detach().to(hessians[name].device, torch.float32)
            torch.manual_seed(named_seed(run.seed, name))
            t1 = time.perf_counter()
            qw = quantize_weight(w, hessians[name], layer_config(run.aq, run.seed, name))
            seconds = time.perf_counter() - t1
            tensors[name] = (qw.codes.to("cpu", torch.uint8), qw.codebooks.detach().to("cpu", torch.float32),
                             qw.scales.detach().to("cpu", torch.float32))
            stats[name] = {"rel_error": _rel_error(qw, w, hessians[name]), "seconds": seconds}
            bar.update(1)
            bar.set_postfix(rel_error=f"{stats[name]['rel_error']:.3g}")
            run.advance(run.time_plan.layer_seconds.get(name, 0.0) if run.time_plan is not None else 0.0, layers=1)
        if name == last_user.get(shared_with.get(name)):
            for member in groups[shared_with[name]]:  # free a shared H once its last user is done
                hessians.pop(member, None)


def _rel_error(qw, w: torch.Tensor, h: torch.Tensor) -> float:
    """L(Ŵ)/L(0) = tr(ΔW H ΔWᵀ) / tr(W H Wᵀ), from the quantizer's stats when it reports it."""
    value = getattr(qw, "rel_error", None)
    if value is None and isinstance(getattr(qw, "stats", None), dict):
        value = qw.stats.get("rel_error")
    if value is not None:
        return float(value)
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
    for name in names:
        src = next(r for r, share in enumerate(owners) if name in share)
        n, d = weight_matrix(modules[name]).shape
        if name in mine:
            codes, books, scales = (t.to(dev) for t in tensors[name])
            extra = torch.tensor([stats[name]["rel_error"], stats[name]["seconds"]], dtype=torch.float64, device=dev)
        else:
            codes, books, scales = run.aq.vq_format.empty(n, d, dev)  # filled by the broadcast
            extra = torch.empty(2, dtype=torch.float64, device=dev)
        for t in (codes, books, scales, extra):
            dist.broadcast(t, src)
        tensors[name] = (codes.cpu(), books.cpu(), scales.cpu())
        stats[name] = {"rel_error": float(extra[0]), "seconds": float(extra[1])}


def _aq_dict(aq) -> dict:
    return {k: v for k, v in dataclasses.asdict(aq).items() if isinstance(v, (int, float, str, bool, type(None)))}


