"""Checks `vqdm quantize` makes before any work: outputs that could lose data or mix two runs."""
from __future__ import annotations

from pathlib import Path

from vqdm.errors import ConfigError
from vqdm.quantizer.quantize.checkpoint import QuantizeCheckpoint


def check_paths(model_dir: Path, out: Path, ckpt: QuantizeCheckpoint, resume: bool, force: bool) -> None:
    """Refuse, before any work, every output situation that could lose data or mix two runs."""
    if resume and force:
        raise ConfigError("--resume and --force exclude each other: resume a run, or start over")
    m, o = model_dir.resolve(), out.resolve()
    if o == m or m in o.parents or o in m.parents:
        raise ConfigError(f"--out {out} overlaps the source model folder {model_dir}: choose another output folder")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.exists() and not force:
        if resume:
            raise FileExistsError(f"{out} already exists: that run finished, nothing to resume (use --force to redo it)")
        raise FileExistsError(f"{out} already exists (use --force to overwrite, or choose another --out)")
    ckpt.check_flags(resume, force)
