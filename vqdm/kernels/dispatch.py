"""The one place that picks a decode-and-multiply path. Backends register here by name.

Paths (each tested against `reference` in tests/kernels):
    reference      plain-torch decode + F.linear/F.conv2d
    cpu_decode     CPU: chunked FBGEMM decode into a reused scratch buffer, then MKL / oneDNN
    cpu_lut        CPU, Linear only: x·codebooksᵀ lookup tables + gathered sums (tiny M)
    triton_fused   CUDA, Linear only: fused dequant-GEMM (few rows)
    triton_decode  CUDA: Triton decode into a dense weight, then cuBLAS / cuDNN (many rows, convs)
The Triton backends also run on CPU tensors under TRITON_INTERPRET=1 (how CI tests them).
`vq_linear` / `vq_conv2d` / `decode_weight` resolve the backend here and call the `vqdm::` custom
ops (`kernels.ops`), whose registered autograd makes every path differentiable in x, codebooks,
scales and bias.

`choose_backend` holds the auto rule; every threshold below is a named constant with the machine
it was measured on (benchmarks/bench_layers.py; tables in docs/kernels.md).
"""
from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable

import torch

from vqdm.kernels.cpu_decode import vq_conv2d_cpu_decode, vq_linear_cpu_decode
from vqdm.kernels.cpu_lut import vq_linear_cpu_lut
from vqdm.kernels.decoded import conv_weight_view
from vqdm.kernels.reference import vq_conv2d_reference, vq_linear_reference

# CPU: the LUT path only while the GEMM has at most this many rows. bench_layers on AMD EPYC
# (Zen4, 2 cores, torch 2.13, fp32): LUT beats decode + MKL only for M <= 4 on SDXL shapes
# (M = 1: 1.5-3x faster; M = 8: already slower). SDXL itself never gets here (M >= 154), except its
# M = 1-2 time-embedding projections. Measured against the FBGEMM decode; the native decode
# (cpu_native, 2.6-7.6x faster) likely moves the crossover lower: not re-measured.
CPU_LUT_MAX_ROWS = 4

# CUDA: the fused dequant-GEMM while the GEMM has at most this many rows, decode-once + cuBLAS
# above. Measured on one H100 80GB HBM3 (torch 2.11, triton 3.6, fp16, bench_layers --sweep,
# M = 16..4096 on 1280x1280, 2048->1280, 1280->10240): decode + cuBLAS was faster at every M
# (fused 5-26x dense, decode path 1.3-2.8x), so auto never picks the fused kernel; it stays
# available by name. See docs/kernels.md.
GPU_FUSED_MAX_ROWS = 0


@dataclass(frozen=True)
class Backend:
    name: str
    linear: Callable[..., torch.Tensor] | None
    conv2d: Callable[..., torch.Tensor] | None
    devices: tuple[str, ...]  # torch device types it accepts


@functools.lru_cache(maxsize=None)
def _triton_available() -> bool:
    # Cached: find_spec costs ~37 us, paid twice per layer call it made eager VQ U-Net steps on
    # an H100 CPU-bound (+70 ms a Turbo step before caching).
    return importlib.util.find_spec("triton") is not None


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_fn(name: str) -> Callable[..., torch.Tensor]:
    # triton is imported on first use only: importing it early would freeze TRITON_INTERPRET
    # before a test (or a CPU-only user) sets it, and costs ~1 s on every CLI start.
    def call(*args, **kwargs):
        from vqdm.kernels import triton_vq

        return getattr(triton_vq, name)(*args, **kwargs)

    call.__name__ = name
    return call


_BACKENDS: dict[str, Backend] = {
    b.name: b for b in (
        Backend("reference", vq_linear_reference, vq_conv2d_reference, ("cpu", "cuda", "mps", "xpu")),
        Backend("cpu_decode", vq_linear_cpu_decode, vq_conv2d_cpu_decode, ("cpu",)),
        Backend("cpu_lut", vq_linear_cpu_lut, None, ("cpu",)),
        Backend("triton_fused", _triton_fn("vq_linear_triton_fused"), None, ("cuda",)),
        Backend("triton_decode", _triton_fn("vq_linear_triton_decode"), _triton_fn("vq_conv2d_triton_decode"),
                ("cuda",)),
    )
}


