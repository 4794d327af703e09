"""Teacher–student training that knows nothing about U-Nets (or any architecture).

The pieces every distillation here is made of: parameter groups with their own learning rates
(codebooks, scales, everything else), a warmup + cosine schedule, gradient clipping, and model
selection on a validation error (keep the best student, stop when it stops improving, never
return one worse than the input). `fit` puts them together for any student, loss and sample
stream; `vqdm distill` (U-Net, rounds of teacher trajectories, checkpoints) drives the same pieces
from its own loop, and `benchmarks/distill_minilm.py` calls `fit` on a BERT encoder.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn as nn

GROUPS = ("codebooks", "scales", "other")


def group_of(name: str) -> str:
    """Parameter group of a parameter name: a VQ layer's codebooks or scales, or anything else."""
    leaf = name.rsplit(".", 1)[-1]
    return leaf if leaf in ("codebooks", "scales") else "other"


@dataclass(frozen=True)
class OptimSettings:
    """Adam with one learning rate per group, warmup, cosine decay and gradient clipping."""

    lr: float  # "other": every non-quantized parameter (norms, biases, embeddings, dense layers)
    lr_codebooks: float
    lr_scales: float
    betas: tuple[float, float] = (0.9, 0.999)
    warmup: float = 0.1  # fraction of the steps with a linear ramp from 0
    min_lr_factor: float = 0.1  # the cosine decays to this fraction of each group's lr
    clip_grad_norm: float | None = 1.0  # over all trainable parameters; None: off

    def lrs(self) -> dict[str, float]:
        return {"codebooks": self.lr_codebooks, "scales": self.lr_scales, "other": self.lr}


def make_optimizer(named_params: dict[str, nn.Parameter], opt: OptimSettings) -> torch.optim.Adam:
    """Adam over `named_params`, one param group per GROUPS entry (empty groups left out)."""
    lrs = opt.lrs()
    groups = []
    for g in GROUPS:
        ps = [p for n, p in named_params.items() if group_of(n) == g]
        if ps:
            groups.append({"params": ps, "lr": lrs[g], "base_lr": lrs[g], "name": g})
    return torch.optim.Adam(groups, betas=opt.betas)


def error_lr_scale(error: float, reference_error: float | None, min_scale: float = 1e-3) -> float:
    """Multiplier of the learning rates for a student whose relative error (validation) is `error`.

    Adam moves every element by about lr per step whatever its gradient, so the rate that helps a
    far student breaks a close one (docs/distill.md). Presets give the rates for a student at
    `reference_error`; a closer student gets them scaled by error / reference_error, never up
    (min 1), and never below `min_scale`. Measured on the tiny models: 3e-4 suits K = 2 (error ≈
    0.2) and ruins K = 3 (≈ 0.05), which wants 3e-5..1e-4; a trained model's students are closer
    in output (0.003–0.013) but not in weights, and want rates 10–30× above error / reference
    (the floor). None: no scaling.
    """
    if reference_error is None or not math.isfinite(error):
        return 1.0
    return max(min_scale, min(1.0, error / reference_error))


def scale_learning_rates(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Multiply every group's base (and current) learning rate by `factor`, once, before training."""
    for g in optimizer.param_groups:
        g["base_lr"] *= factor
        g["lr"] *= factor


def lr_factor(step: int, total: int, opt: OptimSettings) -> float:
    """Multiplier of the base learning rates for optimizer step `step` (0-based) of `total`."""
    warm = int(round(opt.warmup * total))
    if step < warm:
        return (step + 1) / (warm + 1)
    span = max(1, total - warm)
    progress = min(1.0, (step - warm) / span)
    return opt.min_lr_factor + (1 - opt.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * progress))


def optimizer_step(optimizer: torch.optim.Optimizer, step: int, total: int, opt: OptimSettings) -> float:
    """Clip, set this step's learning rates, step, zero the gradients; returns the pre-clip grad norm."""
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    norm = float("nan")
    if params:
        max_norm = opt.clip_grad_norm if opt.clip_grad_norm is not None else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    f = lr_factor(step, total, opt)
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * f
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


