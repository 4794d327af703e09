"""The embedded default model: with no model configured the server builds the `tiny-sdxl` pipeline
(seeded random weights, SDXL block structure), quantizes every selected U-Net layer with the real
per-layer quantizer at a cheap setting, and serves it. Offline, seconds, no files needed.

There is no calibration data at start-up, so H = identity: each layer minimises plain weight-space
error instead of output error. The images are noise either way (random weights); what this model
exercises is the whole serving path on genuine VQ layers.
"""
from __future__ import annotations

import logging
import time

log = logging.getLogger("vqdm.server")

EMBEDDED_PRESET = "tiny-sdxl"


# Cheap knobs for start-up: one round, few optimiser steps, greedy code search.
EMBEDDED_KNOBS = {"beam_size": 1, "adam_steps": 5, "max_rounds": 1, "kmeans_iters": 5}


def embedded_config(num_codebooks: int):
    """A quantizer setting that takes seconds for the whole tiny U-Net, not the paper's."""
    from vqdm.quantizer import AQConfig

    return AQConfig(num_codebooks=num_codebooks, nbits=8, group_size=8, **EMBEDDED_KNOBS)


def build_embedded(seed: int = 0, num_codebooks: int = 2):
    """(pipeline with a VQ U-Net, quantization facts for /v1/models, the preset)."""
    import torch

    from vqdm.models import Preset, build_pipeline, quantize_layers
    from vqdm.quantizer import quantize_weight

    preset = Preset.from_name(EMBEDDED_PRESET)
    pipe = build_pipeline(preset, seed=seed)
    cfg = embedded_config(num_codebooks)
    log.info("embedded default: building %s (seed %d) and quantizing it with K=%d codebooks; no calibration "
             "data at start-up, so H = identity (weight-space error, not output error)",
             EMBEDDED_PRESET, seed, num_codebooks)
    errors: list[float] = []

    def quantize(name: str, w: torch.Tensor):
        qw = quantize_weight(w, torch.eye(w.shape[1]), cfg)
        errors.append(float((qw.dequantize() - w).square().sum() / w.square().sum().clamp_min(1e-30)))
        return qw.codes, qw.codebooks, qw.scales

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    names = quantize_layers(pipe.unet, num_codebooks, quantize)
    seconds = time.perf_counter() - t0
    errors.sort()
    log.info("embedded default: quantized %d layers in %.1fs (median relative weight error %.3g)",
             len(names), seconds, errors[len(errors) // 2])
    extra = {"base_model": {"name": f"{EMBEDDED_PRESET} (seeded random weights, seed {seed})"},
             "calibration": "none: H = identity (no calibration data at start-up)",
             "quantize_seconds": round(seconds, 3),
             "median_rel_weight_error": round(errors[len(errors) // 2], 6)}
    return pipe, extra, preset
