"""Calibration statistics (SPEC §3.1): H = mean x xᵀ of every quantized layer's input.

Forward pre-hooks see each layer's real input while the pipeline samples; the rows a layer
multiplies by its weight matrix [n, d] are accumulated into an fp64 sum [d, d] plus a row count,
so the mean is exact (no damping) and sums from several processes simply add (all-reduce).

    Linear  every token is a row: x [..., d] -> [N, d]
    Conv2d  every output position is a row: im2col of the zero-padded input, columns in
            (k_h, k_w, C_in) order to match `vqdm.models.weight_matrix`

Layers that read the very same input tensor in a forward pass (q/k/v of self-attention; k/v of
every cross-attention, which all read the text embedding) share one accumulator: detected by
object identity, so the rule follows the module graph instead of a name list.

Memory: a sum is d² fp64 (4.2 GB for the widest SDXL conv, d = 23,040), so the driver collects
one subset (or part of one, see `plan_passes`) at a time; rows stream through in chunks of at most
`chunk_elements` values, so no im2col of a whole batch is ever materialised.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import weakref
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from vqdm.errors import ConfigError
from vqdm.models.layer_selection import layer_dims
from vqdm.quantizer.sampling import SamplingConfig, plan_batches, prompt_seed, run_trajectories

# Rows are streamed in chunks of at most this many input values (fp32 ≈ 256 MB).
DEFAULT_CHUNK_ELEMENTS = 1 << 26
LOW_PRECISION = (torch.float16, torch.bfloat16)


@contextlib.contextmanager
def _tf32():
    """TF32 matmuls on CUDA for the duration (exact for fp16/bf16-valued inputs); restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


