"""The one place that picks a decode-and-multiply path. Backends register here by name."""
from __future__ import annotations

from typing import Callable

import torch

from vqdm.kernels.reference import vq_conv2d_reference, vq_linear_reference

LinearFn = Callable[..., torch.Tensor]

_LINEAR_BACKENDS: dict[str, LinearFn] = {"reference": vq_linear_reference}


def available_backends() -> list[str]:
    return sorted(_LINEAR_BACKENDS)


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
        backend = "reference"
    try:
        fn = _LINEAR_BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown backend {backend!r}; available: {available_backends()}") from None
    return fn(x, codes, codebooks, scales, bias)


def vq_conv2d(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
              bias: torch.Tensor | None, in_channels: int, kernel_size: tuple[int, int],
              stride: tuple[int, int] = (1, 1), padding: tuple[int, int] = (0, 0),
              dilation: tuple[int, int] = (1, 1), groups: int = 1, backend: str = "auto") -> torch.Tensor:
    """Conv2d of NCHW x with the VQ weight."""
    return vq_conv2d_reference(x, codes, codebooks, scales, bias, in_channels, kernel_size,
                               stride, padding, dilation, groups)
