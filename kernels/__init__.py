"""Decode-and-multiply for the VQ weight format (SPEC §2, §7).

`vq_linear(x, codes, codebooks, scales, bias=None, backend="auto")` is the one entry point;
the choice between paths lives in `kernels.dispatch`.
"""
from vqdm.kernels.reference import (
    conv_weight_from_matrix,
    conv_weight_to_matrix,
    dequantize,
    vq_conv2d_reference,
    vq_linear_reference,
)
from vqdm.kernels.dispatch import available_backends, vq_conv2d, vq_linear

__all__ = [
    "available_backends",
    "conv_weight_from_matrix",
    "conv_weight_to_matrix",
    "dequantize",
    "vq_conv2d",
    "vq_conv2d_reference",
    "vq_linear",
    "vq_linear_reference",
]
