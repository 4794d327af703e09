"""VQLinear / VQConv2d: drop-in replacements for nn.Linear / nn.Conv2d holding a VQ weight.

The quantized tensors live on the module (codes as a buffer; codebooks and scales as parameters
so distillation can train them), and forward is one call into `vqdm.kernels`: a `vqdm::` custom
op, one node to torch.compile (or, with a weight cache hit, F.linear / F.conv2d on its weight).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from vqdm.kernels import conv2d_decoded, dequantize, linear_decoded, vq_conv2d, vq_linear
from vqdm.vq_format import CODE_DTYPE, GROUP_SIZE, NBITS, VQFormat


class _VQBase(nn.Module):
    """Shared state of the VQ modules; `n`, `d` are the weight-matrix dims."""

    n: int
    d: int
    backend: str = "auto"
    weight_cache = None  # a vqdm.models.weight_cache.WeightCache, set by install_weight_cache

    def _init_format(self, n: int, d: int, num_codebooks: int, group_size: int, bias: bool, device, dtype) -> None:
        self.n, self.d = n, d
        self.num_codebooks, self.group_size, self.nbits = num_codebooks, group_size, NBITS
        codes, codebooks, scales = self.vq_format.empty(n, d, device, dtype)
        self.register_buffer("codes", codes)
        self.codebooks = nn.Parameter(codebooks, requires_grad=False)
        self.scales = nn.Parameter(scales, requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(n, dtype=dtype, device=device), requires_grad=False) if bias else None

    @property
    def vq_format(self) -> VQFormat:
        return VQFormat(self.num_codebooks, self.nbits, self.group_size)

    def set_quantized(self, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> None:
        """Copy a quantized weight in, checking it fits this layer."""
        self.vq_format.check_shapes(self.n, self.d, codes, codebooks, scales)
        with torch.no_grad():
            self.codes.copy_(codes.to(CODE_DTYPE))
            self.codebooks.copy_(codebooks)
            self.scales.copy_(scales)

    def dequantize_matrix(self) -> torch.Tensor:
        """Dense weight as a matrix [n, d] (convs in (k_h, k_w, C_in) column order)."""
        return dequantize(self.codes, self.codebooks, self.scales)

    def extra_repr(self) -> str:
        return f"n={self.n}, d={self.d}, K={self.num_codebooks}, g={self.group_size}, bias={self.bias is not None}"


class VQLinear(_VQBase):
    def __init__(self, in_features: int, out_features: int, num_codebooks: int, group_size: int = GROUP_SIZE,
                 bias: bool = True, device=None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_format(out_features, in_features, num_codebooks, group_size, bias, device, dtype)

    @classmethod
    def like(cls, layer: nn.Linear, num_codebooks: int, group_size: int = GROUP_SIZE) -> "VQLinear":
        return cls(layer.in_features, layer.out_features, num_codebooks, group_size,
                   bias=layer.bias is not None, device=layer.weight.device, dtype=layer.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_cache.lookup(self, x) if self.weight_cache is not None else None
        if w is not None:  # a cached dense weight (vqdm.models.weight_cache)
            return linear_decoded(x, w, self.bias)
        return vq_linear(x, self.codes, self.codebooks, self.scales, self.bias, backend=self.backend)


class VQConv2d(_VQBase):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], num_codebooks: int,
                 group_size: int = GROUP_SIZE, stride: tuple[int, int] = (1, 1), padding: tuple[int, int] = (0, 0),
                 dilation: tuple[int, int] = (1, 1), bias: bool = True, device=None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = tuple(kernel_size), tuple(stride)
        self.padding, self.dilation = tuple(padding), tuple(dilation)
        d = self.kernel_size[0] * self.kernel_size[1] * in_channels
        self._init_format(out_channels, d, num_codebooks, group_size, bias, device, dtype)

    @classmethod
    def like(cls, layer: nn.Conv2d, num_codebooks: int, group_size: int = GROUP_SIZE) -> "VQConv2d":
        if layer.groups != 1 or isinstance(layer.padding, str) or layer.padding_mode != "zeros":
            raise ValueError("only groups=1 convolutions with explicit zero padding can be quantized")
        return cls(layer.in_channels, layer.out_channels, layer.kernel_size, num_codebooks, group_size,
                   layer.stride, layer.padding, layer.dilation, bias=layer.bias is not None,
                   device=layer.weight.device, dtype=layer.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_cache.lookup(self, x) if self.weight_cache is not None else None
        if w is not None:
            return conv2d_decoded(x, w, self.bias, self.stride, self.padding, self.dilation)
        return vq_conv2d(x, self.codes, self.codebooks, self.scales, self.bias, self.in_channels,
                         self.kernel_size, self.stride, self.padding, self.dilation, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, " + super().extra_repr()


VQ_MODULES = (VQLinear, VQConv2d)
