"""`vqdm generate`: one request's images without a server, through the same loader, validation and
runner as `vqdm serve`."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from vqdm.models import read_model_index, single_file_options
from vqdm.server.errors import APIError
from vqdm.server.imaging import FORMATS, encode_image
from vqdm.server.loader import load_model, resolve_device
from vqdm.server.loras import attach_loras
from vqdm.server.runner import Member, run_batch
from vqdm.server.schemas import ImageGenerationRequest, LoraChoice
from vqdm.server.settings import EMBEDDED_MODEL_ID, ModelSpec, Settings
from vqdm.server.validation import validate


def generate(args: argparse.Namespace, loras: list[tuple[Path, float]]) -> int:
    """Write `args.out` (numbered with -n > 1); `loras` are the parsed --lora (path, scale) pairs."""
    out = Path(args.out)
    ext = out.suffix.lower().lstrip(".")
    fmt = {"jpg": "jpeg"}.get(ext, ext)
    if fmt not in FORMATS:
        raise ValueError(f"{out}: unknown image type {out.suffix!r}; use .png, .jpg or .webp")
    names = [f"lora{i}-{path.stem}" for i, (path, _) in enumerate(loras)]
    settings = Settings(devices=[args.device], dtype=args.dtype, weight_cache=args.weight_cache,
                        max_n=max(args.n, 1), max_batch_size=max(args.n, 1),
                        loras=[f"{n}={p}" for n, (p, _) in zip(names, loras)], lora_memory_budget=str(1 << 50))
    device = resolve_device(args.device)
    spec = (ModelSpec("local", Path(args.model), single_file_options(args)) if args.model
            else ModelSpec(EMBEDDED_MODEL_ID, None))
    if spec.path is not None:
        read_model_index(spec.path, spec.single_file)  # a one-line error naming what is wrong with the folder
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
    sizes = params.size_fields()
    drawn = (f" (drawn at {sizes['generated_size']}, the trained size nearest it, and resized: size policy "
             f"{model.size_policy})" if "generated_size" in sizes else "")
    print(f"wrote {', '.join(map(str, paths))}: {sizes['size']}{drawn}, {params.steps} steps, "
          f"guidance {params.guidance:g}, seed {params.seed}, {outcome.total_s:.2f}s generation "
          f"(+{load_s:.1f}s loading {model.source})")
    if outcome.revised_prompts[0]:
        print(f"note: the prompt is longer than 77 CLIP tokens; the model read: {outcome.revised_prompts[0]!r}")
    return 0
