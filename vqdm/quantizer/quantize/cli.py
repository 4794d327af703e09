"""`vqdm quantize`: a local SDXL / SDXL-Turbo folder or single-file checkpoint to a VQ artifact (SPEC §7)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

import torch

from vqdm.errors import ConfigError
from vqdm.models import (SUBSETS, SingleFileOptions, add_single_file_flags, is_checkpoint_file, parse_subsets,
                         read_model_index, read_unet_config, single_file_options)
from vqdm.models.configs import PRESETS
from vqdm.models.single_file import describe
from vqdm.quantizer.quantize.checkpoint import QuantizeCheckpoint
from vqdm.quantizer.quantize.checks import check_paths
from vqdm.quantizer.quantize.budget import BUDGET_FIELDS, choose_rung, format_duration, parse_duration
from vqdm.quantizer.quantize.config import make_aq_config
from vqdm.quantizer.quantize.run import init_distributed, quantize_model
from vqdm.quantizer.quantize.time_plan import TimePlan, measure_rates, plan_time
from vqdm.quantizer.recipes import recipe
from vqdm.quantizer.sampling import SamplingConfig
from vqdm.quantizer.runtime import add_runtime_flags, default_device
from vqdm.vq_format import GROUP_SIZE, NBITS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize", help="quantize a local SDXL / SDXL-Turbo folder to a 2-4 bit VQ artifact",
        description="Calibrate on real sampling trajectories and quantize the U-Net with additive vector "
                    "quantization, seven subsets in order, checkpointing after each. Launch with torchrun "
                    "to spread prompts and layers over several GPUs.")
    p.add_argument("--model", required=True, metavar="DIR_OR_FILE",
                   help="local diffusers SDXL or SDXL-Turbo folder, or a single-file .safetensors checkpoint")
    p.add_argument("--preset", required=True, metavar="{sdxl,sdxl-turbo}",
                   help="calibration recipe: sdxl = 256 prompts x 50 DDIM steps, guidance 5, 1024^2; "
                        "sdxl-turbo = 10,240 prompts x 1-4 steps, guidance 0, 512^2")
    p.add_argument("--bits", required=True, type=int, metavar="{2,3,4}",
                   help="codebooks K of 2^8 codewords over groups of 8 weights: K bits per weight")
    p.add_argument("--out", required=True, metavar="DIR", help="artifact folder to write (must not exist)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue an interrupted run from its last finished subset")
    mode.add_argument("--force", action="store_true", help="start over, replacing --out and any old checkpoint")
    p.add_argument("--subsets", metavar="NAME,NAME",
                   help="quantize only these subsets (comma-separated, any order; run in calibration order); the "
                        "layers of the others stay dense fp16 in the artifact, whose manifest names the quantized "
                        f"subsets (default: all seven: {','.join(SUBSETS)})")
    p.add_argument("--calibrate-skipped", action="store_true",
                   help="with --subsets: still collect the H statistics of the other subsets, in order and in the "
                        "passes --max-stats-gb allows, then discard them (measures what calibrating a full run "
                        "costs, without its AQ)")
    _add_calibration_flags(p.add_argument_group("calibration (defaults from --preset)"))
    _add_aq_flags(p.add_argument_group("additive quantization"))
    p.add_argument("--time-budget", metavar="DURATION",
                   help="e.g. 90m, 2h, 3600s: pick the AQ search settings (passes, rounds, beam) whose projected "
                        "wall time on this machine fits, from a short probe; prints the choice and its measured "
                        "error cost against the defaults, or exits before any work when nothing fits")
    add_runtime_flags(p, "--dtype", "pipeline dtype while sampling", stop_flag="--stop-after-subset")
    add_single_file_flags(p)
    p.set_defaults(func=cmd_quantize)


def _add_calibration_flags(c) -> None:
    c.add_argument("--prompts", metavar="FILE", help="prompt file, one per line (default: the packaged set)")
    c.add_argument("--num-prompts", type=int, metavar="N", help="prompts to sample (the file is cycled with fresh seeds)")
    c.add_argument("--steps", type=int, metavar="S", help="sampling steps (Turbo: the maximum; batches cycle 1..S)")
    c.add_argument("--resolution", type=int, metavar="R", help="image side in pixels")
    c.add_argument("--guidance", type=float, metavar="G", help="CFG scale (above 1 runs both CFG halves)")
    c.add_argument("--seed", type=int, metavar="N", help="seed of latents, noise, row sampling and AQ (default 0)")
    c.add_argument("--batch-size", type=int, metavar="N", help="prompts per pipeline call")
    c.add_argument("--max-tokens-per-call", type=int, metavar="N",
                   help="sample at most N rows per layer and U-Net call (default: every token)")
    c.add_argument("--max-stats-gb", type=float, metavar="GB",
                   help="bound the H sums held at once; a subset is then calibrated in several passes")


def _add_aq_flags(q) -> None:
    q.add_argument("--codebook-bits", type=int, default=NBITS, metavar="B",
                   help=f"bits per code (only {NBITS} is supported)")
    q.add_argument("--group-size", type=int, default=GROUP_SIZE, metavar="G",
                   help=f"weights per group (only {GROUP_SIZE} is supported)")
    q.add_argument("--beam", type=int, metavar="N", help="beam width of the code search (default 8)")
    q.add_argument("--cg-iters", type=int, metavar="N",
                   help="least-squares codebook and scale fit each round: CG steps per fit, two fits a round "
                        "(default 20; --cg-iters 0 --adam-steps 100 is the paper's Adam recipe)")
    q.add_argument("--adam-steps", type=int, metavar="N",
                   help="Adam steps per round on codebooks and scales, after the fit (default 0)")
    q.add_argument("--max-rounds", type=int, metavar="N", help="cap on Adam + beam-search rounds per layer")
    q.add_argument("--kmeans-iters", type=int, metavar="N", help="Lloyd iterations per codebook at init (default 100)")
    q.add_argument("--init-passes", type=int, metavar="N",
                   help="after k-means, N passes choosing every code again with GPTQ's error feedback "
                        "(default 8; 0: the k-means init alone)")
    q.add_argument("--tolerance", type=float, metavar="F",
                   help="stop a layer's rounds when one lowers the error by less than this fraction (default 0.005)")
    q.add_argument("--damping", type=float, metavar="F",
                   help="search on H + F·mean(diag H)·I, errors still on H (default 0.2)")


# CLI flag -> AQConfig field, in one place.
AQ_FLAGS = {"beam": "beam_size", "cg_iters": "cg_iters", "adam_steps": "adam_steps", "max_rounds": "max_rounds", "kmeans_iters": "kmeans_iters",
            "damping": "damping", "init_passes": "init_passes", "tolerance": "relative_tolerance"}


def run_settings(args: argparse.Namespace, family: str) -> tuple[SamplingConfig, dict]:
    """(calibration recipe, AQ options) of the calibration and AQ flags, over `family`'s recipe."""
    calib = recipe(family).replace(
        prompts_file=args.prompts, num_prompts=args.num_prompts, steps=args.steps, resolution=args.resolution,
        guidance=args.guidance, seed=args.seed, batch_size=args.batch_size, max_rows_per_call=args.max_tokens_per_call)
    return calib, {field: getattr(args, flag) for flag, field in AQ_FLAGS.items()}


