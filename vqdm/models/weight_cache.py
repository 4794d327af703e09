"""Weight-cache policy for VQ modules: when to keep decoded dense weights instead of decoding per call.

One setting, three policies:
    none          decode on every call (into the kernels' per-call scratch): least memory
    budget=BYTES  keep decoded weights up to BYTES, spent where a hit saves the most time per byte
    request       decode each layer once per request, reuse it across the denoising steps, free after

Under `budget`, a layer's score is the time its uncached path spends decoding, per byte of dense
weight, measured the first time the layer is decoded here. Layers whose uncached path decodes
nothing (GPU fused kernel, CPU lookup table: the few-row layers on GPU) score 0 and are not
cached. On CPU every layer decodes, so the score ranks layers by how much a hit saves per byte:
small layers (fixed per-call overhead) and shapes the decoder handles slowly come first. Admission
is greedy and online: a new layer evicts lower-scoring ones when that makes room, so after one
denoising step the resident set is the best-scoring set that fits.

Use: `cache = install_weight_cache(unet, "budget=2GB")`; with `request`, wrap each request in
`with cache.request(): ...`. `cache.stats()` gives counters for metrics.

Under torch.compile: `none` compiles (each layer decodes inside its `vqdm::` op). `budget` compiles
once frozen: run a step eagerly so the resident set fills, then `cache.freeze()`; a lookup is then
a dict read that Dynamo traces into the graph (the resident weights become graph inputs), and
admission, eviction, timing, stats and stale checks stop until `thaw()` (thaw after changing
weights). `request` decodes and frees per request, and an unfrozen `budget` admits layers as it
goes: both are host logic that a graph cannot hold, so tracing them raises `NotCompilableError`.
`compile_blocker(model)` says so before compiling, so a caller can run such a model eagerly.
"""
from __future__ import annotations

import contextlib
import re
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from vqdm.errors import VQDMError
from vqdm.kernels import choose_backend, decode_weight
from vqdm.models.vq_layers import VQ_MODULES, VQConv2d

