"""Progress of an interrupted `vqdm distill` run: one folder next to the output, safetensors + JSON.

    <out>.distill-checkpoint/
        state.json                      run identity, optimizer steps done, loss curve
        params-<step>.safetensors       every trainable U-Net parameter, fp32 (the master copy)
        adam-<step>.safetensors         Adam's exp_avg / exp_avg_sq / step per parameter name

Codes are not saved: they never change and come back from the student artifact. The tensors are
written first and the state that names them last (each by rename), so a crash mid-save leaves the
previous checkpoint intact. No pickles: the optimizer state is tensors by parameter name.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from vqdm.quantizer.quantize.checkpoint import CheckpointError, _atomic_write_bytes, _differences

FORMAT = "vqdm-distill-checkpoint"
VERSION = 1
STATE_FILE = "state.json"
ADAM_KEYS = ("exp_avg", "exp_avg_sq", "step")


def checkpoint_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".distill-checkpoint")


@dataclass
class DistillCheckpoint:
    path: Path

    @classmethod
    def for_output(cls, out: str | Path) -> "DistillCheckpoint":
        return cls(checkpoint_dir(out))

    def exists(self) -> bool:
        return (self.path / STATE_FILE).is_file()

    def save(self, identity: dict, step: int, loss_curve: list[float], named_params: dict[str, torch.nn.Parameter],
             optimizer: torch.optim.Optimizer, extra: dict | None = None) -> None:
        """Record the state after `step` optimizer steps."""
        from safetensors.torch import save

        self.path.mkdir(parents=True, exist_ok=True)
        params = {n: p.detach().to("cpu", torch.float32).contiguous() for n, p in named_params.items()}
        adam = {}
        for n, p in named_params.items():
            for key, value in optimizer.state.get(p, {}).items():
                if key in ADAM_KEYS:
                    adam[f"{key}.{n}"] = torch.as_tensor(value).detach().to("cpu", torch.float32).reshape(-1).contiguous()
        files = {"params": f"params-{step}.safetensors", "adam": f"adam-{step}.safetensors"}
        _atomic_write_bytes(self.path / files["params"], save(params, metadata={"format": FORMAT}))
        _atomic_write_bytes(self.path / files["adam"], save(adam, metadata={"format": FORMAT}))
        state = {"format": FORMAT, "version": VERSION, "identity": identity, "step": step, "files": files,
                 "loss_curve": loss_curve, "extra": extra or {}}
        _atomic_write_bytes(self.path / STATE_FILE, json.dumps(state, indent=2).encode())
        keep = set(files.values()) | {STATE_FILE}
        for f in self.path.iterdir():  # older steps' tensors
            if f.name not in keep and f.suffix == ".safetensors":
                f.unlink()

    def load(self, identity: dict) -> dict:
        """The saved state, after checking it belongs to a run with this identity."""
        sf = self.path / STATE_FILE
        if not sf.is_file():
            raise CheckpointError(f"{self.path}: no distillation checkpoint to resume from (run without --resume)")
        try:
            state = json.loads(sf.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{sf}: unreadable checkpoint state ({e}); start over with --force") from None
        if state.get("format") != FORMAT or state.get("version") != VERSION:
            raise CheckpointError(f"{sf}: not a version-{VERSION} vqdm distillation checkpoint; start over with --force")
        diff = _differences(state.get("identity", {}), identity)
        if diff:
            raise CheckpointError(f"{self.path}: checkpoint was made with different settings ({'; '.join(diff[:3])}); "
                                  "rerun with the same settings, or --force to start over")
        return state

    def restore(self, state: dict, named_params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
        """Copy the saved parameters into `named_params` and the Adam state into `optimizer`."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        loaded = {}
        for kind in ("params", "adam"):
            f = self.path / state["files"][kind]
            try:
                loaded[kind] = load_file(str(f))
            except (OSError, SafetensorError) as e:
                raise CheckpointError(f"{f}: unreadable checkpoint tensors ({e}); start over with --force") from None
        params, adam = loaded["params"], loaded["adam"]
        if set(params) != set(named_params):
            diff = sorted(set(params) ^ set(named_params))
            raise CheckpointError(f"{self.path}: checkpoint parameters do not match the student (e.g. {diff[0]!r}); "
                                  "start over with --force")
        with torch.no_grad():
            for n, p in named_params.items():
                p.copy_(params[n])
        for n, p in named_params.items():
            if f"step.{n}" not in adam:
                continue  # never stepped (no gradient reached it)
            optimizer.state[p] = {
                "step": adam[f"step.{n}"].reshape(()),
                "exp_avg": adam[f"exp_avg.{n}"].to(p.device).reshape(p.shape),
                "exp_avg_sq": adam[f"exp_avg_sq.{n}"].to(p.device).reshape(p.shape),
            }

    def remove(self) -> None:
        if self.path.exists():
            shutil.rmtree(self.path)