@dataclass
class SecondMoment:
    """Running fp64 sum of x xᵀ over rows and their count; `mean()` is H."""

    sum: torch.Tensor  # [d, d] float64
    count: int = 0

    @classmethod
    def zeros(cls, d: int, device: torch.device | str = "cpu") -> "SecondMoment":
        return cls(torch.zeros(d, d, dtype=torch.float64, device=device))

    def add_rows(self, rows: torch.Tensor, exact_low_precision: bool | None = None) -> None:
        """Accumulate rows [N, d] into the fp64 sum.

        Reference path: the product runs in fp64 straight into the sum (no d² temporary).
        Fast path (default for fp16/bf16 rows on CUDA, where the sampling U-Net runs in half
        precision): fp16 and bf16 values carry 11 and 8 significant bits, which TF32 tensor cores
        hold exactly, so the chunk's products are exact and summed in fp32; that partial sum
        ([d, d] fp32, one at a time) is added into the fp64 running sum. fp64 GEMMs would cost
        about 4x the U-Net itself per call; this costs a fraction of it.
        """
        if exact_low_precision is None:
            exact_low_precision = rows.device.type == "cuda" and rows.dtype in LOW_PRECISION
        if exact_low_precision:
            if rows.dtype not in LOW_PRECISION:
                raise ValueError(f"the low-precision path needs fp16/bf16 rows, got {rows.dtype}")
            r = rows.to(device=self.sum.device, dtype=torch.float32)
            with _tf32():
                self.sum.add_(r.T @ r)
        else:
            r = rows.to(device=self.sum.device, dtype=torch.float64)
            self.sum.addmm_(r.T, r)
        self.count += rows.shape[0]

    def mean(self) -> torch.Tensor:
        if self.count == 0:
            raise RuntimeError("no calibration rows were recorded for this layer: did the sampling loop run it?")
        return self.sum / self.count

    def all_reduce(self) -> None:
        """Sum over every process of the default torch.distributed group (no-op when not initialised)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        torch.distributed.all_reduce(self.sum)
        count = torch.tensor([self.count], dtype=torch.int64, device=self.sum.device)
        torch.distributed.all_reduce(count)
        self.count = int(count.item())


def linear_rows(x: torch.Tensor, d: int, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> Iterator[torch.Tensor]:
    """A Linear layer's input as row chunks [rows, d]: every token is a sample."""
    flat = x.reshape(-1, d)
    step = max(1, chunk_elements // d)
    for start in range(0, flat.shape[0], step):
        yield flat[start:start + step]


def conv_rows(x: torch.Tensor, conv: nn.Conv2d, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> Iterator[torch.Tensor]:
    """A Conv2d's im2col rows [rows, k_h·k_w·C_in], (k_h, k_w, C_in) column order, streamed.

    Zero padding is included (padded taps are real zeros the weight multiplies). Chunks are bands of
    output rows of one image, cut from the padded input, so memory stays at `chunk_elements`.
    """
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros" or conv.groups != 1:
        raise ValueError("calibration supports groups=1 convolutions with explicit zero padding")
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    c = conv.in_channels
    d = kh * kw * c
    xp = F.pad(x, (pw, pw, ph, ph))
    h_out = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    w_out = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    band = max(1, min(h_out, chunk_elements // max(1, d * w_out)))
    for img in xp.split(1):
        for o0 in range(0, h_out, band):
            o1 = min(h_out, o0 + band)
            rows_in = img[:, :, o0 * sh:(o1 - 1) * sh + dh * (kh - 1) + 1]
            cols = F.unfold(rows_in, (kh, kw), dilation=(dh, dw), stride=(sh, sw))  # [1, C·kh·kw, L]
            # unfold orders columns (C, k_h, k_w); the weight matrix uses (k_h, k_w, C).
            yield cols.view(c, kh * kw, -1).permute(2, 1, 0).reshape(-1, d)


@dataclass
class _Entry:
    module: nn.Module
    d: int
    owner: str | None = None  # the layer whose accumulator this one shares (itself when it owns one)


@dataclass
class HessianCollector:
    """Forward hooks accumulating H for the named layers of `root` (a U-Net or any module tree).

    Use as a context manager around the sampling loop; then `all_reduce()` (multi-process) and
    `hessians()`. `max_rows_per_call` caps the rows a layer records per forward call by uniform
    sampling (seeded through `reseed`), for quick runs; None keeps every row as the SPEC asks.
    """

    root: nn.Module
    names: Sequence[str]
    share_inputs: bool = True
    max_rows_per_call: int | None = None
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
    seed: int = 0
    entries: dict[str, _Entry] = field(init=False)
    moments: dict[str, SecondMoment] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        modules = dict(self.root.named_modules())
        missing = [n for n in self.names if n not in modules]
        if missing:
            raise ValueError(f"no such layer(s) to calibrate: {missing[:3]}")
        self.entries = {}
        for n in self.names:
            m = modules[n]
            if not isinstance(m, (nn.Linear, nn.Conv2d)):
                raise TypeError(f"{n} is a {type(m).__name__}; calibration hooks Linear and Conv2d layers")
            self.entries[n] = _Entry(m, layer_dims(m)[1])
        self._handles: list = []
        self._seen: dict[int, tuple[weakref.ref, str]] = {}
        self._batch_seed = self.seed
        self._gens: dict[str, torch.Generator] = {}
        self._finished = False

    # -- hooks -------------------------------------------------------------------------------
    def __enter__(self) -> "HessianCollector":
        self._handles.append(self.root.register_forward_pre_hook(self._reset_seen))
        for name, e in self.entries.items():
            self._handles.append(e.module.register_forward_pre_hook(self._make_hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._seen.clear()

    def reseed(self, seed: int) -> None:
        """Restart row sampling from `seed` (called per batch).

        Each layer draws from its own generator seeded by (seed, layer name), so a layer's rows
        depend only on the batch, never on which other layers are hooked in the same pass.
        """
        self._batch_seed = seed
        self._gens.clear()

    def _generator(self, name: str) -> torch.Generator:
        gen = self._gens.get(name)
        if gen is None:
            digest = hashlib.sha256(f"{self._batch_seed}:{name}".encode()).digest()
            gen = self._gens[name] = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") % 2**63)
        return gen

    def _reset_seen(self, module, args) -> None:
        # Identity is only meaningful within one forward pass of the root.
        self._seen.clear()

    def _make_hook(self, name: str):
        def hook(module, args):
            self._record(name, args[0])
        return hook

    def _record(self, name: str, x: torch.Tensor) -> None:
        entry = self.entries[name]
        owner = name
        if self.share_inputs:
            hit = self._seen.get(id(x))
            if hit is not None and hit[0]() is x:
                owner = hit[1]
            else:
                self._seen[id(x)] = (weakref.ref(x), name)
        if entry.owner is None:
            entry.owner = owner
        elif entry.owner != owner:
            raise RuntimeError(f"{name} shared its input with {entry.owner} in one forward pass but not in another; "
                               "run calibration with share_inputs=False for this model")
        if owner != name:
            return  # the owner already accumulated this exact tensor
        if self._finished:
            raise RuntimeError("this collector's statistics were already taken; use a new collector")
        moment = self.moments.get(name)
        if moment is None:
            with torch.inference_mode(False):  # a normal tensor: divided in place after sampling
                moment = self.moments[name] = SecondMoment.zeros(entry.d, device=x.device)
        with torch.no_grad():
            rows = (conv_rows(x, entry.module, self.chunk_elements) if isinstance(entry.module, nn.Conv2d)
                    else linear_rows(x, entry.d, self.chunk_elements))
            total = self._row_count(x, entry)
            keep = 1.0 if self.max_rows_per_call is None else min(1.0, self.max_rows_per_call / total)
            for chunk in rows:
                if keep < 1.0:
                    k = max(1, math.ceil(chunk.shape[0] * keep))
                    pick = torch.randperm(chunk.shape[0], generator=self._generator(name))[:k].to(chunk.device)
                    chunk = chunk.index_select(0, pick)
                moment.add_rows(chunk)

    @staticmethod
    def _row_count(x: torch.Tensor, entry: _Entry) -> int:
        if isinstance(entry.module, nn.Conv2d):
            m = entry.module
            h, w = x.shape[-2:]
            (kh, kw), (sh, sw), (ph, pw), (dh, dw) = m.kernel_size, m.stride, m.padding, m.dilation
            return x.shape[0] * ((h + 2 * ph - dh * (kh - 1) - 1) // sh + 1) * ((w + 2 * pw - dw * (kw - 1) - 1) // sw + 1)
        return x.numel() // entry.d

    # -- results -----------------------------------------------------------------------------
    def groups(self) -> dict[str, list[str]]:
        """owner -> layers sharing its H (owner first), for the layers that ran."""
        out: dict[str, list[str]] = {}
        for name, e in self.entries.items():
            if e.owner is not None:
                out.setdefault(e.owner, []).append(name)
        return out

    def all_reduce(self) -> None:
        """Sum every accumulator over the processes (torch.distributed); no-op when single-process.

        Every rank must have run the same layers (true for the same model and prompt shapes);
        owners are iterated in one fixed order so the collectives pair up across ranks.
        """
        for owner in sorted(self.moments):
            self.moments[owner].all_reduce()

    def hessians(self) -> dict[str, torch.Tensor]:
        """layer -> H [d, d] float64; layers of a shared group map to the same tensor object.

        The sums are divided in place (a second d² copy of the widest H would be 4.2 GB), so the
        collector is finished afterwards: call `counts()` before if you need them.
        """
        missing = [n for n, e in self.entries.items() if e.owner is None]
        if missing:
            raise RuntimeError(f"layer(s) never ran during calibration: {missing[:3]}")
        if self._finished:
            raise RuntimeError("hessians() was already taken from this collector")
        self._finished = True
        means = {}
        for owner, m in self.moments.items():
            if m.count == 0:
                raise RuntimeError(f"no calibration rows were recorded for {owner}")
            means[owner] = m.sum.div_(m.count)
        self.moments = {}
        return {n: means[e.owner] for n, e in self.entries.items()}

    def counts(self) -> dict[str, int]:
        return {n: self.moments[e.owner].count for n, e in self.entries.items() if e.owner is not None}


def dist_info() -> tuple[int, int]:
    """(rank, world size) of the default torch.distributed group; (0, 1) when not initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def hessian_bytes(module: nn.Module) -> int:
    """Bytes of one fp64 H for a layer."""
    d = layer_dims(module)[1]
    return 8 * d * d


def plan_passes(layers: Sequence[tuple[str, nn.Module]], max_bytes: int | None) -> list[list[str]]:
    """Cut a subset's layers (in module order) into passes whose H sums fit `max_bytes`.

    Sharing only shrinks the real footprint, so the bound holds; neighbours stay together, so
    q/k/v usually land in one pass and still share. A layer larger than the budget gets a pass
    of its own. None: one pass.
    """
    if max_bytes is None:
        return [[n for n, _ in layers]] if layers else []
    passes: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name, module in layers:
        b = hessian_bytes(module)
        if current and used + b > max_bytes:
            passes.append(current)
            current, used = [], 0
        current.append(name)
        used += b
    if current:
        passes.append(current)
    return passes


@dataclass
class LayerStatistics:
    hessians: dict[str, torch.Tensor]  # layer -> H [d, d] float64 (shared groups: one tensor object)
    counts: dict[str, int]  # rows behind each H
    groups: dict[str, list[str]]  # owner -> layers sharing its H


def collect_hessians(pipe, names: list[str], cfg: SamplingConfig, prompts: list[str], *,
                     progress=None) -> LayerStatistics:
    """H of the named U-Net layers over this rank's share of the calibration, summed over all ranks.

    Row sampling (`cfg.max_rows_per_call`) is reseeded per batch from (seed, batch index), so the
    draws, like the latents, do not depend on how batches are spread over ranks.
    """
    rank, world = dist_info()
    total = math.ceil(cfg.num_prompts / cfg.batch_size)
    if total < world:
        raise ConfigError(f"{total} calibration batch(es) cannot be spread over {world} processes: "
                          "raise --num-prompts or lower --batch-size")
    batches = plan_batches(cfg, prompts, rank, world)
    if progress is not None:
        progress.reset(total=len(batches))
    collector = HessianCollector(pipe.unet, names, max_rows_per_call=cfg.max_rows_per_call)
    with collector:
        run_trajectories(pipe, cfg, batches, progress=progress,
                         before_batch=lambda b: collector.reseed(prompt_seed(cfg.seed, b.index)))
    collector.all_reduce()
    counts, groups = collector.counts(), collector.groups()
    return LayerStatistics(collector.hessians(), counts, groups)
