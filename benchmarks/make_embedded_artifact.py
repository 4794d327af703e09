"""Make the prebuilt artifact the server's embedded default loads: the shipped trained digits model
(`tiny-sdxl-digits`, from `benchmarks/train_tiny.py`) quantized offline with the real per-layer
quantizer at a cheap setting.

    python benchmarks/make_embedded_artifact.py [--out vqdm/models/pretrained/tiny-sdxl-digits-vq2]
                                                [--codebooks 2] [--seed 0] [--codebook-dtype float16] [--force]

A step of its own rather than one of train_tiny.py: training takes an hour, quantizing takes
seconds, and the artifact must be remade from the shipped dense folder whenever the quantizer or
the format changes, without retraining. Run it again after train_tiny.py.

There is no calibration data, so H = identity: each layer minimises plain weight-space error
instead of output error; on this model that still draws legible digits (tests/server/
test_embedded.py has scikit-learn's judge score what the server serves). Until this script the
server did exactly this at every start. Hence:
  - one torch thread, as `served_image_hash.py` serves with: float reductions then run in one order;
  - codebooks and scales are stored as fp16, SPEC §6's format, so that the dense model and this
    artifact together stay within the repository's 10 MB allowance for the demo model (9.25 MB;
    float32 would be 10.76 MB). `--codebook-dtype float32` keeps the quantizer's output exactly,
    which serves the very images start-up quantization served (benchmarks/results/
    served_image_hash_after_redesign.json); fp16 changes them in the low bits, and the judge scores
    the same 80% (benchmarks/results/digits_accuracy.json);
  - the artifact shares the dense folder's text encoders, tokenizers, VAE and scheduler, listing
    their hashes in its manifest instead of copying them, so the two stay small together.
The manifest records the seed, the knobs, how long quantizing took and the median relative weight
error, which the server reports on /v1/models.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from vqdm.models import load_pipeline, quantize_layers
from vqdm.models.artifact import save_artifact, unet_fingerprint
from vqdm.models.digits import DIGITS_ARTIFACT_DIR, DIGITS_MODEL_DIR, DIGITS_PRESET
from vqdm.quantizer import AQConfig, quantize_weight
from vqdm.vq_format import VQFormat

# Cheap knobs: one round, few optimiser steps, greedy code search. The settings the shipped default
# was judged with (80% of digits recognised); cg_iters=0, no damping and no sequential passes keep
# them fixed as AQConfig's defaults move.
EMBEDDED_KNOBS = {"beam_size": 1, "adam_steps": 5, "cg_iters": 0, "damping": 0.0, "max_rounds": 1, "kmeans_iters": 5,
                  "init_passes": 0}
CALIBRATION = "none: H = identity (no calibration data for the embedded default)"


def quantize_digits(num_codebooks: int, seed: int):
    """(pipeline with a VQ U-Net, per-layer stats, seconds): every selected layer, H = identity."""
    fmt = VQFormat(num_codebooks)
    cfg = AQConfig(num_codebooks=fmt.num_codebooks, nbits=fmt.nbits, group_size=fmt.group_size, **EMBEDDED_KNOBS)
    pipe = load_pipeline(DIGITS_MODEL_DIR)
    stats: dict[str, dict] = {}

    def quantize(name: str, w: torch.Tensor):
        qw = quantize_weight(w, torch.eye(w.shape[1]), cfg)
        err = float((qw.dequantize() - w).square().sum() / w.square().sum().clamp_min(1e-30))
        stats[name] = {"rel_error": err, "seconds": round(qw.stats["seconds"], 4)}
        return qw.codes, qw.codebooks, qw.scales

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    quantize_layers(pipe.unet, fmt.num_codebooks, quantize, fmt.group_size)
    return pipe, stats, time.perf_counter() - t0


def manifest_fields(stats: dict[str, dict], seconds: float, seed: int) -> dict:
    errors = sorted(s["rel_error"] for s in stats.values())
    return {
        "quantization": {"method": "aq", "seed": seed, "settings": EMBEDDED_KNOBS, "hessian": "identity",
                         "quantize_seconds": round(seconds, 3),
                         "median_rel_weight_error": round(errors[len(errors) // 2], 6)},
        "layers": stats,
        "base_model": {"name": f"{DIGITS_PRESET} (trained on scikit-learn's handwritten digits)",
                       "unet_sha256": unet_fingerprint(source_dir=DIGITS_MODEL_DIR)},
        "calibration": CALIBRATION,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DIGITS_ARTIFACT_DIR)
    ap.add_argument("--codebooks", type=int, default=2, help="K (default 2: the shipped default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--codebook-dtype", choices=["float32", "float16"], default="float16",
                    help="codebooks and scales at rest (float16: SPEC's format, the shipped default; "
                         "float32: exactly the quantizer's output)")
    ap.add_argument("--force", action="store_true", help="overwrite --out")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    pipe, stats, seconds = quantize_digits(args.codebooks, args.seed)
    fields = manifest_fields(stats, seconds, args.seed)
    save_artifact(pipe, args.out, fields, source_dir=DIGITS_MODEL_DIR, overwrite=args.force,
                  codebook_dtype=getattr(torch, args.codebook_dtype), share_components=True)
    q = fields["quantization"]
    print(f"{args.out}: {len(stats)} layers, K={args.codebooks}, seed {args.seed}, quantized in "
          f"{q['quantize_seconds']:.1f}s, median relative weight error {q['median_rel_weight_error']:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
