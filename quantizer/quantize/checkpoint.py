"""Progress of an interrupted `vqdm quantize` run: one folder next to the output, safetensors + JSON.

    <out>.checkpoint/
        state.json                      run identity (model hash, settings, seeds) and finished subsets
        subset-<i>-<name>.safetensors   <layer>.codes uint8, <layer>.codebooks fp32, <layer>.scales fp32

The tensors are exactly what was swapped into the student, and every random draw of the run is
derived from (seed, prompt index) or (seed, layer name), never from a running RNG stream, so
restoring the finished subsets and going on gives bit for bit the result of an uninterrupted run.
The folder has no model_index.json: nothing mistakes it for an artifact. Every write is a rename.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vqdm.errors import VQDMError

FORMAT = "vqdm-quantize-checkpoint"
VERSION = 1
STATE_FILE = "state.json"


class CheckpointError(VQDMError):
    """A checkpoint is missing, unreadable, or was made by a different run."""


def checkpoint_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".checkpoint")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class Checkpoint:
    path: Path

    @classmethod
    def for_output(cls, out: str | Path) -> "Checkpoint":
        return cls(checkpoint_dir(out))

    def exists(self) -> bool:
        return (self.path / STATE_FILE).is_file()

    def start(self, identity: dict[str, Any]) -> dict:
        """A fresh checkpoint (any old one removed) for a run with this identity."""
        self.remove()
        self.path.mkdir(parents=True)
        state = {"format": FORMAT, "version": VERSION, "identity": identity, "finished": []}
        self._write_state(state)
        return state

    def load(self, identity: dict[str, Any]) -> dict:
        """The saved state, after checking it belongs to a run with this identity."""
        sf = self.path / STATE_FILE
        if not sf.is_file():
            raise CheckpointError(f"{self.path}: no checkpoint to resume from (run without --resume to start)")
        try:
            state = json.loads(sf.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{sf}: unreadable checkpoint state ({e}); start over with --force") from None
        if state.get("format") != FORMAT or state.get("version") != VERSION:
            raise CheckpointError(f"{sf}: not a version-{VERSION} vqdm checkpoint; start over with --force")
        diff = _differences(state.get("identity", {}), identity)
        if diff:
            raise CheckpointError(f"{self.path}: checkpoint was made with different settings ({'; '.join(diff[:3])}); "
                                  "rerun with the same settings, or --force to start over")
        return state

    def save_subset(self, state: dict, index: int, subset: str,
                    tensors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                    layer_stats: dict[str, dict], info: dict | None = None) -> None:
        """Record a finished subset: its tensors first, then the state that points at them."""
        from safetensors.torch import save

        flat = {}
        for name, (codes, codebooks, scales) in tensors.items():
            flat[f"{name}.codes"] = codes.detach().to("cpu", torch.uint8).contiguous()
            flat[f"{name}.codebooks"] = codebooks.detach().to("cpu", torch.float32).contiguous()
            flat[f"{name}.scales"] = scales.detach().to("cpu", torch.float32).contiguous()
        file = f"subset-{index}-{subset}.safetensors"
        _atomic_write_bytes(self.path / file, save(flat, metadata={"format": FORMAT, "subset": subset}))
        state["finished"].append({"index": index, "subset": subset, "file": file, "layers": layer_stats,
                                  "info": info or {}})
        self._write_state(state)

    def load_subset(self, entry: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        f = self.path / entry["file"]
        try:
            flat = load_file(str(f))
        except (OSError, SafetensorError) as e:
            raise CheckpointError(f"{f}: unreadable checkpoint tensors ({e}); start over with --force") from None
        out = {}
        for name in entry["layers"]:
            try:
                out[name] = (flat[f"{name}.codes"], flat[f"{name}.codebooks"], flat[f"{name}.scales"])
            except KeyError:
                raise CheckpointError(f"{f}: tensors of {name} are missing; start over with --force") from None
        return out

    def remove(self) -> None:
        if self.path.exists():
            shutil.rmtree(self.path)

    def _write_state(self, state: dict) -> None:
        _atomic_write_bytes(self.path / STATE_FILE, json.dumps(state, indent=2).encode())


def _differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: checkpoint {a!r}, now {b!r}")
    return out
