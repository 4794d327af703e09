"""`vqdm make-model`, `vqdm plan`, `vqdm inspect`, `vqdm export`."""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from vqdm.models.accounting import plan_unet
from vqdm.models.artifact import inspect_artifact
from vqdm.models.artifact_file import export_single_file
from vqdm.models.builders import build_unet, make_model, make_single_file
from vqdm.models.configs import PRESETS
from vqdm.models.layer_selection import SUBSETS, parse_subsets
from vqdm.models.loading import detect_family, is_checkpoint_file, read_model_index, read_unet_config
from vqdm.models.single_file import DTYPES, add_single_file_flags, single_file_options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-model", help="write an SDXL-architecture model with seeded random weights: a diffusers "
                                          "folder, or one original-layout .safetensors file")
    p.add_argument("preset", choices=list(PRESETS))
    dest = p.add_mutually_exclusive_group(required=True)
    dest.add_argument("--out", help="output diffusers folder (must not exist unless --force)")
    dest.add_argument("--single-file", metavar="FILE",
                      help="output .safetensors in the original SDXL layout (model.diffusion_model.*, conditioner.*, "
                           "first_stage_model.*), as A1111 / ComfyUI / stable-diffusion.cpp load; the same weights as "
                           "--out with the same seed")
    p.add_argument("--dtype", choices=list(DTYPES), help="--single-file tensor dtype (default fp16)")
    p.add_argument("--no-vae", action="store_true", help="--single-file without the VAE (first_stage_model.*)")
    p.add_argument("--no-metadata", action="store_true",
                   help="--single-file without the family metadata (vqdm.family, modelspec.architecture), as many "
                        "files in the wild: readers then need --family for a Turbo model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="overwrite an existing folder or file")
    p.set_defaults(func=cmd_make_model)

    p = sub.add_parser("plan", help="dry run on the meta device: what would be quantized, how big the artifact is")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=list(PRESETS))
    src.add_argument("--model", help="local diffusers SDXL / SDXL-Turbo folder, or a single-file .safetensors checkpoint")
    p.add_argument("--bits", type=int, choices=(2, 3, 4), required=True, help="codebooks K (B=8, g=8)")
    p.add_argument("--subsets", metavar="NAME,NAME",
                   help="price quantizing only these subsets (as `vqdm quantize --subsets`), the others dense fp16; "
                        f"default all: {','.join(SUBSETS)}")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_single_file_flags(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("inspect", help="show an artifact's config, layers, bits, bytes, errors and integrity")
    p.add_argument("artifact", help="artifact folder, or artifact file (`vqdm export --single-file`)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("export", help="write an artifact folder as one .safetensors file",
                       description="Write the VQ U-Net, both text encoders, the VAE, the manifest, configs and "
                                   "tokenizer files as one .safetensors file (layout: docs/architecture.md). Every "
                                   "command that takes an artifact folder takes that file.")
    p.add_argument("artifact", help="artifact folder (from `vqdm quantize` or `vqdm distill`)")
    p.add_argument("--single-file", required=True, metavar="FILE", help="the .safetensors file to write")
    p.add_argument("--components-fp16", action="store_true",
                   help="round the text encoders' and VAE's fp32 tensors to fp16, as single-file SDXL checkpoints "
                        "store them (default: every tensor as the folder has it, so the file loads exactly as the folder)")
    p.add_argument("--force", action="store_true", help="overwrite an existing FILE")
    p.set_defaults(func=cmd_export)


def cmd_make_model(args: argparse.Namespace) -> int:
    out = Path(args.out or args.single_file)
    if args.out and (args.dtype or args.no_vae or args.no_metadata):
        raise ValueError("--dtype, --no-vae and --no-metadata apply to --single-file; a folder is written in fp32, whole")
    if out.exists():
        if not args.force:
            raise FileExistsError(f"{out} already exists (use --force to overwrite)")
        if out.is_dir():
            shutil.rmtree(out)
    if args.single_file:
        dtype = args.dtype or "fp16"
        make_single_file(args.preset, out, seed=args.seed, dtype=DTYPES[dtype], include_vae=not args.no_vae,
                         metadata=not args.no_metadata)
        print(f"wrote {args.preset} (seed {args.seed}, {dtype}) to {out} ({out.stat().st_size / 1e9:.3f} GB)")
        return 0
    make_model(args.preset, out, seed=args.seed)
    print(f"wrote {args.preset} (seed {args.seed}) to {out}")
    return 0


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB"


def plan_model(args: argparse.Namespace) -> tuple[torch.nn.Module, dict, str | None]:
    """(the U-Net on the meta device, the plan, the model family: a preset's, or a single file's, which
    is logged with how it was decided; None for a folder) of `vqdm plan`'s --preset / --model, --bits,
    --subsets."""
    from diffusers import UNet2DConditionModel  # deferred: seconds to import; the CLI parser loads this module

    if args.preset:
        unet, family = build_unet(args.preset, device="meta"), PRESETS[args.preset].family
    else:
        opts = single_file_options(args)
        read_model_index(args.model, opts)
        family = detect_family(args.model, opts) if is_checkpoint_file(args.model) else None
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(read_unet_config(args.model, opts))
    return unet, plan_unet(unet, num_codebooks=args.bits, subsets=parse_subsets(args.subsets)).to_dict(), family


def cmd_plan(args: argparse.Namespace) -> int:
    _, plan, _ = plan_model(args)
    if args.json:
        print(json.dumps(plan, indent=2))
        return 0
    print_plan(plan)
    return 0


def print_plan(plan: dict) -> None:
    print(f"layers to quantize: {plan['layers']} ({plan['linear_layers']} Linear, {plan['conv_layers']} Conv2d)")
    if len(plan["subsets"]) < len(SUBSETS):
        print(f"subsets quantized:  {', '.join(plan['subsets'])} (the others stay dense fp16)")
    print(f"quantized weights:  {plan['quantized_weights']:,} of {plan['unet_params']:,} U-Net parameters")
    print(f"bits per weight:    {plan['bits_per_weight_quantized']:.2f} on quantized layers, "
          f"{plan['bits_per_weight_unet']:.2f} over the U-Net")
    print(f"U-Net bytes:        {_gb(plan['unet_bytes'])} vs {_gb(plan['dense_fp16_bytes'])} fp16 dense "
          f"({plan['compression_vs_fp16']:.2f}x smaller)")


def cmd_inspect(args: argparse.Namespace) -> int:
    info = inspect_artifact(args.artifact)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0 if info["integrity"] == "ok" else 1
    q = info["quantization"]
    print(f"artifact:     {info['path']} (format v{info['format_version']}, vqdm {info['tool']['version']})")
    print(f"base model:   {info['base_model']}")
    print(f"quantization: K={q['num_codebooks']} B={q['nbits']} g={q['group_size']} ({q.get('method')})")
    if len(info["subsets"]) < len(SUBSETS):
        dense = [x for x in SUBSETS if x not in info["subsets"]]
        print(f"subsets:      {len(info['subsets'])} of {len(SUBSETS)} quantized ({', '.join(info['subsets'])}); "
              f"dense fp16: {', '.join(dense)}")
    print(f"layers:       {info['layers']} ({info['linear_layers']} Linear, {info['conv_layers']} Conv2d)")
    print(f"bits/weight:  {info['bits_per_weight_quantized']:.2f} quantized, {info['bits_per_weight_unet']:.2f} U-Net")
    print(f"U-Net bytes:  {_gb(info['unet_bytes'])} vs {_gb(info['dense_fp16_bytes'])} fp16, "
          f"{_gb(info['dense_fp32_bytes'])} fp32 dense")
    if info["median_rel_error"] is not None:
        errs = sorted(e for e in info["layer_errors"].values() if e is not None)
        print(f"rel. error:   median {info['median_rel_error']:.4g}, max {errs[-1]:.4g} over {len(errs)} layers")
    if d := info.get("distillation"):
        before, after = d.get("test_error_before"), d.get("test_error_after")
        if before is not None and after is not None:
            print(f"distillation: test U-Net relative error {before:.4g} -> {after:.4g} "
                  f"({100 * (after / before - 1):+.1f}%), best of {d.get('steps_run')} steps at step {d.get('best_step')}")
        else:
            print(f"distillation: {len(d.get('loss_curve', []))} steps (no test figures recorded)")
    if "file_bytes" in info:
        print(f"single file:  {_size_vs_dense(info['file_bytes'], info['dense_fp16_file_bytes'])}")
    print(f"integrity:    {info['integrity']}")
    print(f"manifest:     sha256 {info['manifest_sha256']}")
    return 0 if info["integrity"] == "ok" else 1


def _size_vs_dense(file_bytes: int, dense_bytes: int) -> str:
    return (f"{_gb(file_bytes)} ({file_bytes:,} bytes) vs {_gb(dense_bytes)} as a dense fp16 file "
            f"({dense_bytes / file_bytes:.2f}x smaller; dense size computed at 2 bytes per parameter)")


def cmd_export(args: argparse.Namespace) -> int:
    out = Path(args.single_file)
    if out.suffix != ".safetensors":
        raise ValueError(f"--single-file {out}: name it *.safetensors (it is a safetensors file)")
    result = export_single_file(args.artifact, out, overwrite=args.force, components_fp16=args.components_fp16)
    print(f"wrote {result.path}: {_size_vs_dense(result.file_bytes, result.dense_fp16_bytes)}")
    return 0
