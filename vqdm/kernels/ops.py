"""The VQ layers as torch.library custom ops: `vqdm::vq_linear`, `vqdm::vq_conv2d`, `vqdm::decode`.

torch.compile sees each call as one graph node, shaped by a fake (meta) implementation, instead
of tracing the Python of the backend that runs it (scratch buffers, chunk loops, Triton launches)
into the graph. The backend is an argument: `dispatch` resolves "auto" with `choose_backend`
before the call (at trace time under torch.compile, so a compiled graph keeps the backend it was
traced with) and the op runs that backend whenever the graph runs.

Autograd is registered once for every backend, in plain torch from the reference decode
(`reference.decode_backward`): gradients reach x, codebooks, scales and bias whichever backend ran
the forward, and AOT autograd traces the backward like any other. The backward saves x and the
quantized tensors, never a dense weight: it decodes again.

Outputs are fresh tensors in a fixed layout (linear: contiguous; conv: x's memory format), which
is what the fake implementations promise.

(No `from __future__ import annotations` here: custom_op reads the type hints as types.)
"""
from typing import Optional, Sequence

import torch
from torch import Tensor

from vqdm.kernels.cpu_decode import decode_cpu
from vqdm.kernels.dispatch import backend_function, triton_decodes
from vqdm.kernels.reference import conv_weight_from_matrix, conv_weight_to_matrix, decode_backward, dequantize
from vqdm.vq_format import check_format


def _conv_out_format(x: Tensor) -> torch.memory_format:
    # decoded.conv2d_decoded's rule, applied to every backend so the fake can promise it.
    keep_cl = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if keep_cl else torch.contiguous_format


def _check_linear(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor) -> None:
    check_format(codes, codebooks, scales)
    d = codes.shape[1] * codebooks.shape[2]
    if x.shape[-1] != d:
        raise ValueError(f"x has {x.shape[-1]} input features, the VQ weight expects {d}")


# -- vq_linear ------------------------------------------------------------------------------------------
@torch.library.custom_op("vqdm::vq_linear", mutates_args=())
def vq_linear_op(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor, bias: Optional[Tensor],
                 backend: str) -> Tensor:
    """y = x Ŵᵀ + bias by the named backend (never "auto": dispatch resolves it)."""
    return backend_function(backend, "linear")(x, codes, codebooks, scales, bias).contiguous()


@vq_linear_op.register_fake
def _(x, codes, codebooks, scales, bias, backend):
    _check_linear(x, codes, codebooks, scales)
    return x.new_empty((*x.shape[:-1], codes.shape[0]))


def _linear_setup(ctx, inputs, output) -> None:
    x, codes, codebooks, scales, bias, _ = inputs
    ctx.save_for_backward(x, codes, codebooks, scales)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _linear_backward(ctx, grad: Tensor):
    x, codes, codebooks, scales = ctx.saved_tensors
    need_x, _, need_cb, need_s, need_b, _ = ctx.needs_input_grad
    n, d = codes.shape[0], x.shape[-1]
    grad2 = grad.reshape(-1, n)
    gx = gcb = gs = gb = None
    if need_x:
        gx = grad.matmul(dequantize(codes, codebooks, scales).to(grad.dtype))
    if need_cb or need_s:
        gw = grad2.t().matmul(x.reshape(-1, d).to(grad.dtype))  # dL/dŴ [n, d]
        gcb, gs = decode_backward(gw, codes, codebooks, scales)
    if need_b:
        gb = grad2.sum(0).to(ctx.bias_dtype)
    return gx, None, gcb if need_cb else None, gs if need_s else None, gb, None


vq_linear_op.register_autograd(_linear_backward, setup_context=_linear_setup)


