"""Checks `vqdm distill` makes before any work: inputs that cannot work, outputs that could lose data."""
from __future__ import annotations

import logging
from pathlib import Path

from vqdm.errors import ConfigError, ModelFolderError
from vqdm.models import SingleFileOptions, base_unet_sha256, is_checkpoint_file, read_model_index
from vqdm.models.artifact import is_artifact, read_manifest, sha256_file
from vqdm.quantizer.distill.checkpoint import DistillCheckpoint

log = logging.getLogger(__name__)

# Text-side components whose outputs the samples carry: the student's must be the teacher's.
SHARED_COMPONENTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


def check_inputs(teacher: Path, student: Path, out: Path, ckpt: DistillCheckpoint, resume: bool, force: bool,
                 single_file: SingleFileOptions | None = None) -> dict:
    """Refuse wrong inputs and unsafe outputs before any work; return the student's manifest."""
    if resume and force:
        raise ConfigError("--resume and --force exclude each other: resume a run, or start over")
    read_model_index(teacher, single_file)
    if is_artifact(teacher):
        raise ModelFolderError(f"--teacher {teacher} is a vqdm artifact: the teacher is the original dense folder")
    manifest = read_manifest(student)
    for path in (teacher, student):
        o, p = out.resolve(), path.resolve()
        if o == p or p in o.parents or o in p.parents:
            raise ConfigError(f"--out {out} overlaps {path}: choose another output folder")
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists (use --force to overwrite, or choose another --out)")
    ckpt.check_flags(resume, force)
    base = (manifest.get("base_model") or {}).get("unet_sha256")
    if base is None:
        log.warning("%s does not record its base U-Net; cannot check it was quantized from %s", student, teacher)
    elif base != base_unet_sha256(teacher):
        raise ConfigError(f"--student {student} was quantized from another U-Net than --teacher {teacher} "
                          "(base_model.unet_sha256 differs): distill against the folder it was quantized from")
    files = manifest["files"]
    if is_checkpoint_file(teacher):  # its sha256 (matched above) covers its text encoders: the student's came from it
        return manifest
    for comp in SHARED_COMPONENTS:
        for f in sorted((teacher / comp).rglob("*")):
            rel = str(f.relative_to(teacher))
            if f.is_file() and rel in files and files[rel] != sha256_file(f):
                raise ConfigError(f"{student}/{rel} differs from the teacher's {rel}: student and teacher must use "
                                  "the same text encoders and tokenizers")
    return manifest
