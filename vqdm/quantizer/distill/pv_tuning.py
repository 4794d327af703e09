"""PV-tuning's discrete step: move a VQ layer's codes along the loss gradient, at no size cost.

Distillation trains codebooks and scales (the continuous "P" step); PV-tuning (Malinovskii et al.
2024, AQLM's follow-up) also updates the codes (the discrete "V" step). Here, every few optimizer
steps, for each VQ layer with decoded weight Ŵ and accumulated loss gradient G = dL/dŴ:

    target  W' = Ŵ − η · rms(Ŵ) · D,   D = m̂ / (√v̂ + ε)   (Adam's direction of the gradients seen;
            or D = G / rms(G) of the gradient summed since the last update)
    codes   re-encoded against W', each (row, group) on its own:
            argmin over the K codes of ‖w'_J − s_i · Σ_m C_m[b_m]‖²  in the metric of H_JJ, the
            group's diagonal block of the layer's H when it is known, else the identity

Minimising ‖W' − Ŵ_new‖² = ‖ΔŴ‖² + 2η' D·ΔŴ + const is a proximal linearised step on the loss:
a code changes only where the step pushes its group closer to another codeword sum than the
current one. Only the pairs whose target moved farthest are searched (`candidates` × τ of them),
and the "trust ratio" τ keeps at most τ of each layer's (row, group) pairs changed per update,
the ones whose distance to W' drops most; every accepted change lowers ‖W' − Ŵ‖ (with a
block-diagonal metric the groups are independent, so any subset of improving changes lowers it
by exactly the sum of their gains). Codes keep their shape, dtype and range; codebooks and
scales are not touched (the optimizer keeps training them). Measured on MiniLM and tiny SDXL it
did not beat codebook-only tuning at equal time (docs/distill.md); off unless asked for.

`reencode` is the fast path (the existing AQ beam search, `quantizer.layer.beam_search.search_group`:
with H_JJ = I every (row, group) pair is one row of a single search; with H blocks one search per
group); `reencode_reference` enumerates every K-tuple of codes (exact, for tests with small codebooks).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn as nn

from vqdm.models import vq_modules
from vqdm.quantizer.layer.beam_search import search_group
from vqdm.vq_format import decode, decode_groups

# (row, group) pairs per search chunk: [rows, beam, 2^B] fp32 scores = 32768·8·256·4 B = 256 MiB.
MAX_ROWS = 32768
DIRECTIONS = ("adam", "gradient")
EPS = 1e-12


def hessian_blocks(h: torch.Tensor, group_size: int, damping: float = 0.01) -> torch.Tensor:
    """The diagonal g×g blocks [d/g, g, g] of a layer's H [d, d] (+ damping × mean diag on each diagonal).

    PV-tuning measures ‖W' − Ŵ‖ in the block-diagonal part of H: groups stay independent (any subset
    of improving changes lowers the objective by the sum of their gains) and a change costs what it
    does to the layer's output, not its raw size."""
    d = h.shape[0]
    g = group_size
    blocks = h.reshape(d // g, g, d // g, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()
    return blocks + damping * h.diagonal().mean() * torch.eye(g, dtype=h.dtype, device=h.device)


@dataclass(frozen=True)
class PVSettings:
    """When and how far the codes move (see the module docstring)."""

    every: int  # optimizer steps between code updates
    step_size: float = 0.1  # η: the target's distance from Ŵ, in units of rms(Ŵ), along −D
    trust_ratio: float = 0.003  # τ: at most this fraction of each layer's (row, group) pairs change per update
    beam_size: int = 4  # beam of the search over the K codes of a group
    # direction of the step: "adam" = m̂ / (√v̂ + ε) of the weight gradients seen (every element moves
    # by at most ≈ η·rms(Ŵ)), "gradient" = G / rms(G) of the gradient summed since the last update
    # (measured on MiniLM: one update with 0.03% of groups changed tripled the error, docs/distill.md)
    direction: str = "adam"
    # pairs searched per update, as a multiple of the trust ratio: those whose target moved farthest
    candidates: float = 4.0
    # no code updates after this optimizer step (None: until the end), so that the codebooks adapt
    # to the last changes before the run ends (an update costs validation error for some steps)
    until: int | None = None
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"PV-tuning: every must be at least 1 step, got {self.every}")
        if not self.step_size > 0:
            raise ValueError(f"PV-tuning: step size must be positive, got {self.step_size}")
        if not 0 < self.trust_ratio <= 1:
            raise ValueError(f"PV-tuning: trust ratio must lie in (0, 1], got {self.trust_ratio}")
        if self.beam_size < 1:
            raise ValueError(f"PV-tuning: beam size must be at least 1, got {self.beam_size}")
        if not self.candidates >= 1:
            raise ValueError(f"PV-tuning: candidates must be at least 1 (x the trust ratio), got {self.candidates}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"PV-tuning: direction must be one of {DIRECTIONS}, got {self.direction!r}")


@torch.no_grad()
def reencode(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, target: torch.Tensor,
             beam_size: int = 4, generator: torch.Generator | None = None, max_rows: int = MAX_ROWS,
             h_blocks: torch.Tensor | None = None, candidates: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes closer to `target` [n, d] per (row, group): (new codes [n, d/g, K], gain [n, d/g]).

    gain = ‖w'_J − s·u_old‖² − ‖w'_J − s·u_new‖² ≥ 0 (0 where the codes stay), in the metric of
    `h_blocks` [d/g, g, g] (`hessian_blocks`) when given, else the identity. Beam search over the
    K codes of each group, codebooks visited in one shuffled order; never worse than the old codes.
    `candidates` [n, d/g] bool: search only these pairs (the others keep their codes, gain 0).
    """
    n, groups, k = codes.shape
    g = codebooks.shape[2]
    dt = codebooks.dtype
    t_all = target.to(dt).reshape(n, groups, g)
    new = codes.long().clone()
    gain = torch.zeros(n, groups, dtype=dt, device=codebooks.device)
    order = torch.randperm(k, generator=generator).tolist()
    if candidates is None:
        candidates = torch.ones(n, groups, dtype=torch.bool, device=codes.device)
    if h_blocks is None:
        # With H = I every (row, group) pair is independent: one search over all candidate pairs.
        # T = w'_J; score(v) = s²‖v‖² − 2 s v·w'_J = ‖w'_J − s v‖² − ‖w'_J‖².
        rows, cols = candidates.nonzero(as_tuple=True)
        eye = torch.eye(g, dtype=dt, device=codebooks.device)
        for r0 in range(0, rows.numel(), max_rows):
            r, j = rows[r0:r0 + max_rows], cols[r0:r0 + max_rows]
            nc, og = _search(t_all[r, j], eye, new[r, j], codebooks, scales.to(dt)[r], beam_size, order)
            new[r, j], gain[r, j] = nc, og
    else:
        for j in candidates.any(0).nonzero(as_tuple=True)[0].tolist():
            r = candidates[:, j].nonzero(as_tuple=True)[0]
            h_jj = h_blocks[j].to(dt)
            # T = w'_J H_JJ (the block-diagonal H has no coupling to other groups)
            nc, og = _search(t_all[r, j] @ h_jj, h_jj, new[r, j], codebooks, scales.to(dt)[r], beam_size, order)
            new[r, j], gain[r, j] = nc, og
    return new.to(codes.dtype), gain.clamp_min(0)


def _search(t: torch.Tensor, h_jj: torch.Tensor, c: torch.Tensor, codebooks: torch.Tensor, s: torch.Tensor,
            beam_size: int, order: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(new codes, gain) of rows with linear term t, metric h_jj, codes c: `search_group`'s, with the
    gain set to 0 where the codes stay (it scores a kept code by another formula: float noise)."""
    nc, _, old_score, new_score = search_group(t, h_jj, decode_groups(c, codebooks), c, codebooks, s, beam_size, order)
    return nc, torch.where((nc != c).any(-1), old_score - new_score, torch.zeros_like(old_score))


def candidate_pairs(displacement: torch.Tensor, h_blocks: torch.Tensor | None, group_size: int,
                    fraction: float) -> torch.Tensor:
    """[n, d/g] bool: the `fraction` of (row, group) pairs whose target moved farthest (‖ΔJ‖, H-metric).

    Only a pair whose target moved can find better codes, so searching the farthest-moved ones
    saves the search over the rest (PV-tuning changes few codes per update anyway)."""
    n, d = displacement.shape
    e = displacement.reshape(n, d // group_size, group_size).float()
    size = e.square().sum(-1) if h_blocks is None else torch.einsum("nGa,Gab,nGb->nG", e, h_blocks.float(), e)
    count = max(1, int(round(fraction * size.numel())))
    mask = torch.zeros(size.numel(), dtype=torch.bool, device=size.device)
    if count >= size.numel():
        mask[:] = True
    else:
        mask[size.reshape(-1).topk(count).indices] = True
    return mask.reshape(size.shape)


@torch.no_grad()
def reencode_reference(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, target: torch.Tensor,
                       h_blocks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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
    hb = (torch.eye(g, dtype=torch.float64).expand(groups, g, g) if h_blocks is None else h_blocks.double())
    e = t[:, :, None, :] - s[..., None] * sums[None, None]  # [n, G, q^K, g]
    dist = torch.einsum("nGqa,Gab,nGqb->nGq", e, hb, e)
    e_old = t - s * decode_groups(codes.long(), books)
    old = torch.einsum("nGa,Gab,nGb->nG", e_old, hb, e_old)
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
def pv_target(w_hat: torch.Tensor, direction: torch.Tensor, step_size: float, normalize: bool = False) -> torch.Tensor:
    """W' = Ŵ − η · rms(Ŵ) · D, D the direction (`normalize`: D / rms(D), for a raw gradient)."""
    dvec = direction.to(w_hat.dtype)
    if normalize:
        d_rms = dvec.square().mean().sqrt()
        if not torch.isfinite(d_rms) or d_rms == 0:
            return w_hat.clone()
        dvec = dvec / d_rms
    return w_hat - step_size * w_hat.square().mean().sqrt() * dvec


@torch.no_grad()
def update_codes(module: nn.Module, direction: torch.Tensor, settings: PVSettings,
                 generator: torch.Generator | None = None, h_blocks: torch.Tensor | None = None) -> dict:
    """PV step for one VQ module (VQLinear / VQConv2d) along `direction` [n, d] (a descent direction's
    negative: dL/dŴ or Adam's m̂/√v̂ of it); codes changed in place, in the metric of `h_blocks` if given.

    Returns {"changed": fraction of (row, group) pairs whose codes changed, "objective_before",
    "objective_after": ‖W' − Ŵ‖² (H-blocks metric) before and after}. Codebooks and scales are
    left as they are.
    """
    codebooks, scales = module.codebooks.detach(), module.scales.detach()
    if tuple(direction.shape) != (module.n, module.d):
        raise ValueError(f"weight gradient has shape {tuple(direction.shape)}, the layer's weight is "
                         f"{(module.n, module.d)}")
    w_hat = decode(module.codes, codebooks, scales)
    target = pv_target(w_hat, direction.to(w_hat.device), settings.step_size, settings.direction == "gradient")
    cand = candidate_pairs(target - w_hat, h_blocks, module.group_size,
                           min(1.0, settings.candidates * settings.trust_ratio))
    new, gain = reencode(module.codes, codebooks, scales, target, settings.beam_size, generator, h_blocks=h_blocks,
                         candidates=cand)
    new = limit_changes(module.codes, new, gain, settings.trust_ratio)
    changed = (new != module.codes).any(-1)
    before = _objective(target, w_hat, h_blocks, module.group_size)
    module.codes.copy_(new)
    after = _objective(target, decode(module.codes, codebooks, scales), h_blocks, module.group_size)
    return {"changed": float(changed.float().mean()), "objective_before": before, "objective_after": after}


def _objective(target: torch.Tensor, w: torch.Tensor, h_blocks: torch.Tensor | None, g: int) -> float:
    e = (target - w).double()
    if h_blocks is None:
        return float(e.square().sum())
    e = e.reshape(e.shape[0], -1, g)
    return float(torch.einsum("nGa,Gab,nGb->", e, h_blocks.double(), e))


def codes_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The live codes buffers of `model`'s VQ layers by "<layer>.codes": what PV-tuning moves, so
    what is kept with the best student and in checkpoints besides the parameters."""
    return {f"{n}.codes": m.codes for n, m in vq_modules(model)}


class PVTuner:
    """Tracks each VQ layer's weight gradients and moves its codes every `settings.every` steps.

    The caller hands over dL/dŴ per layer once per optimizer step, after the backward
    (`accumulate`), and calls `step` after each optimizer step. "adam": running first/second
    moments of the gradient (Adam's, bias-corrected; kept across updates); "gradient": the sum since
    the last update. `hessians` (layer name -> H [d, d], optional): measure ‖W' − Ŵ‖ in H's diagonal
    blocks. `history` records each update's mean fraction of pairs changed.
    """

    def __init__(self, layers: dict[str, nn.Module], settings: PVSettings, seed: int = 0,
                 hessians: dict[str, torch.Tensor] | None = None) -> None:
        self.layers, self.settings = layers, settings
        self.blocks = {n: hessian_blocks(h.float().to(layers[n].codebooks.device), layers[n].group_size)
                       for n, h in (hessians or {}).items() if n in layers}
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}
        self.seen = 0  # gradients accumulated (Adam's bias correction)
        self.steps = 0
        self.history: list[dict] = []
        self.generator = torch.Generator().manual_seed(seed)

    def accumulate(self, grads: dict[str, torch.Tensor]) -> None:
        b1, b2 = self.settings.betas
        adam = self.settings.direction == "adam"
        self.seen += 1
        for name, g in grads.items():
            if g is None:
                continue
            g = g.detach().float()
            if name not in self.m:
                self.m[name] = torch.zeros_like(g)
                if adam:
                    self.v[name] = torch.zeros_like(g)
            if adam:
                self.m[name].mul_(b1).add_(g, alpha=1 - b1)
                self.v[name].mul_(b2).addcmul_(g, g, value=1 - b2)
            else:
                self.m[name] += g

    def direction(self, name: str) -> torch.Tensor:
        if self.settings.direction == "gradient":
            return self.m[name]
        b1, b2 = self.settings.betas
        m_hat = self.m[name] / (1 - b1 ** self.seen)
        v_hat = self.v[name] / (1 - b2 ** self.seen)
        return m_hat / (v_hat.sqrt() + EPS)

    def step(self) -> dict | None:
        """After an optimizer step: update the codes when due; returns that update's summary or None."""
        self.steps += 1
        until = self.settings.until
        if self.steps % self.settings.every or not self.m or (until is not None and self.steps > until):
            return None
        stats = [update_codes(self.layers[n], self.direction(n), self.settings, self.generator, self.blocks.get(n))
                 for n in self.m]
        if self.settings.direction == "gradient":
            self.m.clear()
        summary = {"step": self.steps, "changed": sum(s["changed"] for s in stats) / len(stats),
                   "objective_ratio": sum(s["objective_after"] for s in stats)
                   / max(1e-30, sum(s["objective_before"] for s in stats))}
        self.history.append(summary)
        return summary

