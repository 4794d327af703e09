"""Additive quantization of one layer (SPEC §2–§3): `quantize_weight(W, H, AQConfig) -> QuantizedWeight`.

    Ŵ[i, g·j : g·(j+1)] = s_i · Σ_{m<K} C_m[b_ijm],   minimise L(Ŵ) = tr((Ŵ−W) H (Ŵ−W)ᵀ)/n

1. s_i = ‖w_i‖₂; residual k-means on the g-vectors of W/s gives codebooks and codes (`kmeans`),
   Lloyd on a subsample of 256 points per centroid for big layers. Then `init_passes` times: a
   least-squares fit of codebooks and scales to the codes (`init_cg_iters` CG steps per fit), and
   every code chosen again, group by group with GPTQ's error feedback (`sequential_pass`). From
   this start the rounds end 8–12% lower than from k-means alone (README "AQ search").
2. Rounds until one improves L by less than `relative_tolerance` (or `max_rounds`): with the codes
   fixed, a least-squares fit of the codebooks (`cg_iters` conjugate-gradient steps), the exact
   scales for them and the codebooks again (`codebook_fit`); then `adam_steps` Adam steps on
   codebooks and scales (0 by default; the SPEC's recipe is 100 Adam steps and no fit); then one
   beam-search pass over all codes (`beam_search`). Measured on the 36 MiniLM layers (README
   "AQ search"), the fit reaches Adam's error in less time.
3. The search runs on H + damping·mean(diag H)·I (ridge damping, as GPTQ damps its H); errors in
   `stats` are on the caller's H. With few calibration tokens this lowers the held-out error.
The Adam gradient is written out by hand: G = (Ŵ−W)·H is one [n, d]×[d, d] GEMM per step, and
∂L/∂Ŵ = 2G/n is scattered back to codewords (index_add) and scales (row dot products).
Autograd would spend a second GEMM on the same quantity.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from vqdm.errors import ConfigError
from vqdm.quantizer.layer.beam_search import beam_search_pass
from vqdm.quantizer.layer.codebook_fit import fit_codebooks_and_scales
from vqdm.quantizer.layer.error import check_weight_and_h, quadratic_loss
from vqdm.quantizer.layer.kmeans import residual_kmeans_init
from vqdm.quantizer.layer.sequential_pass import permuted_inverse_cholesky, sequential_code_pass
from vqdm.vq_format import CODE_DTYPE, GROUP_SIZE, NBITS, SUPPORTED_NBITS, VQFormat, decode, decode_groups

MAX_KMEANS_ITERS = 100  # SPEC §3.4: at most 100 Lloyd iterations per codebook


class AQConfigError(ConfigError, ValueError):
    """An AQConfig field out of range; a ConfigError for the CLI and a ValueError for callers."""


@dataclass
class AQConfig:
    """Settings of the per-layer AQ search (SPEC §3.4–3.5, with the measured changes of README "AQ search").

    The SPEC's own recipe: cg_iters=0, adam_steps=100, damping=0, init_passes=0, relative_tolerance=0.01,
    kmeans_points_per_centroid=0.
    """

    num_codebooks: int = 3  # K: 2, 3, 4 give the vqdm-2bit/-3bit/-4bit formats at g = 8
    nbits: int = NBITS  # B: 2^B codewords per codebook; codes are uint8, so 8 only
    group_size: int = GROUP_SIZE  # g: consecutive inputs sharing one code per codebook; must divide d
    beam_size: int = 8  # hypotheses per row in the code search (1 = greedy)
    # Codebooks and scales each round: least squares (CG steps per fit, two fits a round) replaces
    # the SPEC's 100 Adam steps by default: same error in ~0.7x the time (README "AQ search").
    # cg_iters=0, adam_steps=100 is the SPEC's recipe.
    cg_iters: int = 20
    adam_steps: int = 0  # Adam steps on codebooks and scales per round (after the fit, if any)
    lr: float = 1e-4
    betas: tuple[float, float] = (0.0, 0.95)
    amsgrad: bool = True
    kmeans_iters: int = 100  # Lloyd iterations per codebook at initialisation (≤ 100)
    kmeans_tol: float = 1e-4  # stop Lloyd early when the mean distance improves by less (relative)
    kmeans_points_per_centroid: int = 256  # Lloyd on a subsample of 2^B·this points (0: all of them)
    # After k-means: passes of (least-squares fit, every code re-chosen with GPTQ's error feedback).
    # 8 passes at 5 CG steps a fit: on the 36 MiniLM layers the median error is 0.88-0.92x that of
    # the k-means start alone, at about the same time per layer (fewer rounds follow; README "AQ
    # search"). 0: the k-means init alone (the SPEC's).
    init_passes: int = 8
    init_cg_iters: int = 5
    # The search minimises the loss on H + damping·mean(diag H)·I; errors are reported on H itself.
    # A few thousand calibration tokens leave H noisy and the undamped search fits that noise
    # (README "AQ search": lower held-out error, and no higher in-sample error, at 0.2).
    damping: float = 0.2
    relative_tolerance: float = 0.005  # stop when a round improves L by less than this fraction (SPEC: 0.01)
    max_rounds: int = 100  # cap on Adam + beam-search rounds
    seed: int | None = 0  # None: draw one from torch's global RNG (reproducible under torch.manual_seed)
    device: str | None = None  # None: the device W is on

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, supported: str) -> None:
            if not ok:
                raise AQConfigError(f"AQConfig.{name}={getattr(self, name)!r} is not supported: {supported}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        need(is_int(self.num_codebooks) and self.num_codebooks >= 1, "num_codebooks",
             "need an integer K >= 1 (2, 3, 4 are the vqdm-2bit/-3bit/-4bit formats)")
        need(self.nbits in SUPPORTED_NBITS, "nbits",
             f"codes are stored as uint8, so B must be {NBITS} ({2**NBITS} codewords)")
        need(is_int(self.group_size) and self.group_size >= 1, "group_size",
             f"need an integer g >= 1 that divides the layer's input size (the kernels use g = {GROUP_SIZE})")
        need(is_int(self.beam_size) and self.beam_size >= 1, "beam_size", "need an integer >= 1 (1 = greedy)")
        need(is_int(self.adam_steps) and self.adam_steps >= 0, "adam_steps", "need an integer >= 0")
        need(is_int(self.cg_iters) and self.cg_iters >= 0, "cg_iters", "need an integer >= 0")
        need(is_int(self.init_passes) and self.init_passes >= 0, "init_passes", "need an integer >= 0 (0: k-means init only)")
        need(is_int(self.init_cg_iters) and self.init_cg_iters >= 0, "init_cg_iters", "need an integer >= 0")
        need(isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0, "lr", "need a finite number > 0")
        self.betas = tuple(self.betas)  # type: ignore[assignment]  # JSON round trips give lists
        need(len(self.betas) == 2 and all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in self.betas),
             "betas", "need two numbers in [0, 1), e.g. (0.0, 0.95)")
        need(is_int(self.kmeans_iters) and 0 <= self.kmeans_iters <= MAX_KMEANS_ITERS, "kmeans_iters",
             f"need an integer in [0, {MAX_KMEANS_ITERS}] (SPEC: at most {MAX_KMEANS_ITERS} Lloyd iterations)")
        need(isinstance(self.kmeans_tol, (int, float)) and self.kmeans_tol >= 0, "kmeans_tol", "need a number >= 0")
        need(is_int(self.kmeans_points_per_centroid) and self.kmeans_points_per_centroid >= 0,
             "kmeans_points_per_centroid", "need an integer >= 0 (0: every point)")
        need(isinstance(self.damping, (int, float)) and not isinstance(self.damping, bool)
             and math.isfinite(self.damping) and self.damping >= 0, "damping",
             "need a finite number >= 0 (a fraction of H's mean diagonal, e.g. 0.1)")
        need(isinstance(self.relative_tolerance, (int, float)) and 0 <= self.relative_tolerance < 1,
             "relative_tolerance", "need a fraction in [0, 1), e.g. 0.01 to stop below a 1% gain per round")
        need(is_int(self.max_rounds) and self.max_rounds >= 0, "max_rounds", "need an integer >= 0 (0: k-means init only)")
        need(self.seed is None or is_int(self.seed), "seed", "need an integer or None")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                need(False, "device", "need a torch device string such as 'cpu' or 'cuda:0', or None")

    @property
    def vq_format(self) -> VQFormat:
        """The stored format this search produces (K, B, g)."""
        return VQFormat(self.num_codebooks, self.nbits, self.group_size)

    @property
    def codebook_size(self) -> int:
        return self.vq_format.codebook_size


@dataclass
class QuantizedWeight:
    """One quantized layer: the three stored tensors plus what the search did."""

    codes: torch.Tensor  # [n, d/g, K] uint8
    codebooks: torch.Tensor  # [K, 2^B, g] float32
    scales: torch.Tensor  # [n] float32
    stats: dict = field(default_factory=dict)

    def dequantize(self) -> torch.Tensor:
        """Ŵ [n, d] float32 through the reference decode (`vqdm.vq_format.decode`)."""
        return decode(self.codes, self.codebooks.float(), self.scales.float())

    @property
    def rel_error(self) -> float:
        return self.stats["rel_error"]

    @property
    def bits_per_weight(self) -> float:
        return self.stats["bits_per_weight"]

    @property
    def seconds(self) -> float:
        return self.stats["seconds"]

    @property
    def rounds(self) -> int:
        return self.stats["rounds"]


def _check_inputs(w: torch.Tensor, h: torch.Tensor, cfg: AQConfig) -> None:
    check_weight_and_h(w, h)
    n, d = w.shape
    if d % cfg.group_size:
        raise ValueError(f"group_size {cfg.group_size} does not divide the layer's {d} inputs")
    if n * (d // cfg.group_size) < cfg.codebook_size:
        raise ValueError(f"W {tuple(w.shape)} has {n * (d // cfg.group_size)} groups of {cfg.group_size}, "
                         f"fewer than the {cfg.codebook_size} codewords of a codebook: too small for AQ")
    if not torch.isfinite(w).all():
        raise ValueError("W has NaN or infinite entries")
    if not torch.isfinite(h).all():
        raise ValueError("H has NaN or infinite entries: check the calibration statistics")


def _adam_phase(
    w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, cfg: AQConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`adam_steps` Adam steps on (codebooks, scales), codes fixed; returns the best pair seen.

    The loss at each step comes free with the gradient ((G·R).sum()), so keeping the best
    iterate costs nothing and guarantees the phase never ends above where it started.
    """
    n, d = w.shape
    num_books, q_size, g = codebooks.shape
    books = codebooks.clone().requires_grad_(False)
    s = scales.clone().requires_grad_(False)
    opt = torch.optim.Adam([books, s], lr=cfg.lr, betas=cfg.betas, amsgrad=cfg.amsgrad)
    flat_idx = [(codes[..., m] + m * q_size).reshape(-1) for m in range(num_books)]  # into books.view(K·2^B, g)
    best = (math.inf, books.clone(), s.clone())
    for step in range(cfg.adam_steps + 1):
        u = decode_groups(codes, books).reshape(n, d)  # [n, d] unscaled decode
        resid = s[:, None] * u - w  # Ŵ − W
        grad_w = resid @ h  # G = (Ŵ − W)·H, [n, d]
        loss = float((grad_w * resid).sum(dtype=torch.float64)) / n
        if loss < best[0]:
            best = (loss, books.clone(), s.clone())
        if step == cfg.adam_steps:
            break
        grad_w.mul_(2.0 / n)  # ∂L/∂Ŵ
        s.grad = (grad_w * u).sum(1)
        grad_u = (grad_w * s[:, None]).reshape(-1, g)  # ∂L/∂U per g-vector, [n·d/g, g]
        grad_books = torch.zeros(num_books * q_size, g, dtype=w.dtype, device=w.device)
        for idx in flat_idx:
            grad_books.index_add_(0, idx, grad_u)
        books.grad = grad_books.view(num_books, q_size, g)
        opt.step()
    return best[1], best[2]


