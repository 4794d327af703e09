"""The auto rule, the backend registry and its error messages, and autograd through dispatch."""
from __future__ import annotations

import pytest
import torch

from tests.kernels.conftest import random_vq, rel_err
from vqdm.kernels import (available_backends, choose_backend, cpu_decode, decode_weight, dequantize, dispatch,
                          vq_conv2d, vq_linear, vq_linear_reference)


def test_cpu_backends_listed():
    names = available_backends("cpu")
    assert {"reference", "cpu_decode", "cpu_lut"} <= set(names)
    assert "cpu_decode" not in available_backends("meta")


def test_auto_rule_on_cpu():
    codes, cb, s, b = random_vq(32, 64, 3)
    small, large = torch.randn(dispatch.CPU_LUT_MAX_ROWS, 64), torch.randn(dispatch.CPU_LUT_MAX_ROWS + 1, 64)
    assert choose_backend("linear", small, codes, cb, s, b) == "cpu_lut"
    assert choose_backend("linear", large, codes, cb, s, b) == "cpu_decode"
    assert choose_backend("conv2d", torch.randn(1, 8, 4, 4), codes, cb, s, b) == "cpu_decode"
    # A gradient for x keeps to the decode path (the LUT is an inference path for tiny M) ...
    assert choose_backend("linear", small.requires_grad_(), codes, cb, s, b) == "cpu_decode"
    # ... and a gradient for codebooks/scales/bias trains on the reference (see choose_backend).
    assert choose_backend("linear", large, codes, cb.requires_grad_(), s, b) == "reference"
    with torch.no_grad():
        assert choose_backend("linear", large, codes, cb, s, b) == "cpu_decode"


def test_auto_is_differentiable_for_distillation():
    codes, cb, s, b = random_vq(24, 40, 2)
    x = torch.randn(9, 40, requires_grad=True)
    grads = []
    for fn in (lambda *a: vq_linear(*a, backend="auto"), vq_linear_reference):
        cbr, sr, br = (t.clone().requires_grad_() for t in (cb, s, b))
        x.grad = None
        fn(x, codes, cbr, sr, br).square().sum().backward()
        grads.append([t.grad.clone() for t in (x, cbr, sr, br)])
    for g_auto, g_ref in zip(*grads):
        assert torch.allclose(g_auto, g_ref, rtol=1e-5, atol=1e-6)


def test_decode_path_is_differentiable_in_x():
    codes, cb, s, b = random_vq(24, 40, 2)
    x = torch.randn(9, 40, requires_grad=True)
    vq_linear(x, codes, cb, s, b, backend="cpu_decode").sum().backward()
    w = dequantize(codes, cb, s)
    assert torch.allclose(x.grad, w.sum(0).expand(9, -1), rtol=1e-5, atol=1e-5)


def test_errors_name_the_fix():
    codes, cb, s, b = random_vq(16, 16, 1)
    x = torch.randn(2, 16)
    with pytest.raises(ValueError, match="unknown backend 'fast'.*available"):
        vq_linear(x, codes, cb, s, backend="fast")
    with pytest.raises(ValueError, match="no conv2d path; use 'cpu_decode'"):
        vq_conv2d(torch.randn(1, 16, 3, 3), codes, cb, s, None, 16, (1, 1), backend="cpu_lut")
    with pytest.raises(ValueError, match="codes have 1 codebooks"):
        vq_linear(x, codes, cb.repeat(2, 1, 1), s)


def test_decode_weight_owns_its_memory():
    codes, cb, s, _ = random_vq(16, 48, 3)
    w = decode_weight(codes, cb, s, torch.float32)
    assert torch.equal(w, dequantize(codes, cb, s))
    other = random_vq(16, 48, 3, seed=1)
    vq_linear(torch.randn(3, 48), *other[:3], backend="cpu_decode")  # reuses the scratch
    assert torch.equal(w, dequantize(codes, cb, s))
    assert w.data_ptr() != cpu_decode._SCRATCH.get(1, torch.float32).data_ptr()
    wc = decode_weight(codes, cb, s, torch.float32, conv=(16, (3, 1)))
    assert wc.shape == (16, 16, 3, 1)
    assert rel_err(wc.reshape(16, -1), dequantize(codes, cb, s).view(16, 3, 1, 16).permute(0, 3, 1, 2).reshape(16, -1)) == 0
