"""Linear / conv on an already-decoded VQ weight (from a scratch buffer or a weight cache)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def conv_weight_view(w: torch.Tensor, in_channels: int, kernel_size: tuple[int, int]) -> torch.Tensor:
    """[C_out, k_h·k_w·C_in] -> [C_out, C_in, k_h, k_w] as a view (channels_last strides, no copy)."""
    kh, kw = kernel_size
    return w.view(w.shape[0], kh, kw, in_channels).permute(0, 3, 1, 2)


def linear_decoded(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x wᵀ + bias, w [n, d] already scaled by s_out."""
    return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


def conv2d_decoded(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, stride=(1, 1), padding=(0, 0),
                   dilation=(1, 1), groups: int = 1) -> torch.Tensor:
    """Conv with a decoded weight [C_out, C_in, k_h, k_w] of any strides; output in x's memory format.

    A channels_last weight (the CPU decode's natural layout) makes oneDNN run the conv in NHWC, at
    the same speed as NCHW on the machine measured, and return NHWC; the U-Net around it is NCHW,
    so the result is brought back to x's layout (a no-op when it already is).
    """
    y = F.conv2d(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype), stride, padding, dilation, groups)
    keep_cl = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return y.contiguous(memory_format=torch.channels_last if keep_cl else torch.contiguous_format)
