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

from typing import Any

import torch
from safetensors.torch import save

from vqdm.quantizer.checkpoint import Checkpoint, CheckpointError, atomic_write_bytes


class QuantizeCheckpoint(Checkpoint):
    FORMAT = "vqdm-quantize-checkpoint"
    SUFFIX = ".checkpoint"

    def start(self, identity: dict[str, Any]) -> dict:
        """A fresh checkpoint (any old one removed) for a run with this identity."""
        self.remove()
        self.path.mkdir(parents=True)
        state = {"format": self.FORMAT, "version": self.VERSION, "identity": identity, "finished": []}
        self.write_state(state)
        return state

    def save_subset(self, state: dict, index: int, subset: str,
                    tensors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                    layer_stats: dict[str, dict], info: dict | None = None) -> None:
        """Record a finished subset: its tensors first, then the state that points at them."""
        flat = {}
        for name, (codes, codebooks, scales) in tensors.items():
            flat[f"{name}.codes"] = codes.detach().to("cpu", torch.uint8).contiguous()
            flat[f"{name}.codebooks"] = codebooks.detach().to("cpu", torch.float32).contiguous()
            flat[f"{name}.scales"] = scales.detach().to("cpu", torch.float32).contiguous()
        file = f"subset-{index}-{subset}.safetensors"
        atomic_write_bytes(self.path / file, save(flat, metadata={"format": self.FORMAT, "subset": subset}))
        state["finished"].append({"index": index, "subset": subset, "file": file, "layers": layer_stats,
                                  "info": info or {}})
        self.write_state(state)

    def load_subset(self, entry: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        flat = self.read_tensors(entry["file"])
        out = {}
        for name in entry["layers"]:
            try:
                out[name] = (flat[f"{name}.codes"], flat[f"{name}.codebooks"], flat[f"{name}.scales"])
            except KeyError:
                raise CheckpointError(f"{self.path / entry['file']}: tensors of {name} are missing; "
                                      "start over with --force") from None
        return out
