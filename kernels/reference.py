"""Plain-torch reference for the VQ weight format; every fast path is tested against it.

Format (SPEC §2), for a weight W [n, d] cut into groups of g consecutive inputs:
    Ŵ[i, g·j : g·(j+1)] = s_i · Σ_m C_m[b[i, j, m]]
    codes     [n, d/g, K]  uint8   (B = 8: codeword index per group and codebook)
    codebooks [K, 2^B, g]  float
    scales    [n]          float   (one per output channel)
Convolutions are stored as [C_out, k_h·k_w·C_in] with columns in (k_h, k_w, C_in) order.
All functions here are differentiable in codebooks and scales.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def check_format(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> None:
    """Raise ValueError with a readable message when the three tensors do not fit together."""
    if codes.dim() != 3:
        raise ValueError(f"codes must be [n, d/g, K], got shape {tuple(codes.shape)}")
    if codes.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8, got {codes.dtype}")
    if codebooks.dim() != 3:
        raise ValueError(f"codebooks must be [K, 2^B, g], got shape {tuple(codebooks.shape)}")
    n, _, k = codes.shape
    if codebooks.shape[0] != k:
        raise ValueError(
            f"codes have {k} codebooks but codebooks tensor holds {codebooks.shape[0]}"
        )
    if codebooks.shape[1] > 256:
        raise ValueError(f"uint8 codes address at most 256 codewords, codebooks have {codebooks.shape[1]}")
    if scales.shape != (n,):
        raise ValueError(f"scales must be [n]={n}, got shape {tuple(scales.shape)}")


def dequantize(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Decode to a dense weight [n, d] in the codebooks' dtype."""
    check_format(codes, codebooks, scales)
    n, groups, k = codes.shape
    g = codebooks.shape[2]
    idx = codes.long()
    w = codebooks[0][idx[:, :, 0]]  # [n, d/g, g]
    for m in range(1, k):
        w = w + codebooks[m][idx[:, :, m]]
    return w.reshape(n, groups * g) * scales.to(w.dtype)[:, None]


def vq_linear_reference(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x Ŵᵀ + bias for x [..., d] -> y [..., n], computed in x's dtype."""
    w = dequantize(codes, codebooks, scales).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def conv_weight_from_matrix(w: torch.Tensor, in_channels: int, kernel_size: tuple[int, int]) -> torch.Tensor:
    """[C_out, k_h·k_w·C_in] in (k_h, k_w, C_in) column order -> conv weight [C_out, C_in, k_h, k_w]."""
    kh, kw = kernel_size
    return w.reshape(w.shape[0], kh, kw, in_channels).permute(0, 3, 1, 2).contiguous()


def conv_weight_to_matrix(weight: torch.Tensor) -> torch.Tensor:
    """Conv weight [C_out, C_in, k_h, k_w] -> [C_out, k_h·k_w·C_in] in (k_h, k_w, C_in) order."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def vq_conv2d_reference(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    in_channels: int,
    kernel_size: tuple[int, int],
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
) -> torch.Tensor:
    """Conv2d of NCHW x with the decoded weight."""
    w = conv_weight_from_matrix(dequantize(codes, codebooks, scales), in_channels // groups, kernel_size)
    return F.conv2d(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype), stride, padding, dilation, groups)
