"""Bytes of an artifact exported as one file (`vqdm export --single-file`) next to the same model
as a dense fp16 file.

Measured: the packaged digits artifact (tiny-sdxl-digits-vq2, K = 2) exported as it is and with
--components-fp16; its dense fp16 size is computed as `vqdm export` prints it (2 bytes per
parameter of the U-Net, text encoders and VAE; header not counted). Projected (nothing built):
full-size SDXL at K = 2, 3, 4 over all seven subsets, from parameter counts on the meta device:
the U-Net as `vqdm plan` prices it plus the text encoders and VAE in fp16 (as --components-fp16
writes them); the header (manifest, tokenizer files, hashes: a few MB) is not counted.

    python benchmarks/single_file_size.py --json benchmarks/results/single_file_size.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import machine  # noqa: E402  (sibling module)

from vqdm.models import Preset, build_unet, plan_unet  # noqa: E402
from vqdm.models.artifact_file import export_single_file  # noqa: E402
from vqdm.models.digits import DIGITS_ARTIFACT_DIR  # noqa: E402


def measured_tiny() -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, fp16 in (("as_stored", False), ("components_fp16", True)):
            r = export_single_file(DIGITS_ARTIFACT_DIR, Path(tmp) / f"{name}.safetensors", components_fp16=fp16)
            out[name] = {"file_bytes": r.file_bytes, "dense_fp16_bytes_computed": r.dense_fp16_bytes,
                         "smaller_than_dense": round(r.dense_fp16_bytes / r.file_bytes, 3)}
    return {"artifact": DIGITS_ARTIFACT_DIR.name, **out}


def component_params(preset: Preset) -> int:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        models = (CLIPTextModel(CLIPTextConfig(**preset.text_encoder)),
                  CLIPTextModelWithProjection(CLIPTextConfig(**preset.text_encoder_2)), AutoencoderKL.from_config(preset.vae))
    return sum(t.numel() for m in models for t in m.state_dict().values())


def projected_full(preset_name: str = "sdxl") -> dict:
    preset = Preset.from_name(preset_name)
    unet = build_unet(preset_name, device="meta")
    comp = component_params(preset)
    rows = {}
    for k in (2, 3, 4):
        plan = plan_unet(unet, num_codebooks=k)
        file_bytes = plan.unet_bytes + 2 * comp
        dense = plan.dense_fp16_bytes + 2 * comp
        rows[f"K{k}"] = {"bits_per_weight_unet": round(plan.bits_per_weight_unet, 3), "unet_bytes": plan.unet_bytes,
                         "file_bytes": file_bytes, "dense_fp16_bytes": dense,
                         "smaller_than_dense": round(dense / file_bytes, 3)}
    return {"preset": preset_name, "component_params": comp, "unet_params": plan.unet_params, **rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    result = {"machine": machine("cpu"), "measured_tiny": measured_tiny(), "projected_full_size": projected_full(),
              "notes": "dense fp16 bytes computed at 2 bytes per parameter (header not counted); full size projected "
                       "from parameter counts, not measured"}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
