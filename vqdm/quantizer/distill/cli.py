"""`vqdm distill` (SPEC §7)."""
from __future__ import annotations

import argparse
from pathlib import Path

from vqdm.models import add_single_file_flags, read_model_index, single_file_options
from vqdm.quantizer.distill.run import distill
from vqdm.quantizer.distill.recipes import detect_recipe
from vqdm.quantizer.recipes import FAMILIES
from vqdm.quantizer.runtime import DTYPES, add_runtime_flags


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "distill", help="recover a quantized artifact's quality by teacher-student distillation",
        description="Train the student artifact's codebooks, scales and non-quantized U-Net parameters (codes "
                    "frozen) to match the dense teacher's U-Net outputs on teacher sampling trajectories. "
                    "Defaults follow SPEC 4 for the teacher's family (SDXL: 4 rounds x 512 prompts, 50 DDIM "
                    "steps, guidance 5, 1024^2, effective batch 64, 1,600 steps, lr 1e-6).")
    p.add_argument("--teacher", required=True, metavar="DIR_OR_FILE",
                   help="the original dense diffusers folder or single-file checkpoint")
    p.add_argument("--student", required=True, metavar="DIR|FILE",
                   help="vqdm artifact quantized from --teacher (a folder, or one file from `vqdm export --single-file`)")
    p.add_argument("--out", required=True, metavar="DIR", help="artifact folder to write")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    mode.add_argument("--force", action="store_true", help="start over, replacing --out and any old checkpoint")
    p.add_argument("--preset", choices=FAMILIES, help="recipe (default: detected from the teacher)")
    _add_trajectory_flags(p.add_argument_group("teacher trajectories (defaults from the preset)"))
    _add_optimisation_flags(p.add_argument_group("optimisation (defaults from the preset)"))
    add_runtime_flags(p, "--teacher-dtype", "teacher dtype", stop_flag="--stop-after-step")
    add_single_file_flags(p)
    p.set_defaults(func=cmd_distill)


def _add_trajectory_flags(t) -> None:
    t.add_argument("--prompts", metavar="FILE", help="prompt file, one per line (default: the packaged set, cycled)")
    t.add_argument("--num-prompts", type=int, metavar="N", help="prompts over all rounds")
    t.add_argument("--rounds", type=int, metavar="N", help="rounds of fresh prompts")
    t.add_argument("--steps", type=int, metavar="S", help="sampling steps (Turbo: the maximum; batches cycle 1..S)")
    t.add_argument("--resolution", type=int, metavar="R", help="image side in pixels")
    t.add_argument("--guidance", type=float, metavar="G", help="CFG scale (above 1: both CFG halves are trained)")
    t.add_argument("--seeds-per-prompt", type=int, metavar="N",
                   help="noise seeds per training prompt, each its own trajectory (default: enough for 32 "
                        "trajectories a round; 1 for the SPEC runs)")
    t.add_argument("--gen-batch-size", type=int, metavar="N", help="prompts per teacher pipeline call")
    t.add_argument("--val-prompts", type=int, metavar="N",
                   help="unseen prompts/seeds for model selection and early stopping (default 16)")
    t.add_argument("--test-prompts", type=int, metavar="N",
                   help="other unseen prompts/seeds, never used for selection: the reported figures (default 16; 0: skip)")


