"""Progress of an interrupted `vqdm distill` run: one folder next to the output, safetensors + JSON.

    <out>.distill-checkpoint/
        state.json                      run identity, optimizer steps done, loss curve
        params-<step>.safetensors       every trainable U-Net parameter, fp32 (the master copy)
        adam-<step>.safetensors         Adam's exp_avg / exp_avg_sq / step per parameter name
        best-<step>.safetensors         the best student by validation so far (fp32), once there is one

Codes are not saved: they never change and come back from the student artifact. The tensors are
written first and the state that names them last (each by rename), so a crash mid-save leaves the
previous checkpoint intact. No pickles: the optimizer state is tensors by parameter name.
"""
from __future__ import annotations

import torch
from safetensors.torch import save

from vqdm.quantizer.checkpoint import STATE_FILE, Checkpoint, CheckpointError, atomic_write_bytes

ADAM_KEYS = ("exp_avg", "exp_avg_sq", "step")


class DistillCheckpoint(Checkpoint):
    FORMAT = "vqdm-distill-checkpoint"
    SUFFIX = ".distill-checkpoint"
    KIND = "distillation "

    def save(self, identity: dict, step: int, loss_curve: list[float], named_params: dict[str, torch.nn.Parameter],
             optimizer: torch.optim.Optimizer, extra: dict | None = None,
             best: dict[str, torch.Tensor] | None = None) -> None:
        """Record the state after `step` optimizer steps."""
        self.path.mkdir(parents=True, exist_ok=True)
        params = {n: p.detach().to("cpu", torch.float32).contiguous() for n, p in named_params.items()}
        adam = {}
        for n, p in named_params.items():
            for key, value in optimizer.state.get(p, {}).items():
                if key in ADAM_KEYS:
                    adam[f"{key}.{n}"] = torch.as_tensor(value).detach().to("cpu", torch.float32).reshape(-1).contiguous()
        files = {"params": f"params-{step}.safetensors", "adam": f"adam-{step}.safetensors"}
        atomic_write_bytes(self.path / files["params"], save(params, metadata={"format": self.FORMAT}))
        atomic_write_bytes(self.path / files["adam"], save(adam, metadata={"format": self.FORMAT}))
        if best is not None:
            files["best"] = f"best-{step}.safetensors"
            best_cpu = {n: t.detach().to("cpu", torch.float32).contiguous() for n, t in best.items()}
            atomic_write_bytes(self.path / files["best"], save(best_cpu, metadata={"format": self.FORMAT}))
        state = {"format": self.FORMAT, "version": self.VERSION, "identity": identity, "step": step, "files": files,
                 "loss_curve": loss_curve, "extra": extra or {}}
        self.write_state(state)
        keep = set(files.values()) | {STATE_FILE}
        for f in self.path.iterdir():  # older steps' tensors
            if f.name not in keep and f.suffix == ".safetensors":
                f.unlink()

    def read_best(self, state: dict) -> dict[str, torch.Tensor] | None:
        """The best student by validation saved with `state`, if any."""
        name = state["files"].get("best")
        return self.read_tensors(name) if name else None

    def restore(self, state: dict, named_params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
        """Copy the saved parameters into `named_params` and the Adam state into `optimizer`."""
        params, adam = (self.read_tensors(state["files"][kind]) for kind in ("params", "adam"))
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