# -- vq_conv2d ------------------------------------------------------------------------------------------
@torch.library.custom_op("vqdm::vq_conv2d", mutates_args=())
def vq_conv2d_op(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor, bias: Optional[Tensor],
                 in_channels: int, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                 dilation: Sequence[int], groups: int, backend: str) -> Tensor:
    """Conv2d of NCHW x with the VQ weight [C_out, k_h·k_w·C_in/groups], by the named backend."""
    fn = backend_function(backend, "conv2d")
    y = fn(x, codes, codebooks, scales, bias, in_channels, tuple(kernel_size), tuple(stride), tuple(padding),
           tuple(dilation), groups)
    return y.contiguous(memory_format=_conv_out_format(x))


@vq_conv2d_op.register_fake
def _(x, codes, codebooks, scales, bias, in_channels, kernel_size, stride, padding, dilation, groups, backend):
    check_format(codes, codebooks, scales)
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise ValueError(f"x must be NCHW with {in_channels} channels, got shape {tuple(x.shape)}")
    size = [(x.shape[2 + i] + 2 * padding[i] - dilation[i] * (kernel_size[i] - 1) - 1) // stride[i] + 1
            for i in range(2)]
    return x.new_empty((x.shape[0], codes.shape[0], *size)).contiguous(memory_format=_conv_out_format(x))


def _conv_setup(ctx, inputs, output) -> None:
    x, codes, codebooks, scales, bias, in_channels, kernel_size, stride, padding, dilation, groups, _ = inputs
    ctx.save_for_backward(x, codes, codebooks, scales)
    ctx.conv = (in_channels, tuple(kernel_size), list(stride), list(padding), list(dilation), groups)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _conv_backward(ctx, grad: Tensor):
    x, codes, codebooks, scales = ctx.saved_tensors
    in_channels, kernel_size, stride, padding, dilation, groups = ctx.conv
    need_x, _, need_cb, need_s, need_b = ctx.needs_input_grad[:5]
    gx = gcb = gs = gb = None
    if need_x or need_cb or need_s:
        w = conv_weight_from_matrix(dequantize(codes, codebooks, scales), in_channels // groups, kernel_size)
        gx, gw, _ = torch.ops.aten.convolution_backward(grad, x, w.to(grad.dtype), None, stride, padding, dilation,
                                                        False, [0, 0], groups, [need_x, need_cb or need_s, False])
        if need_cb or need_s:
            gcb, gs = decode_backward(conv_weight_to_matrix(gw), codes, codebooks, scales)
    if need_b:
        gb = grad.sum((0, 2, 3)).to(ctx.bias_dtype)
    return (gx if need_x else None, None, gcb if need_cb else None, gs if need_s else None, gb,
            None, None, None, None, None, None, None)


vq_conv2d_op.register_autograd(_conv_backward, setup_context=_conv_setup)


# -- decode ---------------------------------------------------------------------------------------------
@torch.library.custom_op("vqdm::decode", mutates_args=())
def decode_op(codes: Tensor, codebooks: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """A fresh dense Ŵ [n, d] in `dtype` by the fastest decoder on codes' device."""
    dev = codes.device.type
    if dev == "cuda" and triton_decodes(codebooks):
        from vqdm.kernels import triton_vq  # imported on first use (see dispatch._triton_fn)

        return triton_vq.decode_triton(codes, codebooks, scales, dtype)
    if dev == "cpu":
        return decode_cpu(codes, codebooks, scales, dtype)
    return dequantize(codes, codebooks, scales).to(dtype)


@decode_op.register_fake
def _(codes, codebooks, scales, dtype):
    check_format(codes, codebooks, scales)
    return codebooks.new_empty((codes.shape[0], codes.shape[1] * codebooks.shape[2]), dtype=dtype)


def _decode_setup(ctx, inputs, output) -> None:
    codes, codebooks, scales, _ = inputs
    ctx.save_for_backward(codes, codebooks, scales)


def _decode_backward(ctx, grad: Tensor):
    codes, codebooks, scales = ctx.saved_tensors
    gcb, gs = decode_backward(grad, codes, codebooks, scales)
    return None, gcb if ctx.needs_input_grad[1] else None, gs if ctx.needs_input_grad[2] else None, None


decode_op.register_autograd(_decode_backward, setup_context=_decode_setup)
