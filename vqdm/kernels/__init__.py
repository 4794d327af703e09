"""Decode-and-multiply for the VQ weight format (SPEC §2, §7).

`vq_linear(x, codes, codebooks, scales, bias=None, backend="auto")` and `vq_conv2d(...)` are the
entry points; the choice between paths lives in `kernels.dispatch` (`choose_backend`). Each call
runs as a torch.library custom op (`vqdm::vq_linear`, `vqdm::vq_conv2d`, `vqdm::decode`; see
`kernels.ops`), one node to torch.compile. Triton is imported only when a Triton backend is first used.
"""
from vqdm.kernels.reference import (
    conv_weight_from_matrix,
    conv_weight_to_matrix,
    dequantize,
    vq_conv2d_reference,
    vq_linear_reference,
)
from vqdm.kernels.decoded import conv2d_decoded, linear_decoded
from vqdm.kernels.dispatch import available_backends, choose_backend, decode_weight, vq_conv2d, vq_linear
from vqdm.kernels import ops  # noqa: F401  (registers the vqdm:: custom ops that dispatch calls)

__all__ = [
    "available_backends",
    "choose_backend",
    "conv2d_decoded",
    "conv_weight_from_matrix",
    "conv_weight_to_matrix",
    "decode_weight",
    "dequantize",
    "linear_decoded",
    "vq_conv2d",
    "vq_conv2d_reference",
    "vq_linear",
    "vq_linear_reference",
]
