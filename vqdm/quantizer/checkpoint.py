"""What the resumable runs (`vqdm quantize`, `vqdm distill`) share about their checkpoint folder.

A checkpoint is a folder next to the output holding `state.json` (the run's identity and progress)
and safetensors files. Every write is a rename, tensors first and the state that names them last,
so a crash mid-save leaves the previous checkpoint intact; a resume is refused unless the saved
identity equals the current run's.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from safetensors import SafetensorError
from safetensors.torch import load_file

from vqdm.errors import ConfigError, VQDMError

STATE_FILE = "state.json"


class CheckpointError(VQDMError):
    """A checkpoint is missing, unreadable, or was made by a different run."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """'key: checkpoint a, now b' for every leaf that differs between two nested dicts."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: checkpoint {a!r}, now {b!r}")
    return out


def json_normalise(obj: dict) -> dict:
    """`obj` as it reads back from state.json (tuples -> lists), so identities compare equal."""
    return json.loads(json.dumps(obj))


@dataclass
class Checkpoint:
    """Base of the run checkpoints; subclasses set FORMAT, VERSION, SUFFIX and KIND."""

    path: Path
    FORMAT: ClassVar[str]
    VERSION: ClassVar[int] = 1
    SUFFIX: ClassVar[str]  # folder name = output name + SUFFIX
    KIND: ClassVar[str] = ""  # in messages: "no {KIND}checkpoint to resume from"

    @classmethod
    def dir_for(cls, out: str | Path) -> Path:
        out = Path(out)
        return out.with_name(out.name + cls.SUFFIX)

    @classmethod
    def for_output(cls, out: str | Path):
        return cls(cls.dir_for(out))

    def exists(self) -> bool:
        return (self.path / STATE_FILE).is_file()

    def remove(self) -> None:
        if self.path.exists():
            shutil.rmtree(self.path)

    def check_flags(self, resume: bool, force: bool) -> None:
        """Refuse --resume without a checkpoint, and a leftover checkpoint without --resume or --force."""
        if resume and not self.exists():
            raise ConfigError(f"--resume: no checkpoint at {self.path} (run without --resume to start)")
        if self.exists() and not (resume or force):
            raise ConfigError(f"an interrupted run left a checkpoint at {self.path}: pass --resume to continue it "
                              "or --force to start over")

    def load(self, identity: dict[str, Any]) -> dict:
        """The saved state, after checking it belongs to a run with this identity."""
        sf = self.path / STATE_FILE
        if not sf.is_file():
            raise CheckpointError(f"{self.path}: no {self.KIND}checkpoint to resume from (run without --resume to start)")
        try:
            state = json.loads(sf.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{sf}: unreadable checkpoint state ({e}); start over with --force") from None
        if state.get("format") != self.FORMAT or state.get("version") != self.VERSION:
            raise CheckpointError(f"{sf}: not a version-{self.VERSION} vqdm {self.KIND}checkpoint; "
                                  "start over with --force")
        diff = differences(state.get("identity", {}), identity)
        if diff:
            raise CheckpointError(f"{self.path}: checkpoint was made with different settings ({'; '.join(diff[:3])}); "
                                  "rerun with the same settings, or --force to start over")
        return state

    def write_state(self, state: dict) -> None:
        atomic_write_bytes(self.path / STATE_FILE, json.dumps(state, indent=2).encode())

    def read_tensors(self, file: str) -> dict:
        f = self.path / file
        try:
            return load_file(str(f))
        except (OSError, SafetensorError) as e:
            raise CheckpointError(f"{f}: unreadable checkpoint tensors ({e}); start over with --force") from None