def _least_squares_phase(w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, books: torch.Tensor,
                         scales: torch.Tensor, loss: float, cg_iters: int, loss_of):
    """`fit_codebooks_and_scales`, kept only when the loss fell (in exact arithmetic it cannot
    rise; float noise can). Returns (codebooks, scales, loss).
    """
    new_books, new_scales = fit_codebooks_and_scales(w, h, codes, books, scales, cg_iters)
    new_loss = loss_of(codes, new_books, new_scales)
    if new_loss < loss:
        return new_books, new_scales, new_loss
    return books, scales, loss


def _sequential_passes(w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, books: torch.Tensor,
                       scales: torch.Tensor, cfg: AQConfig, gen: torch.Generator, seconds: dict):
    """`init_passes` × (fit codebooks and scales to the codes, then `sequential_code_pass`).

    Each pass re-chooses every code, so a pass may end above the one before (the passes are a
    search for a better basin, the rounds after them descend); the rounds start from the last.
    Returns (codes, codebooks, scales, [objective loss after each pass]); `seconds` accumulates the
    phases, which scale differently with the layer (d³, n·d², n·d: `benchmarks/quant_speed.py`).
    """
    if not cfg.init_passes:
        return codes, books, scales, []
    t0 = time.perf_counter()
    u_chol = permuted_inverse_cholesky(h, cfg.group_size)  # depends on H only: once for all passes
    seconds["cholesky"] += time.perf_counter() - t0
    losses = []
    for _ in range(cfg.init_passes):
        t0 = time.perf_counter()
        books, scales = fit_codebooks_and_scales(w, h, codes, books, scales, cfg.init_cg_iters)
        t1 = time.perf_counter()
        codes, loss = sequential_code_pass(w, h, codes, books, scales, cfg.beam_size, gen, u_chol)
        seconds["pass_fit"] += t1 - t0
        seconds["pass_search"] += time.perf_counter() - t1
        losses.append(loss)
    return codes, books, scales, losses


