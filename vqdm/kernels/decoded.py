"""Linear / conv on an already-decoded VQ weight (from a scratch buffer or a weight cache)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def conv_weight_view(w: torch.Tensor, in_channels: int, kernel_size: tuple[int, int]) -> torch.Tensor:
    """[C_out, k_h·k_w·C_in] -> [C_out, C_in, k_h, k_w] as a view (channels_last strides, no copy)."""
    kh, kw = kernel_size
    return w.view(w.shape[0], kh, kw, in_channels).permute(0, 3, 1, 2)


def conv_weight_for(x: torch.Tensor, w: torch.Tensor, in_channels: int, kernel_size: tuple[int, int]) -> torch.Tensor:
    """The decoded matrix [C_out, k_h·k_w·C_in] as the conv weight that moves fewer elements.

    As it stands it is a channels_last weight (a free view); with NCHW x, oneDNN / cuDNN then run
    the conv in NHWC, converting x in and y back to NCHW. One permute-copy of the weight to NCHW
    avoids both. Early, high-resolution layers (320/640 channels at 64²-128²) have small weights
    and large activations: copy the weight; deep layers the other way round.
    """
    w4 = conv_weight_view(w, in_channels, kernel_size)
    if kernel_size[0] * kernel_size[1] == 1 or x.dim() != 4 or not x.is_contiguous():
        return w4  # 1x1: both layouts are the same; channels_last x: the view is what cuDNN wants
    activation_elems = (x.numel() // x.shape[1]) * (x.shape[1] + w.shape[0])  # x in + y out (stride 1)
    return w4.contiguous() if w.numel() <= activation_elems else w4


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