MODES = ("none", "budget", "request")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(text: str) -> int:
    """'1500000', '512MB', '2GiB', '1.5gb' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a byte count; write e.g. 2000000000, 512MB or 2GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


class NotCompilableError(VQDMError):
    """A weight-cache policy whose lookups need host logic was traced by torch.compile."""


@dataclass(frozen=True)
class CachePolicy:
    mode: str = "none"
    budget_bytes: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown weight-cache mode {self.mode!r}; use none, request or budget=BYTES")
        if self.budget_bytes < 0:
            raise ValueError("weight-cache budget must be >= 0 bytes")

    @classmethod
    def parse(cls, spec: "str | CachePolicy") -> "CachePolicy":
        """'none' | 'request' | 'budget=BYTES' (BYTES as in parse_bytes)."""
        if isinstance(spec, CachePolicy):
            return spec
        mode, _, arg = spec.strip().partition("=")
        mode = mode.strip().lower()
        if mode == "budget":
            if not arg:
                raise ValueError("budget needs a size: budget=BYTES, e.g. budget=2GB")
            return cls("budget", parse_bytes(arg))
        if arg:
            raise ValueError(f"weight-cache mode {mode!r} takes no argument (got {spec!r})")
        return cls(mode)

    def __str__(self) -> str:
        return f"budget={self.budget_bytes}" if self.mode == "budget" else self.mode


@dataclass
class _Entry:
    weight: torch.Tensor
    nbytes: int
    score: float
    versions: tuple[int, ...]


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    decodes: int = 0
    evictions: int = 0
    decode_seconds: float = 0.0
    bytes_resident: int = 0
    entries: int = 0
    budget_bytes: int = 0
    mode: str = "none"

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _versions(module: nn.Module) -> tuple[int, ...]:
    # In-place updates (optimizer steps, set_quantized) bump a tensor's version: a cached weight
    # decoded from older values is stale.
    ts = (module.codes, module.codebooks, module.scales)
    return tuple(t._version for t in ts)


def _needs_weight_grad(module: nn.Module) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(p is not None and p.requires_grad for p in (module.codebooks, module.scales, module.bias))


@dataclass
class WeightCache:
    """Decoded weights of VQ modules under one CachePolicy. Attach with install_weight_cache."""

    policy: CachePolicy = field(default_factory=CachePolicy)

    def __post_init__(self) -> None:
        self.policy = CachePolicy.parse(self.policy)
        self._entries: dict[tuple[int, torch.dtype], _Entry] = {}
        self._scores: dict[tuple[int, torch.dtype], float] = {}  # measured once per layer
        self._lock = threading.Lock()
        self._stats = CacheStats(budget_bytes=self.policy.budget_bytes, mode=self.policy.mode)
        self._frozen: dict[tuple[int, torch.dtype], torch.Tensor] | None = None  # set by freeze()

    # -- what the VQ modules call -------------------------------------------------------------
    def lookup(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """The dense weight to use for this call, or None to run the module's kernel path."""
        if self.policy.mode == "none" or _needs_weight_grad(module):
            return None
        key = (id(module), x.dtype)
        if torch.compiler.is_compiling():
            if self._frozen is None:
                raise NotCompilableError(self.compile_blocker())
            return self._frozen.get(key)  # traced: no stats, locks or version checks in a graph
        if self._frozen is not None:
            return self._frozen_lookup(key)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.versions == _versions(module):
                self._stats.hits += 1
                return entry.weight
            if entry is not None:  # stale: weights changed since it was decoded
                self._drop(key)
            self._stats.misses += 1
            if self.policy.mode == "budget" and key in self._scores and not self._admissible(key, module):
                return None
        w, seconds = self._decode(module, x.dtype)
        with self._lock:
            nbytes = w.numel() * w.element_size()
            score = self._scores.setdefault(key, self._score(module, x, seconds, nbytes))
            if self.policy.mode == "request" or self._make_room(key, nbytes, score):
                self._entries[key] = _Entry(w, nbytes, score, _versions(module))
                self._stats.bytes_resident += nbytes
                self._stats.entries = len(self._entries)
        return w

    # -- torch.compile -------------------------------------------------------------------------------
    def freeze(self) -> None:
        """Fix the resident set (budget policy): lookups only read it from now on, and compile."""
        if self.policy.mode != "budget":
            raise NotCompilableError(f"weight-cache policy {self.policy} cannot be frozen: only budget=BYTES keeps "
                                     "a resident set across requests")
        with self._lock:
            self._frozen = {k: e.weight for k, e in self._entries.items()}

    def thaw(self) -> None:
        """Back to online admission (after the weights change, or to let the resident set adapt)."""
        with self._lock:
            self._frozen = None

    @property
    def frozen(self) -> bool:
        return self._frozen is not None

    def compile_blocker(self) -> str | None:
        """Why a model using this cache cannot run under torch.compile, or None when it can."""
        if self.policy.mode == "none" or self._frozen is not None:
            return None
        if self.policy.mode == "budget":
            return (f"weight-cache policy {self.policy} admits and evicts layers at run time (timing, stats, "
                    "locks), which a compiled graph cannot hold: call cache.freeze() after an eager warm-up "
                    "step, or run this model eagerly")
        return (f"weight-cache policy {self.policy} decodes and frees weights per request, which a compiled "
                "graph cannot hold: use none or a frozen budget=BYTES to compile, or run this model eagerly")

    def _frozen_lookup(self, key) -> torch.Tensor | None:
        # Frozen means fixed: no version check, so eager and compiled runs use the same weights.
        w = self._frozen.get(key)
        with self._lock:
            if w is None:
                self._stats.misses += 1
            else:
                self._stats.hits += 1
        return w

    # -- request scope -------------------------------------------------------------------------
    @contextlib.contextmanager
    def request(self):
        """Scope of one request: under the `request` policy, decoded weights are freed at exit."""
        try:
            yield self
        finally:
            if self.policy.mode == "request":
                self.clear()

    def clear(self) -> None:
        """Free every cached weight (scores are kept) and thaw."""
        with self._lock:
            self._frozen = None
            for key in list(self._entries):
                self._drop(key)

    def stats(self) -> dict:
        """Counters for metrics: hits, misses, decodes, evictions, decode_seconds, bytes_resident, ..."""
        with self._lock:
            return self._stats.as_dict()

    # -- internals -----------------------------------------------------------------------------
    def _decode(self, module: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
        conv = (module.in_channels, module.kernel_size) if isinstance(module, VQConv2d) else None
        sync = module.codes.device.type == "cuda"
        if sync:
            torch.cuda.synchronize(module.codes.device)
        t0 = time.perf_counter()
        w = decode_weight(module.codes, module.codebooks, module.scales, dtype, conv=conv)
        if sync:
            torch.cuda.synchronize(module.codes.device)
        seconds = time.perf_counter() - t0
        with self._lock:
            self._stats.decodes += 1
            self._stats.decode_seconds += seconds
        return w, seconds

    @staticmethod
    def _score(module: nn.Module, x: torch.Tensor, seconds: float, nbytes: int) -> float:
        """Seconds a hit saves per byte: the decode the uncached path would do (0 if it does none)."""
        op = "conv2d" if isinstance(module, VQConv2d) else "linear"
        backend = module.backend
        if backend == "auto":
            backend = choose_backend(op, x, module.codes, module.codebooks, module.scales, module.bias)
        decodes = backend not in ("triton_fused", "cpu_lut")
        return seconds / max(nbytes, 1) if decodes else 0.0

    def _admissible(self, key, module) -> bool:
        """Could this (already scored) layer get in now? Only if room exists or lower scores can go."""
        score = self._scores[key]
        if score <= 0.0:
            return False
        nbytes = module.n * module.d * key[1].itemsize
        free = self.policy.budget_bytes - self._stats.bytes_resident
        freeable = sum(e.nbytes for e in self._entries.values() if e.score < score)
        return nbytes <= free + freeable

    def _make_room(self, key, nbytes: int, score: float) -> bool:
        """Budget admission: evict lower-scoring entries if that makes room; False if it cannot."""
        if score <= 0.0 or nbytes > self.policy.budget_bytes:
            return False
        free = self.policy.budget_bytes - self._stats.bytes_resident
        if nbytes <= free:
            return True
        victims = sorted((e.score, k) for k, e in self._entries.items() if e.score < score)
        freed, chosen = 0, []
        for _, k in victims:
            if nbytes <= free + freed:
                break
            freed += self._entries[k].nbytes
            chosen.append(k)
        if nbytes > free + freed:
            return False
        for k in chosen:
            self._drop(k)
            self._stats.evictions += 1
        return True

    def _drop(self, key) -> None:
        entry = self._entries.pop(key)
        self._stats.bytes_resident -= entry.nbytes
        self._stats.entries = len(self._entries)


def install_weight_cache(model: nn.Module, policy: "str | CachePolicy" = "none") -> WeightCache | None:
    """Attach one WeightCache to every VQ module of `model` (None for policy `none`) and return it."""
    policy = CachePolicy.parse(policy)
    cache = None if policy.mode == "none" else WeightCache(policy)
    for m in model.modules():
        if isinstance(m, VQ_MODULES):
            m.weight_cache = cache
    return cache


def compile_blocker(model: nn.Module) -> str | None:
    """Why `model`'s VQ modules cannot run under torch.compile (their weight cache), or None when they can.

    Check before `torch.compile(model, fullgraph=True)`: a blocked model run compiled raises
    NotCompilableError (inside Dynamo's error) at its first cached layer.
    """
    caches = {id(m.weight_cache): m.weight_cache for m in model.modules()
              if isinstance(m, VQ_MODULES) and isinstance(m.weight_cache, WeightCache)}
    return next((r for r in (c.compile_blocker() for c in caches.values()) if r), None)
