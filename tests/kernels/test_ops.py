"""The `vqdm::` custom ops (vqdm/kernels/ops.py): torch.library.opcheck (schema, fake tensors,
autograd registration, AOT dispatch) per backend, and outputs and gradients against the plain-torch
reference, with autograd through `dequantize`."""
from __future__ import annotations

import pytest
import torch

from tests.kernels.conftest import random_vq, rel_err
from vqdm.kernels import (available_backends, decode_weight, dequantize, vq_conv2d, vq_conv2d_reference, vq_linear,
                          vq_linear_reference)
from vqdm.kernels.reference import decode_backward

CPU_LINEAR = [b for b in ("reference", "cpu_decode", "cpu_lut", "triton_decode", "triton_fused")
              if b in available_backends("cpu")]
CPU_CONV = [b for b in ("reference", "cpu_decode", "triton_decode") if b in available_backends("cpu")]


def _grads(fn, x, codes, cb, s, b):
    """Output and (x, codebooks, scales, bias) gradients of fn under a fixed upstream gradient."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, cb, s, b)]
    xl, cbl, sl, bl = leaves
    y = fn(xl, codes, cbl, sl, bl)
    y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape).to(y.dtype))
    return y.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("backend", CPU_LINEAR)
def test_linear_op_passes_opcheck_and_matches_reference(backend):
    codes, cb, s, b = random_vq(24, 40, 3)
    x = torch.randn(2, 5, 40)
    args = (x.requires_grad_(), codes, cb.requires_grad_(), s.requires_grad_(), b.requires_grad_(), backend)
    torch.library.opcheck(torch.ops.vqdm.vq_linear.default, args)
    if backend == "reference":  # no bias, 2-D x, nothing needing a gradient
        torch.library.opcheck(torch.ops.vqdm.vq_linear.default, (x.detach()[0], codes, cb.detach(), s.detach(), None,
                                                                 backend))
    y, grads = _grads(lambda *a: vq_linear(*a, backend=backend), x, codes, cb, s, b)
    y_ref, grads_ref = _grads(vq_linear_reference, x, codes, cb, s, b)
    assert rel_err(y, y_ref) < 1e-5
    for name, g, g_ref in zip(("x", "codebooks", "scales", "bias"), grads, grads_ref):
        assert rel_err(g, g_ref) < 1e-5, name


@pytest.mark.parametrize("backend,layout", [(b, "nchw") for b in CPU_CONV] + [("cpu_decode", "channels_last")])
def test_conv_op_passes_opcheck_and_matches_reference(backend, layout):
    codes, cb, s, b = random_vq(6, 9 * 16, 2)
    x = torch.randn(2, 16, 7, 9)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    geometry = (16, (3, 3), (2, 1), (1, 0), (1, 1), 1)
    args = (x.requires_grad_(), codes, cb.requires_grad_(), s.requires_grad_(), b.requires_grad_(), *geometry, backend)
    torch.library.opcheck(torch.ops.vqdm.vq_conv2d.default, args)
    y, grads = _grads(lambda *a: vq_conv2d(*a, *geometry, backend=backend), x, codes, cb, s, b)
    y_ref, grads_ref = _grads(lambda *a: vq_conv2d_reference(*a, *geometry), x, codes, cb, s, b)
    assert y.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    assert rel_err(y, y_ref) < 1e-5
    for name, g, g_ref in zip(("x", "codebooks", "scales", "bias"), grads, grads_ref):
        assert rel_err(g, g_ref) < 1e-5, name


@pytest.mark.parametrize("k", [1, 3])
def test_decode_op_and_closed_form_gradient_match_reference(k):
    codes, cb, s, _ = random_vq(12, 32, k)
    torch.library.opcheck(torch.ops.vqdm.decode.default,
                          (codes, cb.requires_grad_(), s.requires_grad_(), torch.float32))
    assert rel_err(decode_weight(codes, cb, s, torch.float32), dequantize(codes, cb, s)) < 1e-6
    grad_w = torch.randn(12, 32)
    cb_ref, s_ref = (t.detach().clone().requires_grad_() for t in (cb, s))
    dequantize(codes, cb_ref, s_ref).backward(grad_w)
    gcb, gs = decode_backward(grad_w, codes, cb.detach(), s.detach())
    assert rel_err(gcb, cb_ref.grad) < 1e-6 and rel_err(gs, s_ref.grad) < 1e-6


def test_ops_are_single_nodes_to_torch_compile():
    """No Python of a backend reaches the graph: one vq_linear node, one vq_conv2d node."""
    codes, cb, s, b = random_vq(8, 16, 2)
    graphs = []

    def backend(gm, _inputs):
        graphs.append(gm)
        return gm.forward

    def f(x, x4):
        return vq_linear(x, codes, cb, s, b).sum() + vq_conv2d(x4, codes, cb, s, b, 16, (1, 1)).sum()

    f_c = torch.compile(f, backend=backend, fullgraph=True)
    x, x4 = torch.randn(6, 16), torch.randn(1, 16, 3, 3)
    assert torch.allclose(f_c(x, x4), f(x, x4), rtol=1e-5)
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert targets.count("vqdm.vq_linear") == 1 and targets.count("vqdm.vq_conv2d") == 1
    assert not any("embedding_bag" in t for t in targets)  # the cpu_decode internals stay inside the op
