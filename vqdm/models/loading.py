"""Load a user's local SDXL / SDXL-Turbo model (never a hub download): a diffusers folder, a vqdm
artifact folder, or a single-file checkpoint in the original layout (vqdm/models/single_file.py).
Every command that takes a model goes through these functions, so each accepts all three."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from vqdm.errors import ModelFolderError
from vqdm.models import single_file as sf
from vqdm.models.artifact import (MANIFEST_FILE, components_dir, is_artifact, load_artifact, read_manifest, sha256_file,
                                  unet_fingerprint)
from vqdm.models.artifact_file import embedded_json, is_artifact_file
from vqdm.models.single_file import SingleFileOptions

log = logging.getLogger(__name__)

SUPPORTED_PIPELINES = ("StableDiffusionXLPipeline",)
REQUIRED_SUBFOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def is_checkpoint_file(path: str | Path) -> bool:
    """A dense single-file checkpoint where a model folder may be given: any file but a compressed vqdm
    artifact file (`vqdm export --single-file`), which the artifact loader reads."""
    path = Path(path)
    return path.is_file() and not is_artifact_file(path)


def read_model_index(path: str | Path, single_file: SingleFileOptions | None = None) -> dict:
    """model_index.json of a diffusers SDXL folder, with errors that say what is wrong (for a single
    file: its header checked, and the index its pipeline would have)."""
    path = Path(path)
    if is_artifact_file(path):  # a vqdm artifact exported as one file: artifact_file.py reads it
        return embedded_json(path, "model_index.json")
    if is_checkpoint_file(path):
        info = sf.describe(path, single_file)
        return {"_class_name": SUPPORTED_PIPELINES[0], "single_file": str(path), "preset": info.preset}
    if not path.is_dir():
        raise ModelFolderError(f"{path}: no such folder or file (expected a local diffusers SDXL or SDXL-Turbo folder, "
                               "or a single-file .safetensors checkpoint)")
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise ModelFolderError(f"{path}: not a diffusers pipeline folder (no model_index.json)")
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelFolderError(f"{index_file}: not valid JSON ({e})") from None
    cls = index.get("_class_name")
    if cls not in SUPPORTED_PIPELINES:
        raise ModelFolderError(
            f"{path}: pipeline class {cls!r} is not SDXL; vqdm supports {', '.join(SUPPORTED_PIPELINES)}"
        )
    missing = [s for s in REQUIRED_SUBFOLDERS if not (path / s).is_dir()]
    if missing and "unet" not in missing and (path / MANIFEST_FILE).is_file():
        missing = [s for s in missing if not (_components(path) / s).is_dir()]
    if missing:
        raise ModelFolderError(f"{path}: missing component folder(s) {', '.join(missing)}")
    return index


def _components(path: Path) -> Path:
    """Where the non-U-Net components are: the folder itself, or the folder an artifact shares them with."""
    return components_dir(path, read_manifest(path)) if (path / MANIFEST_FILE).is_file() else path


def read_unet_config(path: str | Path, single_file: SingleFileOptions | None = None) -> dict:
    if is_artifact_file(path):
        return embedded_json(path, "unet/config.json")
    if is_checkpoint_file(path):
        return sf.unet_config(path, single_file)
    cfg_file = Path(path) / "unet" / "config.json"
    if not cfg_file.is_file():
        raise ModelFolderError(f"{cfg_file}: missing U-Net config")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelFolderError(f"{cfg_file}: not valid JSON ({e})") from None


def detect_family(path: str | Path, single_file: SingleFileOptions | None = None) -> str:
    """'sdxl-turbo' when the scheduler is trailing-spaced Euler ancestral (Turbo's), else 'sdxl'. For a
    single file: --family, else its metadata, else 'sdxl'; logged with how it was decided."""
    if is_checkpoint_file(path):
        info = sf.describe(path, single_file)
        log.info("%s: family %s (%s); architecture %s, %s, %s", path, info.family, info.family_source, info.preset,
                 info.dtype, "VAE baked in" if info.has_vae else "no VAE baked in")
        return info.family
    if is_artifact_file(path):
        sched = embedded_json(path, "scheduler/scheduler_config.json")
    else:
        sched = json.loads((_components(Path(path)) / "scheduler" / "scheduler_config.json").read_text())
    turbo = sched.get("_class_name") == "EulerAncestralDiscreteScheduler" and sched.get("timestep_spacing") == "trailing"
    return "sdxl-turbo" if turbo else "sdxl"


def base_unet_sha256(path: str | Path) -> str:
    """sha256 naming a dense model's U-Net: of its U-Net weight files (a folder), or of the whole file."""
    return sha256_file(path) if is_checkpoint_file(path) else unet_fingerprint(source_dir=path)


def load_pipeline(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu", verify: bool = True,
                  single_file: SingleFileOptions | None = None):
    """A dense StableDiffusionXLPipeline from a local folder (or a vqdm artifact, folder or file, via the
    artifact loader; `verify=False` skips only the artifact's sha256 checks), or from a single-file checkpoint
    (`single_file`: what the file cannot say, e.g. its family or a VAE)."""
    from diffusers import StableDiffusionXLPipeline  # deferred: seconds to import; the CLI parser loads vqdm.models

    path = Path(path)
    if is_checkpoint_file(path):
        return sf.load_single_file(path, single_file, dtype=dtype, device=device)
    read_model_index(path)
    if is_artifact(path):  # a folder, or one file (vqdm export --single-file)
        return load_artifact(path, dtype=dtype, device=device, verify=verify)
    try:
        pipe = StableDiffusionXLPipeline.from_pretrained(path, dtype=dtype, local_files_only=True,
                                                         use_safetensors=True)
    except (OSError, ValueError, EnvironmentError) as e:
        raise ModelFolderError(f"{path}: could not load as an SDXL pipeline: {e}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
