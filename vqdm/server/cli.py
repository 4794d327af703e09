"""`vqdm serve` (the HTTP server) and `vqdm generate` (one image without a server): their flags.

This module is imported to build the `vqdm` parser, for every command and for `--help`: it imports
only the standard library (and vqdm.single_file_flags, which does too). Each command imports what it runs when it runs (`vqdm.server.serve`,
`vqdm.server.generate`: fastapi, uvicorn, torch).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from vqdm.single_file_flags import add_single_file_flags

# `vqdm serve` flag → Settings field (flags win over VQDM_* variables).
_SERVE_FLAGS = {
    "host": "host", "port": "port", "model": "models", "api_key": "api_keys", "max_queue_size": "max_queue_size",
    "max_batch_size": "max_batch_size", "batch_wait_ms": "batch_wait_ms", "max_n": "max_n",
    "max_steps": "max_steps", "max_side": "max_side", "max_pixels": "max_pixels",
    "max_prompt_chars": "max_prompt_chars", "request_timeout": "request_timeout_s",
    "shutdown_timeout": "shutdown_timeout_s", "metrics_port": "metrics_port", "json_logs": "json_logs",
    "log_level": "log_level", "device": "devices", "dtype": "dtype", "backend": "backend",
    "weight_cache": "weight_cache", "no_warmup": "warmup", "warmup_size": "warmup_size",
    "stall_timeout": "stall_timeout_s", "cpu_threads": "cpu_threads", "advertise_url": "advertise_url", "peer": "peers",
    "peer_timeout": "peer_timeout_s",
    "lora": "loras", "lora_memory_budget": "lora_memory_budget", "no_verify_artifacts": "verify_artifacts",
    "compile": "compile", "compile_shape": "compile_shapes", "compile_backend": "compile_backend",
    "image_store_dir": "image_store_dir", "image_store_max_bytes": "image_store_max_bytes",
    "image_store_ttl": "image_store_ttl_s", "public_url": "public_url",
    "family": "single_file_family", "vae": "single_file_vae", "config": "single_file_config",
    "model_alias": "model_aliases", "route_unknown_models": "route_unknown_models", "size_policy": "size_policy",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible image API (FastAPI + uvicorn); VQDM_* variables also apply",
                       description="Serve models over HTTP. Every flag has a VQDM_<NAME> environment variable "
                                   "(see docs/server.md); flags win.")
    p.add_argument("--model", action="append", metavar="NAME=PATH",
                   help="a vqdm artifact (folder or single file), diffusers SDXL folder or single-file .safetensors "
                        "checkpoint (repeatable; a checkpoint's family from its metadata, else sdxl); none: the embedded "
                        "tiny default")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--api-key", action="append", metavar="KEY", help="require 'Authorization: Bearer KEY' (repeatable)")
    p.add_argument("--max-queue-size", type=int, help="waiting jobs before 429 (default 32)")
    p.add_argument("--max-batch-size", type=int, help="images per pipeline call (default 4; 1 turns batching off)")
    p.add_argument("--batch-wait-ms", type=float, help="when idle, wait this long for batch mates (default 0)")
    p.add_argument("--max-n", type=int)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--max-side", type=int)
    p.add_argument("--max-pixels", type=int)
    p.add_argument("--max-prompt-chars", type=int)
    p.add_argument("--request-timeout", type=float, metavar="SECONDS")
    p.add_argument("--shutdown-timeout", type=float, metavar="SECONDS",
                   help="drain bound: SIGTERM to exit takes at most this + 5 s (default 300)")
    p.add_argument("--metrics-port", type=int, help="also serve /metrics on this port")
    p.add_argument("--json-logs", action="store_const", const=True)
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    p.add_argument("--device", action="append", help="cpu, cuda:0, ... (repeatable: one worker each; default auto)")
    p.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"))
    p.add_argument("--backend", help="VQ kernel backend (default auto)")
    p.add_argument("--weight-cache", metavar="POLICY", help="none | request | budget=BYTES")
    p.add_argument("--no-warmup", action="store_const", const=False, help="skip the warm-up generation")
    p.add_argument("--no-verify-artifacts", action="store_const", const=False,
                   help="skip the sha256 of artifact files at start-up (the layout is still checked)")
    p.add_argument("--warmup-size", choices=("auto", "max", "default"),
                   help="max: the worst case the limits admit; default: the model's size; auto (default): max on GPU")
    p.add_argument("--compile", choices=("off", "auto", "default", "max-autotune", "reduce-overhead"),
                   help="torch.compile the U-Nets at start-up for the --compile-shape buckets (default off; auto: "
                        "per device type; reduce-overhead: CUDA graphs on GPUs)")
    p.add_argument("--compile-shape", action="append", metavar="ROWSxWIDTHxHEIGHT",
                   help="a shape to compile, rows as they reach the U-Net (2x1024x1024: one image with guidance; "
                        "repeatable; default: the model's size at 1..max-batch-size images)")
    p.add_argument("--compile-backend", metavar="NAME", help="torch.compile backend (default inductor)")
    p.add_argument("--stall-timeout", type=float, metavar="SECONDS",
                   help="no progress this long marks the server unhealthy (default 300; 0: off)")
    p.add_argument("--cpu-threads", type=int, help="torch threads (default: CPU quota and affinity, less one)")
    p.add_argument("--advertise-url", help="this replica's URL as peers reach it (job ids name it)")
    p.add_argument("--peer", action="append", metavar="URL|dns:HOST:PORT",
                   help="peer replica(s) for status/cancel of their jobs (repeatable)")
    p.add_argument("--peer-timeout", type=float, metavar="SECONDS",
                   help="a peer asked about a job must answer within this (default 2)")
    p.add_argument("--lora", action="append", metavar="NAME=PATH",
                   help="a LoRA .safetensors file, or a folder of them named after their stems (repeatable)")
    p.add_argument("--lora-memory-budget", metavar="BYTES", help="LoRA adapters per model and device, cached compute-dtype copies included (default 1GB)")
    p.add_argument("--image-store-dir", metavar="DIR",
                   help="folder for the images url replies link to; the same shared folder on every replica "
                        "(default: a private temporary folder)")
    p.add_argument("--image-store-max-bytes", type=int, metavar="BYTES",
                   help="image files kept before the oldest are removed (default 1 GiB)")
    p.add_argument("--image-store-ttl", type=float, metavar="SECONDS", help="URLs expire after this (default 3600)")
    p.add_argument("--public-url", metavar="URL",
                   help="base URL clients reach this server at, for url replies (default: the request's own)")
    add_single_file_flags(p)
    p.add_argument("--model-alias", action="append", metavar="ALIAS=MODEL",
                   help="another name for a served model, e.g. dall-e-3=sdxl-vq3 (repeatable; listed in /v1/models)")
    p.add_argument("--route-unknown-models", action="store_const", const=True,
                   help="run requests naming an unknown model on the first model (default: 400)")
    p.add_argument("--size-policy", choices=("auto", "nearest", "refuse", "any"),
                   help="a size the model was not trained at: nearest = generate at the nearest trained size and "
                        "resize; refuse = 400; any = as asked; auto (default): nearest for the embedded demo, else any")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("generate", help="generate one image locally, without a server")
    p.add_argument("prompt")
    p.add_argument("--model", help="vqdm artifact (folder or single file), diffusers SDXL folder or single-file "
                                   ".safetensors checkpoint (default: the embedded tiny model)")
    p.add_argument("-o", "--out", required=True, help="output file (.png, .jpg, .webp); with -n > 1 numbered")
    p.add_argument("--negative-prompt")
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("--size", help="WxH, e.g. 1024x1024 (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-n", type=int, default=1, help="images (seeds seed..seed+n-1)")
    p.add_argument("--scheduler")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"))
    p.add_argument("--weight-cache", default="none")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="apply a LoRA .safetensors file at SCALE (default 1; -2..2), repeatable")
    add_single_file_flags(p)
    p.set_defaults(func=cmd_generate)


def build_settings(args: argparse.Namespace):
    """Settings from VQDM_* variables with the given flags on top; a bad value is a one-line error."""
    from vqdm.server.settings import settings_from  # deferred: pydantic-settings and torch (module docstring)

    return settings_from({field: getattr(args, flag) for flag, field in _SERVE_FLAGS.items()
                          if getattr(args, flag, None) is not None})


def parse_generate_lora(text: str) -> tuple[Path, float]:
    """'PATH[:SCALE]' -> (path, scale); a trailing ':number' is the scale."""
    path, sep, tail = text.rpartition(":")
    if sep:
        try:
            return Path(path), float(tail)
        except ValueError:
            pass
    return Path(text), 1.0


def cmd_serve(args: argparse.Namespace) -> int:
    from vqdm.server.serve import serve  # deferred: fastapi, uvicorn and torch (module docstring)

    return serve(build_settings(args))


def cmd_generate(args: argparse.Namespace) -> int:
    from vqdm.server.generate import generate  # deferred: torch and diffusers (module docstring)

    return generate(args, [parse_generate_lora(t) for t in args.lora])