@dataclass
class Selection:
    """Model selection on a validation error: the best student so far, and when to stop.

    `before` is the input's validation error (step 0). `best_*` track the best *trained* student
    (step > 0), so the caller can always tell how it compares to the input, even when it lost.
    """

    before: float
    patience: int  # evaluations without a new best before stopping
    min_delta: float = 0.0  # relative improvement that counts as new best
    # relative validation improvement over the input needed to call a student better: a student
    # that "wins" by less than the validation set's noise can lose on unseen prompts (measured:
    # −0.7% on 4 validation prompts, +13% on test; docs/distill.md)
    min_improvement: float = 0.0
    history: list[list[float]] = field(default_factory=list)  # [step, validation error]
    best_step: int = 0
    best_error: float = math.inf
    bad_evals: int = 0
    best_state: dict[str, torch.Tensor] | None = None

    def update(self, step: int, error: float, named_params: dict[str, nn.Parameter]) -> bool:
        """Record the validation error after `step` steps; True when training should stop."""
        self.history.append([step, error])
        if error < self.best_error * (1 - self.min_delta):
            self.best_step, self.best_error, self.bad_evals = step, error, 0
            self.best_state = {n: p.detach().clone() for n, p in named_params.items()}
        else:
            self.bad_evals += 1
        return self.bad_evals >= self.patience

    @property
    def improved(self) -> bool:
        """Whether the best trained student beats the input on validation by at least `min_improvement`."""
        return self.best_error < self.before * (1 - self.min_improvement)

    @property
    def relative_change(self) -> float | None:
        """best / before − 1 on validation (None before any trained student was evaluated)."""
        return None if math.isinf(self.best_error) else self.best_error / self.before - 1

    def restore_best(self, named_params: dict[str, nn.Parameter]) -> None:
        if self.best_state is None:
            return
        with torch.no_grad():
            for n, p in named_params.items():
                p.copy_(self.best_state[n])

    def to_dict(self) -> dict:
        """JSON part of the state (checkpoints, manifests); `best_state` travels separately."""
        return {"before": self.before, "patience": self.patience, "min_delta": self.min_delta,
                "min_improvement": self.min_improvement, "history": self.history, "best_step": self.best_step,
                "best_error": None if math.isinf(self.best_error) else self.best_error, "bad_evals": self.bad_evals}

    @classmethod
    def from_dict(cls, d: dict, best_state: dict[str, torch.Tensor] | None) -> "Selection":
        best = d["best_error"]
        return cls(before=d["before"], patience=d["patience"], min_delta=d["min_delta"],
                   min_improvement=d.get("min_improvement", 0.0), history=[list(h) for h in d["history"]], best_step=d["best_step"],
                   best_error=math.inf if best is None else best, bad_evals=d["bad_evals"], best_state=best_state)


@dataclass
class FitResult:
    selection: Selection
    loss_curve: list[float]
    steps_run: int
    stopped_early: bool


def fit(named_params: dict[str, nn.Parameter], loss_fn: Callable[[object], torch.Tensor], batches: Iterable,
        validate: Callable[[], float], total_steps: int, opt: OptimSettings, eval_every: int, patience: int,
        after_step: Callable[[], None] | None = None, min_improvement: float = 0.0,
        lr_reference_error: float | None = None, lr_min_scale: float = 1e-3,
        after_backward: Callable[[], None] | None = None,
        kept_with_best: dict[str, torch.Tensor] | None = None) -> FitResult:
    """Train `named_params` on `loss_fn(batch)` over `batches` (one per step), keep the best by `validate`.

    The student is whatever module owns `named_params`; `loss_fn` runs student and teacher (or
    reads recorded teacher outputs) and returns a scalar. At the end the parameters hold the best
    trained student by validation error (check `selection.improved` before using it: it needs a
    relative validation gain of at least `min_improvement`). With `lr_reference_error`, the rates
    of `opt` are scaled by `error_lr_scale(input's validation error, lr_reference_error, lr_min_scale)`.

    Hooks: `after_backward` runs between the backward and the optimizer step (e.g. carry dense
    weight gradients to codebooks), `after_step` after it (e.g. PV-tuning's code updates).
    `kept_with_best`: tensors that are not trained by the optimizer but change during training
    (PV-tuning's codes); they are saved with the best student and restored with it.
    """
    optimizer = make_optimizer(named_params, opt)
    sel = Selection(before=validate(), patience=patience, min_improvement=min_improvement)
    scale_learning_rates(optimizer, error_lr_scale(sel.before, lr_reference_error, lr_min_scale))
    state = {**named_params, **(kept_with_best or {})}
    curve: list[float] = []
    it = iter(batches)
    stopped, step = False, 0
    for step in range(total_steps):
        loss = loss_fn(next(it))
        loss.backward()
        if after_backward is not None:
            after_backward()
        optimizer_step(optimizer, step, total_steps, opt)
        if after_step is not None:
            after_step()
        curve.append(float(loss.detach()))
        if (step + 1) % eval_every == 0 or step + 1 == total_steps:
            if sel.update(step + 1, validate(), state):
                stopped = step + 1 < total_steps
                break
    sel.restore_best(state)
    return FitResult(sel, curve, step + 1, stopped)