def max_stats_bytes(args: argparse.Namespace) -> int | None:
    return None if args.max_stats_gb is None else int(args.max_stats_gb * 2**30)


def project_run(args: argparse.Namespace, unet: torch.nn.Module, vae_scale_factor: int, calib: SamplingConfig,
                aq_options: dict, rates=None) -> TimePlan:
    """The time plan of a run of these flags on `unet` (meta device is enough), probed on this machine."""
    aq = dataclasses.replace(make_aq_config(args.bits, args.codebook_bits, args.group_size, **aq_options),
                             device=default_device(args.device))
    return plan_time(unet, aq, calib, calib.resolution // vae_scale_factor, parse_subsets(args.subsets),
                     args.calibrate_skipped, max_stats_bytes(args), rates)


def meta_unet(model: str | Path, single_file: SingleFileOptions | None = None) -> tuple[torch.nn.Module, int]:
    """(the U-Net of a diffusers folder or single-file checkpoint on the meta device, its VAE's scale
    factor): shapes only."""
    from diffusers import UNet2DConditionModel  # deferred: seconds to import

    read_model_index(model, single_file)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(read_unet_config(model, single_file))
    return unet, vae_scale_factor(model, single_file)


def vae_scale_factor(model: str | Path, single_file: SingleFileOptions | None = None) -> int:
    """The pixels per latent cell of a diffusers folder's or single-file checkpoint's VAE."""
    if is_checkpoint_file(model):  # the packaged preset whose every shape the file matches
        return PRESETS[describe(model, single_file).preset].vae_scale_factor
    vae = json.loads((Path(model) / "vae" / "config.json").read_text())
    return 2 ** (len(vae["block_out_channels"]) - 1)


def print_time_plan(tp: TimePlan) -> None:
    print(f"projected time:     {format_duration(tp.seconds)} on this machine (calibration "
          f"{format_duration(tp.calibration_seconds)}, AQ {format_duration(tp.aq_seconds)}; "
          f"probe took {tp.probe_seconds:.0f} s; loading and writing not counted)", flush=True)


