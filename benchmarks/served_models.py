"""Random-weight models to serve for a latency comparison: per pair, a dense diffusers folder and a
VQ artifact of the same preset, which shares the folder's text encoders, VAE and scheduler.

    python benchmarks/served_models.py --out DIR [--bits 3] [--device cuda] [--dtype float16] \
        sdxl_1024:sdxl:1024x1024:20 turbo_512:sdxl-turbo:512x512:4      # LABEL:PRESET:SIZE:STEPS

Writes DIR/LABEL-dense and DIR/LABEL-vq per pair, and DIR/models.json (what `bench_server.py
--compare-compile` reads): both paths and the request body each pair is sent. Pairs already in
models.json are kept, not made again. Weights are drawn on `--device` (seconds for the full-size
U-Net on a GPU, where a CPU takes minutes) and saved in `--dtype`; VQ codes are random like
bench_unet.py's: speed does not depend on their values.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_unet import randomize_vq  # noqa: E402  (sibling module)
from vqdm.models import build_pipeline, replace_with_vq  # noqa: E402
from vqdm.models.artifact import save_artifact  # noqa: E402


def make_pair(preset: str, bits: int, out: Path, label: str, device: str, dtype: torch.dtype) -> dict:
    """Write the dense folder and the VQ artifact; their paths."""
    with torch.device(device):  # every component's weights drawn where they are fast to draw
        pipe = build_pipeline(preset, seed=0, dtype=dtype)
    dense = out / f"{label}-dense"
    pipe.save_pretrained(dense, safe_serialization=True)
    pipe.unet.to(device)
    replace_with_vq(pipe.unet, num_codebooks=bits)
    pipe.unet.to(device=device, dtype=dtype)
    randomize_vq(pipe.unet, torch.Generator(device=device).manual_seed(0))
    vq = save_artifact(pipe, out / f"{label}-vq", {"base_model": {"name": f"{preset} (random weights)"},
                                                    "quantization": {"method": "random codes", "num_codebooks": bits}},
                       source_dir=dense, share_components=True)
    return {"dense": str(dense), "vq": str(vq)}


def parse_pair(text: str) -> tuple[str, str, str, int]:
    try:
        label, preset, size, steps = text.split(":")
        return label, preset, size, int(steps)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LABEL:PRESET:WxH:STEPS, e.g. turbo_512:sdxl-turbo:512x512:4")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pairs", nargs="+", type=parse_pair, metavar="LABEL:PRESET:WxH:STEPS")
    ap.add_argument("--bits", type=int, default=3, choices=(2, 3, 4))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    index = a.out / "models.json"
    models = json.loads(index.read_text()) if index.exists() else {}
    for label, preset, size, steps in a.pairs:
        if label in models:
            continue
        t0 = time.perf_counter()
        paths = make_pair(preset, a.bits, a.out, label, a.device, getattr(torch, a.dtype))
        models[label] = {**paths, "preset": preset, "bits": a.bits, "body": {"size": size, "num_inference_steps": steps}}
        index.write_text(json.dumps(models, indent=1) + "\n")  # after each pair: a stopped run keeps the first
        print(f"{label}: {paths['dense']} and {paths['vq']} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
