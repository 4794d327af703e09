"""PV-tuning's discrete step: move a VQ layer's codes along the loss gradient, at no size cost.

Distillation trains codebooks and scales (the continuous "P" step); PV-tuning (Malinovskii et al.
2024, AQLM's follow-up) also updates the codes (the discrete "V" step). Here, every few optimizer
steps, for each VQ layer with decoded weight Ŵ and accumulated loss gradient G = dL/dŴ:

    target  W' = Ŵ − η · rms(Ŵ) · G / rms(G)        (a step of relative size η, per layer)
    codes   re-encoded against W' (identity H), each (row, group) on its own:
            argmin over the K codes of ‖w'_J − s_i · Σ_m C_m[b_m]‖²

Minimising ‖W' − Ŵ_new‖² = ‖ΔŴ‖² + 2η' G·ΔŴ + const is a proximal linearised step on the loss:
a code changes only where the gradient pushes its group closer to another codeword sum than the
current one. The "trust ratio" τ keeps at most τ of each layer's (row, group) pairs changed per
update, the ones whose distance to W' drops most; every accepted change lowers ‖W' − Ŵ‖ (with
identity H the groups are independent, so any subset of improving changes lowers it by exactly
the sum of their gains). Codes keep their shape, dtype and range; codebooks and scales are not
touched (the optimizer keeps training them).

`reencode` is the fast path (every (row, group) pair as one row of the existing AQ beam search,
`quantizer.layer.beam_search.search_group`, with H_JJ = I); `reencode_reference` enumerates every
K-tuple of codes (exact, for tests with small codebooks).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn as nn

from vqdm.quantizer.layer.beam_search import search_group
from vqdm.vq_format import decode, decode_groups

# (row, group) pairs per search chunk: [rows, beam, 2^B] fp32 scores = 32768·8·256·4 B = 256 MiB.
MAX_ROWS = 32768


@dataclass(frozen=True)
class PVSettings:
    """When and how far the codes move (see the module docstring)."""

    every: int  # optimizer steps between code updates (the gradient is summed over them)
    step_size: float = 0.5  # η: the target's distance from Ŵ, in units of rms(Ŵ), along −G/rms(G)
    trust_ratio: float = 0.01  # τ: at most this fraction of each layer's (row, group) pairs change per update
    beam_size: int = 4  # beam of the search over the K codes of a group

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"PV-tuning: every must be at least 1 step, got {self.every}")
        if not self.step_size > 0:
            raise ValueError(f"PV-tuning: step size must be positive, got {self.step_size}")
        if not 0 < self.trust_ratio <= 1:
            raise ValueError(f"PV-tuning: trust ratio must lie in (0, 1], got {self.trust_ratio}")
        if self.beam_size < 1:
            raise ValueError(f"PV-tuning: beam size must be at least 1, got {self.beam_size}")


@torch.no_grad()
def reencode(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, target: torch.Tensor,
             beam_size: int = 4, generator: torch.Generator | None = None, max_rows: int = MAX_ROWS
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes closer to `target` [n, d] per (row, group): (new codes [n, d/g, K], gain [n, d/g]).

    gain = ‖w'_J − s·u_old‖² − ‖w'_J − s·u_new‖² ≥ 0 (0 where the codes stay). Beam search over the
    K codes of each group, codebooks visited in one shuffled order; never worse than the old codes.
    """
    n, groups, k = codes.shape
    g = codebooks.shape[2]
    dt = codebooks.dtype
    rows = n * groups
    t_all = target.to(dt).reshape(rows, g)
    c_all = codes.long().reshape(rows, k)
    s_all = scales.to(dt).repeat_interleave(groups)  # scale of each (row, group) pair
    eye = torch.eye(g, dtype=dt, device=codebooks.device)
    order = torch.randperm(k, generator=generator).tolist()
    new = torch.empty_like(c_all)
    gain = torch.empty(rows, dtype=dt, device=codebooks.device)
    for r0 in range(0, rows, max_rows):
        sl = slice(r0, min(rows, r0 + max_rows))
        c = c_all[sl]
        u = decode_groups(c, codebooks)
        # With H = I: T = w'_J; score(v) = s²‖v‖² − 2 s v·w'_J = ‖w'_J − s v‖² − ‖w'_J‖².
        nc, _, old_score, new_score = search_group(t_all[sl], eye, u, c, codebooks, s_all[sl], beam_size, order)
        new[sl] = nc
        # the search scores a kept code by another formula than the old one: float noise, not a gain
        gain[sl] = torch.where((nc != c).any(-1), old_score - new_score, torch.zeros_like(old_score))
    return new.reshape(n, groups, k).to(codes.dtype), gain.clamp_min(0).reshape(n, groups)