def pick_budget_settings(args: argparse.Namespace, unet, vae_scale_factor: int, calib: SamplingConfig,
                         aq_options: dict) -> tuple[dict, TimePlan]:
    """The AQ options of the most thorough LADDER rung that fits --time-budget, and its time plan."""
    budget = parse_duration(args.time_budget)
    given = [flag for flag, field in AQ_FLAGS.items() if field in BUDGET_FIELDS and aq_options[field] is not None]
    if given:
        raise ConfigError(f"--time-budget chooses {', '.join('--' + f.replace('_', '-') for f in given)}: "
                          "drop one or the other")
    rates, plans = measure_rates(), {}

    def project(knobs: dict) -> float:
        plans[id(knobs)] = project_run(args, unet, vae_scale_factor, calib, {**aq_options, **knobs}, rates)
        return plans[id(knobs)].seconds

    rung, seconds = choose_rung(project, budget)
    flags = {field: flag for flag, field in AQ_FLAGS.items()}
    picked = " ".join(f"--{flags[k].replace('_', '-')} {v}" for k, v in rung.knobs.items()) or "the defaults"
    print(f"time budget {format_duration(budget)}: picked '{rung.name}' ({picked}), projected "
          f"{format_duration(seconds)}; expected error {rung.error_ratio:.2f}x the default settings' "
          f"(median over layers, benchmarks/results/aq_budget_ladder.json)", flush=True)
    return {**aq_options, **rung.knobs}, plans[id(rung.knobs)]


def cmd_quantize(args: argparse.Namespace) -> int:
    if args.calibrate_skipped and not args.subsets:
        raise ConfigError("--calibrate-skipped needs --subsets: without it every subset is calibrated and quantized")
    calib, aq = run_settings(args, args.preset)
    rank, _ = init_distributed()
    tp, sf_opts = None, single_file_options(args, fallback_family=args.preset, fallback_source="from --preset")
    if rank == 0 and (args.time_budget or not args.no_progress):  # the budget's choice, or the bar's ETA
        out = Path(args.out)  # the cheap refusals first (the model, then the paths), not after a minute of probing
        read_model_index(args.model, sf_opts)
        check_paths(Path(args.model), out, QuantizeCheckpoint.for_output(out), args.resume, args.force)
        unet, factor = meta_unet(args.model, sf_opts)
        if args.time_budget:
            aq, tp = pick_budget_settings(args, unet, factor, calib, aq)
        else:
            tp = project_run(args, unet, factor, calib, aq)
        print_time_plan(tp)
    result = quantize_model(
        args.model, args.preset, args.bits, args.out, calibration=calib, aq_options=aq, nbits=args.codebook_bits,
        group_size=args.group_size, resume=args.resume, force=args.force, device=args.device, dtype=args.dtype,
        max_stats_bytes=max_stats_bytes(args), stop_after_subset=args.stop_after_subset, subsets=args.subsets,
        calibrate_skipped=args.calibrate_skipped, progress=not args.no_progress, time_plan=tp,
        single_file=sf_opts)
    if rank == 0:
        print_summary(result)
    return 0


def print_summary(result) -> None:
    """Per-layer relative error, bits and seconds, then one line per subset and the totals."""
    layers = result.layers
    width = max(len(n) for n in layers)
    print(f"{'layer':<{width}}  {'n x d':>13}  {'rel.error':>9}  {'bits':>5}  {'seconds':>8}")
    for name, s in layers.items():
        print(f"{name:<{width}}  {s['n']:>6}x{s['d']:<6}  {s['rel_error']:>9.4g}  {s['bits']:>5.2f}  {s['seconds']:>8.2f}")
    print()
    for info in result.subsets:
        tag = " (from checkpoint)" if info.get("resumed") else ""
        if not info.get("quantized", True):
            tag = " (statistics only: stays dense)" + tag
        median = "-" if info["median_rel_error"] is None else f"{info['median_rel_error']:.4g}"
        passes = f" in {info['passes']} pass(es)" if "passes" in info else ""
        print(f"{info['subset']:<14} {info['layers']:>4} layers  median rel.error {median}  "
              f"calibration {info['calibration_seconds']:.1f} s{passes}  "
              f"quantization {info['quantization_seconds']:.1f} s{tag}")
    errors = [s["rel_error"] for s in layers.values()]
    weights = sum(s["n"] * s["d"] for s in layers.values())
    bits = sum(s["bits"] * s["n"] * s["d"] for s in layers.values()) / weights
    worked = sum(i["calibration_seconds"] + i["quantization_seconds"] for i in result.subsets if not i.get("resumed"))
    projected = "" if result.projected_seconds is None else \
        f" (calibration + AQ {worked:.1f} s, projected {result.projected_seconds:.1f} s)"
    print(f"\n{len(layers)} layers, median rel.error {statistics.median(errors):.4g}, max {max(errors):.4g}, "
          f"{bits:.2f} bits/weight on quantized layers, {result.seconds / 60:.1f} min{projected}; wrote {result.out}")