def _round(w32: torch.Tensor, h32: torch.Tensor, codes: torch.Tensor, books: torch.Tensor, scales: torch.Tensor,
           loss: float, cfg: AQConfig, gen: torch.Generator, loss_of, seconds: dict):
    """One round: Adam on (codebooks, scales), then a beam-search pass over the codes.

    Returns (codes, books, scales, loss, record); `seconds` accumulates the phase times.
    """
    t0 = time.perf_counter()
    if cfg.cg_iters:
        books, scales, loss = _least_squares_phase(w32, h32, codes, books, scales, loss, cfg.cg_iters, loss_of)
    seconds["lsq"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    if cfg.adam_steps:
        books, scales = _adam_phase(w32, h32, codes, books, scales, cfg)
    seconds["adam"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    loss_adam = loss_of(codes, books, scales) if cfg.adam_steps else loss
    seconds["loss"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    new_codes, _ = beam_search_pass(w32, h32, codes, books, scales, cfg.beam_size, gen)
    seconds["beam"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    loss_beam = loss_of(new_codes, books, scales)
    seconds["loss"] += time.perf_counter() - t0
    changed = float((new_codes != codes).any(-1).float().mean())
    if loss_beam <= loss_adam:
        codes = new_codes
    else:  # only float noise can do this (each step is monotone in exact arithmetic): keep the old codes
        loss_beam, changed = loss_adam, 0.0
    return codes, books, scales, loss_beam, {"loss_after_adam": loss_adam, "groups_changed": changed}


def _search_and_report_h(h: torch.Tensor, device: torch.device, cfg: AQConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(H32, H_report): float32 symmetric H, damped in place for the search when `cfg.damping`, and
    the H errors are reported on (the caller's, undamped; float64 when the caller's already is, here).
    """
    h32 = h.detach().to(device, torch.float32)
    h32 = (h32 + h32.T) * 0.5  # the formulas assume a symmetric H; accumulation can leave ~1 ulp asymmetry
    # Reported errors: float64 from the caller's H when it already is float64 here (no 8·d² copy kept).
    h_report = h if h.dtype == torch.float64 and h.device == device else h32.clone() if cfg.damping else h32
    if cfg.damping:  # the search (rounds, stop rule, history) runs on the damped H
        h32.diagonal().add_(cfg.damping * float(h32.diagonal().mean()))
    return h32, h_report


def _kmeans_start(w32: torch.Tensor, cfg: AQConfig, gen: torch.Generator):
    """Per-output scales and residual k-means on the normalised rows: (codes, codebooks, scales, seconds)."""
    t0 = time.perf_counter()
    scales = w32.norm(dim=1)
    w_normed = w32 / scales.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    books, codes = residual_kmeans_init(w_normed, cfg.num_codebooks, cfg.codebook_size, cfg.group_size,
                                        iters=cfg.kmeans_iters, tol=cfg.kmeans_tol, generator=gen,
                                        points_per_centroid=cfg.kmeans_points_per_centroid)
    seconds = {"kmeans": time.perf_counter() - t0, "cholesky": 0.0, "pass_fit": 0.0, "pass_search": 0.0,
               "lsq": 0.0, "adam": 0.0, "beam": 0.0, "loss": 0.0}
    return codes, books, scales, seconds


def _rounds(w32: torch.Tensor, h32: torch.Tensor, codes: torch.Tensor, books: torch.Tensor, scales: torch.Tensor,
            loss: float, base_loss: float, cfg: AQConfig, gen: torch.Generator, loss_of, seconds: dict):
    """`_round` until one improves the loss by less than `relative_tolerance` (or `max_rounds`).

    Returns (codes, books, scales, loss, history).
    """
    history: list[dict] = []
    for rnd in range(cfg.max_rounds):
        start = loss
        codes, books, scales, loss, record = _round(w32, h32, codes, books, scales, loss, cfg, gen, loss_of, seconds)
        history.append({"round": rnd + 1, "loss_after_adam": record["loss_after_adam"], "loss_after_beam": loss,
                        "rel_error": loss / base_loss if base_loss > 0 else 0.0,
                        "groups_changed": record["groups_changed"]})
        if start <= 0 or (start - loss) < cfg.relative_tolerance * start:
            break
    return codes, books, scales, loss, history


@torch.no_grad()
def quantize_weight(w: torch.Tensor, h: torch.Tensor, config: AQConfig | None = None) -> QuantizedWeight:
    """AQ of one layer: W [n, d] and H [d, d] (mean x xᵀ, any float dtype) -> QuantizedWeight.

    Math in float32 on `config.device` (default: W's device), loss values in float64. The result's
    tensors are on that device; `stats` holds rel_error (L(Ŵ)/L(0)), loss, base_loss, bits_per_weight,
    seconds, rounds, per-phase seconds and a per-round history.
    """
    cfg = config or AQConfig()
    _check_inputs(w, h, cfg)
    t_start = time.perf_counter()
    device = torch.device(cfg.device) if cfg.device is not None else w.device
    n, d = w.shape
    seed = cfg.seed if cfg.seed is not None else int(torch.randint(0, 2**62, (1,)))
    gen = torch.Generator().manual_seed(seed)  # CPU generator: same draws on every device
    w32 = w.detach().to(device, torch.float32)
    h32, h_report = _search_and_report_h(h, device, cfg)
    h_loss = h32 if cfg.damping else h_report
    base_loss = max(quadratic_loss(w32, h_loss), 0.0)  # L(0) = tr(W H Wᵀ)/n
    report_base = max(quadratic_loss(w32, h_report), 0.0) if cfg.damping else base_loss

    def loss_of(codes: torch.Tensor, books: torch.Tensor, s: torch.Tensor, hh: torch.Tensor = h_loss) -> float:
        w_hat = decode_groups(codes, books).reshape(n, d) * s[:, None]
        return quadratic_loss(w_hat - w32, hh)

    # 1. init: k-means, then the sequential passes
    codes, books, scales, seconds = _kmeans_start(w32, cfg, gen)
    codes, books, scales, pass_losses = _sequential_passes(w32, h32, codes, books, scales, cfg, gen, seconds)
    t0 = time.perf_counter()
    loss = init_loss = loss_of(codes, books, scales)
    seconds["loss"] += time.perf_counter() - t0
    init_report = loss_of(codes, books, scales, h_report) if cfg.damping else loss

    # 2. rounds of least squares / Adam (codebooks, scales) then one beam-search pass (codes)
    codes, books, scales, loss, history = _rounds(w32, h32, codes, books, scales, loss, base_loss, cfg, gen,
                                                  loss_of, seconds)
    report = loss_of(codes, books, scales, h_report) if cfg.damping else loss
    stats = {
        "rel_error": report / report_base if report_base > 0 else 0.0,  # on the caller's (undamped) H
        "init_rel_error": init_report / report_base if report_base > 0 else 0.0,
        "loss": report,
        "base_loss": report_base,
        # What the search minimised (the damped H): the history and the stop rule are in these terms.
        "objective_loss": loss,
        "objective_base_loss": base_loss,
        "objective_init_loss": init_loss,
        "bits_per_weight": cfg.vq_format.bits_per_weight(n, d),
        "seconds": time.perf_counter() - t_start,
        "seconds_by_phase": seconds,
        "rounds": len(history),
        "history": history,
        "pass_losses": pass_losses,  # objective loss after each sequential pass (before its codebook fit)
        "seed": seed,
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "device"},
    }
    return QuantizedWeight(codes.to(CODE_DTYPE), books.contiguous(), scales.contiguous(), stats)