@torch.no_grad()
def reencode_reference(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, target: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of `reencode`: every K-tuple of codes tried (float64); the exact optimum per group.

    Ties keep the old codes. Cost 2^(B·K) per group: only for tests with small codebooks.
    """
    n, groups, k = codes.shape
    q, g = codebooks.shape[1], codebooks.shape[2]
    books = codebooks.double()
    t = target.double().reshape(n, groups, g)
    s = scales.double()[:, None, None]
    tuples = torch.tensor(list(itertools.product(range(q), repeat=k)), dtype=torch.long)  # [q^K, K]
    sums = decode_groups(tuples, books)  # [q^K, g]
    dist = ((t[:, :, None, :] - s[..., None] * sums[None, None]) ** 2).sum(-1)  # [n, G, q^K]
    old = ((t - s * decode_groups(codes.long(), books)) ** 2).sum(-1)
    best_dist, best = dist.min(-1)
    better = best_dist < old
    new = torch.where(better[..., None], tuples[best], codes.long())
    return new.to(codes.dtype), torch.where(better, old - best_dist, torch.zeros_like(old))


def limit_changes(old: torch.Tensor, new: torch.Tensor, gain: torch.Tensor, trust_ratio: float) -> torch.Tensor:
    """`new` where its gain is among the ⌊τ · pairs⌋ largest positive gains of the layer, else `old` (old's dtype)."""
    flat = gain.reshape(-1)
    budget = int(trust_ratio * flat.numel())
    keep = torch.zeros_like(flat, dtype=torch.bool)
    if budget > 0:
        top = flat.topk(min(budget, flat.numel())).indices
        keep[top] = flat[top] > 0
    return torch.where(keep.reshape(gain.shape)[..., None], new.to(old.dtype), old)


@torch.no_grad()
def pv_target(w_hat: torch.Tensor, grad: torch.Tensor, step_size: float) -> torch.Tensor:
    """W' = Ŵ − η · rms(Ŵ) · G / rms(G): a step of relative size η against the gradient."""
    g = grad.to(w_hat.dtype)
    g_rms = g.square().mean().sqrt()
    if not torch.isfinite(g_rms) or g_rms == 0:
        return w_hat.clone()
    return w_hat - step_size * w_hat.square().mean().sqrt() * g / g_rms


@torch.no_grad()
def update_codes(module: nn.Module, grad: torch.Tensor, settings: PVSettings,
                 generator: torch.Generator | None = None) -> dict:
    """PV step for one VQ module (VQLinear / VQConv2d) given dL/dŴ `grad` [n, d]; codes changed in place.

    Returns {"changed": fraction of (row, group) pairs whose codes changed, "objective_before",
    "objective_after": ‖W' − Ŵ‖² before and after}. Codebooks and scales are left as they are.
    """
    codebooks, scales = module.codebooks.detach(), module.scales.detach()
    if tuple(grad.shape) != (module.n, module.d):
        raise ValueError(f"weight gradient has shape {tuple(grad.shape)}, the layer's weight is {(module.n, module.d)}")
    w_hat = decode(module.codes, codebooks, scales)
    target = pv_target(w_hat, grad.to(w_hat.device), settings.step_size)
    new, gain = reencode(module.codes, codebooks, scales, target, settings.beam_size, generator)
    new = limit_changes(module.codes, new, gain, settings.trust_ratio)
    changed = (new != module.codes).any(-1)
    before = float((target - w_hat).square().sum())
    module.codes.copy_(new)
    after = float((target - decode(module.codes, codebooks, scales)).square().sum())
    return {"changed": float(changed.float().mean()), "objective_before": before, "objective_after": after}


class PVTuner:
    """Sums each VQ layer's weight gradient over `settings.every` optimizer steps, then moves its codes.

    The caller hands over dL/dŴ per layer after each backward (`accumulate`) and calls `step` after
    each optimizer step; every `every` steps the codes of every layer are updated (`update_codes`)
    and the sums cleared. `history` records the mean fraction of pairs changed per update.
    """

    def __init__(self, layers: dict[str, nn.Module], settings: PVSettings, seed: int = 0) -> None:
        self.layers, self.settings = layers, settings
        self.grads: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.history: list[dict] = []
        self.generator = torch.Generator().manual_seed(seed)

    def accumulate(self, grads: dict[str, torch.Tensor]) -> None:
        for name, g in grads.items():
            if g is None:
                continue
            if name in self.grads:
                self.grads[name] += g.detach().float()
            else:
                self.grads[name] = g.detach().float().clone()

    def step(self) -> dict | None:
        """After an optimizer step: update the codes when due; returns that update's summary or None."""
        self.steps += 1
        if self.steps % self.settings.every or not self.grads:
            return None
        stats = [update_codes(self.layers[n], g, self.settings, self.generator) for n, g in self.grads.items()]
        self.grads.clear()
        summary = {"step": self.steps, "changed": sum(s["changed"] for s in stats) / len(stats),
                   "objective_ratio": sum(s["objective_after"] for s in stats)
                   / max(1e-30, sum(s["objective_before"] for s in stats))}
        self.history.append(summary)
        return summary

    def codes(self) -> dict[str, torch.Tensor]:
        """The codes buffers by layer name (to snapshot with the best student)."""
        return {f"{n}.codes": m.codes for n, m in self.layers.items()}
