"""`vqdm eval` (SPEC §7)."""
from __future__ import annotations

import argparse
from pathlib import Path

from vqdm.models import add_single_file_flags, detect_family, single_file_options
from vqdm.quantizer.evaluate.config import NUM_PROMPTS, EvalConfig
from vqdm.quantizer.evaluate.run import check_args, evaluate
from vqdm.quantizer.runtime import DEVICE_HELP, DTYPE_HELP, DTYPES


def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "eval", help="compare artifacts with a reference model: U-Net error, PSNR/SSIM, CLIP, FID, image grid",
        description="Sample the same prompts and seeds with the reference and each candidate (only the U-Net "
                    "differs) and write DIR/eval.json, DIR/eval_meta.json, DIR/eval.md and DIR/grid.png.")
    e.add_argument("--reference", required=True, metavar="DIR_OR_FILE",
                   help="dense diffusers folder or single-file checkpoint (the original model)")
    e.add_argument("--candidate", required=True, action="append", metavar="DIR",
                   help="artifact, folder or single file (or a dense folder), to compare; repeat for several")
    e.add_argument("--out", required=True, metavar="DIR", help="folder for the results")
    e.add_argument("--prompts", metavar="FILE", help="prompt file, one per line (default: the packaged set)")
    e.add_argument("--num-prompts", type=int, default=NUM_PROMPTS, metavar="N",
                   help=f"prompts to sample (default {NUM_PROMPTS})")
    e.add_argument("--steps", type=int, metavar="S", help="sampling steps (default: SDXL 30, Turbo 4)")
    e.add_argument("--resolution", type=int, metavar="R", help="image side (default: SDXL 1024, Turbo 512)")
    e.add_argument("--guidance", type=float, metavar="G", help="CFG scale (default: SDXL 5, Turbo 0)")
    e.add_argument("--seed", type=int, default=0, metavar="N", help="prompt i uses seed (seed, i)")
    e.add_argument("--batch-size", type=int, default=1, metavar="N", help="prompts per pipeline call")
    e.add_argument("--grid-rows", type=int, default=4, metavar="N", help="prompts shown in grid.png")
    e.add_argument("--chunk-prompts", type=int, default=8, metavar="N",
                   help="prompts every model samples before their metrics are added up (memory: one chunk of images)")
    e.add_argument("--unet-mse-prompts", type=int, default=64, metavar="N",
                   help="prompts whose reference trajectories feed the per-step U-Net error (default 64; 0: skip)")
    e.add_argument("--clip-model", metavar="DIR", help="local transformers CLIP folder for the CLIP score")
    e.add_argument("--pickscore-model", metavar="DIR", help="local PickScore (CLIP-H) folder for PickScore")
    e.add_argument("--fid-stats", metavar="FILE", help="reference statistics .npz (mu, sigma) for FID")
    e.add_argument("--inception", metavar="FILE",
                   help="FID Inception-v3 weights as .safetensors (pytorch-fid's pt_inception-2015-12-05 converted: "
                        "torch.load(weights_only=True) then safetensors.torch.save_file)")
    e.add_argument("--device", help=DEVICE_HELP)
    e.add_argument("--dtype", choices=list(DTYPES), help=f"U-Net dtype {DTYPE_HELP}")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_single_file_flags(e)
    e.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    check_args([Path(c) for c in args.candidate], args.fid_stats, args.inception)  # before the reference is read
    # --steps 0 / --resolution 0: the family's default, as unset
    cfg = EvalConfig.for_family(
        detect_family(args.reference, single_file_options(args)), num_prompts=args.num_prompts, steps=args.steps or None, guidance=args.guidance,
        resolution=args.resolution or None, seed=args.seed, prompts_file=args.prompts, batch_size=args.batch_size,
        grid_rows=args.grid_rows, chunk_prompts=args.chunk_prompts, unet_mse_prompts=args.unet_mse_prompts)
    evaluate(args.reference, args.candidate, args.out, cfg, clip_model=args.clip_model,
             pickscore_model=args.pickscore_model, fid_stats=args.fid_stats, inception=args.inception,
             device=args.device, dtype=DTYPES.get(args.dtype), progress=not args.no_progress,
             single_file=single_file_options(args))
    print(Path(args.out, "eval.md").read_text())
    return 0