def _runs_on(b: Backend, device_type: str) -> bool:
    if b.name.startswith("triton"):
        if not _triton_available():
            return False
        if _triton_interpreting():
            return device_type == "cpu"
    return device_type in b.devices


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Backend names usable here (on `device`'s type when given; any device otherwise)."""
    if device is None:
        types = {"cpu"} | ({"cuda"} if torch.cuda.is_available() else set())
    else:
        types = {torch.device(device).type}
    return sorted(n for n, b in _BACKENDS.items() if any(_runs_on(b, t) for t in types))


def _needs_weight_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def choose_backend(op: str, x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor,
                   scales: torch.Tensor, bias: torch.Tensor | None = None) -> str:
    """The auto rule, per (device, dtype, rows M, n, d). op is "linear" or "conv2d"."""
    # Distillation trains codebooks/scales (and biases). Every path carries their gradients (the ops'
    # autograd), but the reference's forward is the exact function that backward differentiates
    # (decode in the codebooks' dtype, then cast), so a training step's loss and gradient agree.
    if _needs_weight_grad(codebooks, scales, bias):
        return "reference"
    grad_x = torch.is_grad_enabled() and x.requires_grad
    dev = x.device.type
    rows = x.numel() // max(x.shape[-1], 1) if op == "linear" else 0
    if dev == "cpu":
        if op == "linear" and rows <= CPU_LUT_MAX_ROWS and not grad_x:
            return "cpu_lut"
        return "cpu_decode"
    if dev == "cuda" and _triton_available():
        if op == "linear" and rows <= GPU_FUSED_MAX_ROWS and not grad_x and x.dtype in (torch.float16, torch.bfloat16):
            return "triton_fused"
        return "triton_decode"
    return "reference"


def backend_function(name: str, op: str) -> Callable[..., torch.Tensor]:
    """The named backend's linear / conv2d function, unchecked (the custom ops call it; `_get` checks)."""
    b = _BACKENDS[name]
    return b.linear if op == "linear" else b.conv2d


def triton_decodes(codebooks: torch.Tensor) -> bool:
    """Whether the Triton decoder handles this codeword length on CUDA (it needs a power of 2 <= 32)."""
    return _triton_available() and codebooks.shape[2] in (2, 4, 8, 16, 32)


def _get(name: str, op: str, x: torch.Tensor) -> Callable[..., torch.Tensor]:
    try:
        b = _BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; available: {available_backends()}") from None
    fn = b.linear if op == "linear" else b.conv2d
    if fn is None:
        alt = "cpu_decode" if "cpu" in b.devices else "triton_decode"
        raise ValueError(f"backend {name!r} has no {op} path; use {alt!r} or 'auto'")
    if not _runs_on(b, x.device.type):
        hint = " (set TRITON_INTERPRET=1 before importing triton to run it on CPU)" if name.startswith("triton") else ""
        raise ValueError(f"backend {name!r} cannot run on {x.device.type}{hint}; "
                         f"available there: {available_backends(x.device)}")
    return fn


def _eager_inference(*tensors: torch.Tensor | None) -> bool:
    # The custom op is what torch.compile and autograd need. Outside both, the backend runs directly:
    # the op's dispatch costs ~20 us a call (2-core EPYC, loaded), ~15 ms a step over SDXL's 771
    # VQ layers, which an eager GPU step (CPU-bound) would pay in full.
    return not torch.compiler.is_compiling() and not _needs_weight_grad(*tensors)


def vq_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """y = x Ŵᵀ + bias for x [..., d] -> [..., n]."""
    if backend == "auto":
        backend = choose_backend("linear", x, codes, codebooks, scales, bias)
    fn = _get(backend, "linear", x)  # an unknown name or a wrong device fails here, naming the fix
    if _eager_inference(x, codebooks, scales, bias):
        return fn(x, codes, codebooks, scales, bias)
    return torch.ops.vqdm.vq_linear(x, codes, codebooks, scales, bias, backend)


def vq_conv2d(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
              bias: torch.Tensor | None, in_channels: int, kernel_size: tuple[int, int],
              stride: tuple[int, int] = (1, 1), padding: tuple[int, int] = (0, 0),
              dilation: tuple[int, int] = (1, 1), groups: int = 1, backend: str = "auto") -> torch.Tensor:
    """Conv2d of NCHW x with the VQ weight (stored as [C_out, k_h·k_w·C_in/groups])."""
    if backend == "auto":
        backend = choose_backend("conv2d", x, codes, codebooks, scales, bias)
    fn = _get(backend, "conv2d", x)
    if _eager_inference(x, codebooks, scales, bias):
        return fn(x, codes, codebooks, scales, bias, in_channels, tuple(kernel_size), tuple(stride), tuple(padding),
                  tuple(dilation), groups)
    return torch.ops.vqdm.vq_conv2d(x, codes, codebooks, scales, bias, in_channels, tuple(kernel_size),
                                    tuple(stride), tuple(padding), tuple(dilation), groups, backend)


@torch.no_grad()
def decode_weight(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype,
                  conv: tuple[int, tuple[int, int]] | None = None) -> torch.Tensor:
    """A fresh dense weight for F.linear ([n, d]) or, with conv=(C_in, (k_h, k_w)), F.conv2d
    ([C_out, C_in, k_h, k_w]; channels_last strides on CPU), by the fastest decoder on codes' device.

    For weight caches: the result owns its memory (unlike the per-call scratch). Not differentiable
    here (the `vqdm::decode` op it calls is).
    """
    w = torch.ops.vqdm.decode(codes, codebooks, scales, dtype)
    if conv is None:
        return w
    w4 = conv_weight_view(w, conv[0], conv[1])
    # CUDA: an NCHW weight, one coalesced permute-copy (cuDNN's layout for the NCHW U-Net); CPU:
    # the channels_last view, at the same speed in oneDNN and no copy.
    return w4.contiguous() if codes.device.type == "cuda" else w4