def _add_optimisation_flags(o) -> None:
    o.add_argument("--train-steps", type=int, metavar="T", help="optimizer steps over all rounds")
    o.add_argument("--batch-size", type=int, metavar="N", help="samples per micro-batch")
    o.add_argument("--grad-accum", type=int, metavar="N", help="micro-batches per step (effective batch = product)")
    o.add_argument("--lr", type=float, help="Adam learning rate of the non-quantized parameters (preset)")
    o.add_argument("--lr-codebooks", type=float, help="learning rate of the codebooks (preset)")
    o.add_argument("--lr-scales", type=float, help="learning rate of the per-row scales (preset)")
    rates = o.add_mutually_exclusive_group()
    rates.add_argument("--lr-reference-error", type=float, metavar="E",
                       help="the learning rates suit a student at this validation relative error; a closer "
                            "student gets them x (its error / E), never up (preset)")
    rates.add_argument("--flat-lr", action="store_true",
                       help="use the learning rates as given, not scaled by the student's error")
    o.add_argument("--lr-min-scale", type=float, metavar="F",
                   help="the error scaling never lowers the rates below F x the given ones (preset)")
    o.add_argument("--warmup", type=float, metavar="F", help="fraction of steps with a linear warmup (0.1)")
    o.add_argument("--clip-grad-norm", type=float, metavar="C", help="gradient norm clipping (1.0)")
    o.add_argument("--eval-every", type=int, metavar="N", help="steps between validations (train steps / 10)")
    o.add_argument("--patience", type=int, metavar="N", help="validations without improvement before stopping (5)")
    o.add_argument("--min-improvement", type=float, metavar="F",
                   help="relative validation gain over the input needed to write the student (0.02 = 2%%; "
                        "smaller gains may be noise)")
    o.add_argument("--allow-worse", action="store_true",
                   help="write the best student even if it does not beat the input on validation by "
                        "--min-improvement (default: write nothing and exit 1)")
    o.add_argument("--seed", type=int, metavar="N", help="seed of prompts' noise and sample order (default 0)")
    o.add_argument("--precision", choices=("auto", "bf16", "fp32"),
                   help="autocast for the student (auto: bf16 on CUDA, fp32 otherwise); master weights stay fp32")
    o.add_argument("--weight-grad", choices=("dense", "per-call"),
                   help="dense: decode weights once per step and accumulate dense gradients (fast, 8 B/weight); "
                        "per-call: decode inside every forward (least memory)")
    o.add_argument("--no-gradient-checkpointing", action="store_true", help="keep activations (more memory, faster)")
    o.add_argument("--checkpoint-every", type=int, metavar="N", help="save a resumable checkpoint every N steps (100)")
    o.add_argument("--pv-every", type=int, metavar="N",
                   help="PV-tuning: also update the codes every N optimizer steps, at no size cost (default 0: "
                        "off, codes frozen); needs --weight-grad dense. See docs/distill.md for when it helps")
    o.add_argument("--pv-step", type=float, metavar="ETA",
                   help="PV-tuning step, relative to each layer's weight rms, along Adam's direction (0.1)")
    o.add_argument("--pv-trust", type=float, metavar="F",
                   help="PV-tuning trust ratio: most fraction of each layer's code groups changed per update (0.003)")
    o.add_argument("--pv-until", type=float, metavar="F",
                   help="PV-tuning: no code updates after this fraction of the train steps (0.8)")


def cmd_distill(args: argparse.Namespace) -> int:
    opts = single_file_options(args, fallback_family=args.preset, fallback_source="from --preset")
    if args.preset is None:
        read_model_index(args.teacher, opts)  # a clear error for a wrong folder before detecting its family
    base = detect_recipe(Path(args.teacher), args.preset, opts)
    if args.rounds is None:  # small runs get fewer rounds (before the other overrides are checked)
        base = base.fit_rounds(args.num_prompts, args.gen_batch_size)
    cfg = base.replace(
        prompts_file=args.prompts, num_prompts=args.num_prompts, rounds=args.rounds, steps=args.steps,
        resolution=args.resolution, guidance=args.guidance, gen_batch_size=args.gen_batch_size,
        seeds_per_prompt=args.seeds_per_prompt, val_prompts=args.val_prompts, test_prompts=args.test_prompts, train_steps=args.train_steps,
        batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr, lr_codebooks=args.lr_codebooks,
        lr_scales=args.lr_scales, lr_reference_error=args.lr_reference_error, flat_lr=args.flat_lr or None,
        lr_min_scale=args.lr_min_scale,
        min_improvement=args.min_improvement, warmup=args.warmup, clip_grad_norm=args.clip_grad_norm, eval_every=args.eval_every,
        patience=args.patience, allow_worse=True if args.allow_worse else None, seed=args.seed, precision=args.precision,
        weight_grad=args.weight_grad, checkpoint_every=args.checkpoint_every, pv_every=args.pv_every,
        pv_step=args.pv_step, pv_trust=args.pv_trust, pv_until=args.pv_until,
        gradient_checkpointing=False if args.no_gradient_checkpointing else None)
    result = distill(args.teacher, args.student, args.out, cfg, device=args.device,
                     teacher_dtype=DTYPES.get(args.teacher_dtype), resume=args.resume, force=args.force,
                     stop_after_step=args.stop_after_step, progress=not args.no_progress, single_file=opts)
    curve = result.loss_curve
    print(f"distilled {len(curve)} steps: loss {curve[0]:.4g} -> {curve[-1]:.4g}" if curve else "no training steps")
    stop = f", stopped early after {len(curve)}" if result.stopped_early else ""
    print(f"validation relative error {result.val_error_before:.4g} -> {result.val_error_after:.4g} "
          f"(best at step {result.best_step}{stop})")
    if result.test_error_before is not None:
        before, after = result.test_error_before, result.test_error_after
        print(f"test relative error {before:.4g} -> {after:.4g} ({100 * (after / before - 1):+.1f}%)")
    print(f"wrote {result.out} in {result.seconds / 60:.1f} min")
    return 0
