"""The embedded default model: with no model configured the server serves the prebuilt artifact
that ships inside the package (`tiny-sdxl-digits-vq2`): the trained tiny SDXL-architecture model
that draws scikit-learn's handwritten digits at 32² (`benchmarks/train_tiny.py`), quantized offline
by `benchmarks/make_embedded_artifact.py` with the real per-layer quantizer at a cheap setting.

It loads through the same path as any artifact (`load_pipeline`: manifest read, every file's sha256
checked, a corrupt one refused with the file and the reason); nothing is quantized at start-up and
the server never imports `vqdm.quantizer`. The artifact was quantized with H = identity (no
calibration data): each layer minimises plain weight-space error; on this model that still draws
legible digits (tests/server/test_embedded.py has the scikit-learn judge score them).
"""
from __future__ import annotations

import logging
from pathlib import Path

from vqdm.errors import VQDMError
from vqdm.models import Preset
from vqdm.models.artifact import read_manifest
from vqdm.models.digits import DIGITS_ARTIFACT_DIR, DIGITS_PRESET

log = logging.getLogger("vqdm.server")

REMAKE = "python benchmarks/make_embedded_artifact.py"


def embedded_artifact(seed: int = 0, num_codebooks: int = 2) -> tuple[Path, Preset]:
    """(the prebuilt artifact's folder, its preset), after checking it is the one asked for.

    Only the manifest is read here; `load_pipeline` verifies every file when it loads the folder.
    """
    path = DIGITS_ARTIFACT_DIR
    if not path.is_dir():
        raise VQDMError(f"the embedded default artifact is missing from {path}: reinstall vqdm, or recreate it "
                        f"with `{REMAKE} --force`, or serve a folder with --model")
    q = read_manifest(path)["quantization"]
    made = (q.get("num_codebooks"), q.get("seed"))
    if made != (num_codebooks, seed):
        raise VQDMError(f"the embedded default ships quantized with K={made[0]} codebooks (seed {made[1]}), but "
                        f"K={num_codebooks}, seed {seed} was asked for: make that artifact with `{REMAKE} "
                        f"--codebooks {num_codebooks} --seed {seed} --out DIR` and serve it with --model DIR")
    log.info("embedded default: loading the prebuilt artifact %s (%s quantized offline with K=%d codebooks, "
             "seed %d; no calibration data, so H = identity: weight-space error, not output error)",
             path, DIGITS_PRESET, num_codebooks, seed)
    return path, Preset.from_name(DIGITS_PRESET)


def quantization_facts(manifest: dict) -> dict:
    """What /v1/models reports for the default beyond K/B/g: how its artifact was made, from the manifest."""
    q = manifest["quantization"]
    facts = {"quantize_seconds": q["quantize_seconds"], "median_rel_weight_error": q["median_rel_weight_error"]}
    log.info("embedded default: %d layers quantized offline in %.1fs (median relative weight error %.3g)",
             len(manifest["layers"]), facts["quantize_seconds"], facts["median_rel_weight_error"])
    return facts
