"""Plain-torch reference for the VQ weight format; every fast path is tested against it.

The format and its decode live in `vqdm.vq_format` (`dequantize` here is `vq_format.decode`).
Convolutions are stored as [C_out, k_h·k_w·C_in] with columns in (k_h, k_w, C_in) order.
All functions here are differentiable in codebooks and scales.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vqdm.vq_format import decode as dequantize
from vqdm.vq_format import decode_groups


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


def decode_backward(grad_w: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor,
                    scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dcodebooks, dL/dscales) from dL/dŴ [n, d]: the gradient of `dequantize` in closed form.

    Ŵ[i, g·j + t] = s_i · Σ_m C_m[b[i, j, m], t], so dL/ds_i = Σ_cols dL/dŴ · U (U: Ŵ before the
    scales) and dL/dC_m[c] sums s_i · dL/dŴ over every group whose code m is c. Plain torch ops,
    so AOT autograd traces it into a compiled backward; results in the codebooks'/scales' dtypes.
    """
    n, groups, k = codes.shape
    cb_size, g = codebooks.shape[1], codebooks.shape[2]
    gw = grad_w.to(codebooks.dtype).reshape(n, groups, g)
    unscaled = decode_groups(codes, codebooks)  # [n, d/g, g]
    grad_scales = (gw * unscaled).sum((1, 2)).to(scales.dtype)
    grad_u = (gw * scales.to(gw.dtype)[:, None, None]).reshape(n * groups, g)
    idx = codes.long().reshape(n * groups, k)
    grad_cb = torch.stack([grad_u.new_zeros(cb_size, g).index_add(0, idx[:, m], grad_u) for m in range(k)])
    return grad_cb, grad_scales


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
