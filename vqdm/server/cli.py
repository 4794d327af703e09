"""`vqdm serve` (the HTTP server) and `vqdm generate` (one image without a server)."""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from vqdm.errors import ConfigError

log = logging.getLogger("vqdm.server")

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
    "lora": "loras", "lora_memory_budget": "lora_memory_budget",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible image API (FastAPI + uvicorn); VQDM_* variables also apply",
                       description="Serve models over HTTP. Every flag has a VQDM_<NAME> environment variable "
                                   "(see docs/server.md); flags win.")
    p.add_argument("--model", action="append", metavar="NAME=PATH",
                   help="a vqdm artifact or diffusers SDXL folder (repeatable); none: the embedded tiny default")
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
    p.add_argument("--warmup-size", choices=("auto", "max", "default"),
                   help="max: the worst case the limits admit; default: the model's size; auto (default): max on GPU")
    p.add_argument("--stall-timeout", type=float, metavar="SECONDS",
                   help="no progress this long marks the server unhealthy (default 300; 0: off)")
    p.add_argument("--cpu-threads", type=int, help="torch threads (default: CPU quota and affinity, less one)")
    p.add_argument("--advertise-url", help="this replica's URL as peers reach it (job ids name it)")
    p.add_argument("--peer", action="append", metavar="URL|dns:HOST:PORT",
                   help="peer replica(s) for status/cancel of their jobs (repeatable)")
    p.add_argument("--lora", action="append", metavar="NAME=PATH",
                   help="a LoRA .safetensors file, or a folder of them named after their stems (repeatable)")
    p.add_argument("--lora-memory-budget", metavar="BYTES", help="LoRA weights per device (default 1GB)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("generate", help="generate one image locally, without a server")
    p.add_argument("prompt")
    p.add_argument("--model", help="vqdm artifact or diffusers SDXL folder (default: the embedded tiny model)")
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
    p.set_defaults(func=cmd_generate)


def build_settings(args: argparse.Namespace):
    """Settings from VQDM_* variables with the given flags on top; a bad value is a one-line error."""
    from pydantic import ValidationError

    from vqdm.server.settings import Settings

    overrides = {field: getattr(args, flag) for flag, field in _SERVE_FLAGS.items() if getattr(args, flag, None) is not None}
    try:
        return Settings(**overrides)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        raise ConfigError(f"{where}: {first['msg']}") from None


def _check_model_folders(settings) -> None:
    from vqdm.models import read_model_index
    from vqdm.server.loras import lora_specs

    for spec in settings.model_specs():
        if spec.path is not None:
            read_model_index(spec.path)  # raises ModelFolderError naming what is wrong
    for lora in lora_specs(settings.loras):
        if not lora.path.is_file():
            raise FileNotFoundError(f"lora {lora.name!r}: no such file {lora.path}")


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
    import os

    import uvicorn

    from vqdm.server import threads
    from vqdm.server.app import create_app, drain
    from vqdm.server.drain import FLUSH_S, DrainingServer
    from vqdm.server.logs import configure_logging

    settings = build_settings(args)
    _check_model_folders(settings)
    configure_logging(settings.log_level, settings.json_logs)
    threads.apply(settings.cpu_threads)
    failure: list[str] = []
    holder: dict = {}

    def on_fatal(error: str) -> None:
        failure.append(error)
        holder["server"].should_exit = True

    app = create_app(settings, on_fatal=on_fatal)
    # uvicorn's own graceful wait only flushes the replies the drain produced (server.drain).
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=FLUSH_S, lifespan="on")
    server = holder["server"] = DrainingServer(config, lambda: drain(getattr(app.state, "vqdm", None)))
    server.run()
    if failure:
        raise ConfigError(f"start-up failed: {failure[0]}")
    state = getattr(app.state, "vqdm", None)
    stuck = state.dispatcher.stuck_devices() if state is not None else []
    if stuck:  # a hung kernel would block interpreter exit (it joins worker threads): leave now
        log.critical("exiting with the worker on %s still stuck", ", ".join(stuck))
        logging.shutdown()
        os._exit(3)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from vqdm.server.errors import APIError
    from vqdm.server.imaging import FORMATS, encode_image
    from vqdm.server.loader import load_model, resolve_device
    from vqdm.server.runner import Member, run_batch
    from vqdm.server.schemas import ImageGenerationRequest
    from vqdm.server.settings import ModelSpec, Settings
    from vqdm.server.validation import validate

    out = Path(args.out)
    ext = out.suffix.lower().lstrip(".")
    fmt = {"jpg": "jpeg"}.get(ext, ext)
    if fmt not in FORMATS:
        raise ValueError(f"{out}: unknown image type {out.suffix!r}; use .png, .jpg or .webp")
    from vqdm.server.loras import attach_loras
    from vqdm.server.schemas import LoraChoice

    loras = [parse_generate_lora(t) for t in args.lora]
    names = [f"lora{i}-{path.stem}" for i, (path, _) in enumerate(loras)]
    settings = Settings(devices=[args.device], dtype=args.dtype, weight_cache=args.weight_cache,
                        max_n=max(args.n, 1), max_batch_size=max(args.n, 1),
                        loras=[f"{n}={p}" for n, (p, _) in zip(names, loras)], lora_memory_budget=str(1 << 50))
    device = resolve_device(args.device)
    spec = ModelSpec("local", Path(args.model)) if args.model else ModelSpec("vqdm-tiny-sdxl", None)
    if spec.path is not None:
        from vqdm.models import read_model_index

        read_model_index(spec.path)  # a one-line error naming what is wrong with the folder
    t0 = time.perf_counter()
    model = load_model(spec, settings, [device])
    attach_loras([model], settings)
    load_s = time.perf_counter() - t0
    try:
        params = validate(ImageGenerationRequest(
            prompt=args.prompt, model=model.id, n=args.n, size=args.size, negative_prompt=args.negative_prompt,
            num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed, scheduler=args.scheduler,
            output_format=fmt, loras=[LoraChoice(name=n, scale=s) for n, (_, s) in zip(names, loras)] or None),
            {model.id: model}, settings)
    except APIError as e:
        raise ValueError(e.message) from None
    outcome = run_batch(model.replicas[device], [Member(params)])
    paths = [out] if params.n == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(params.n)]
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, image in zip(paths, outcome.images[0]):
        path.write_bytes(encode_image(image, fmt))
    print(f"wrote {', '.join(map(str, paths))}: {params.width}x{params.height}, {params.steps} steps, "
          f"guidance {params.guidance:g}, seed {params.seed}, {outcome.total_s:.2f}s generation "
          f"(+{load_s:.1f}s loading {model.source})")
    if outcome.revised_prompts[0]:
        print(f"note: the prompt is longer than 77 CLIP tokens; the model read: {outcome.revised_prompts[0]!r}")
    return 0
