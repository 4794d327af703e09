"""Triton fused dequant-GEMM and decode kernels against the reference.

Without a GPU these run under TRITON_INTERPRET=1 (see conftest.py) on tiny shapes, fp32/fp16 (the
interpreter's bf16 dot is not faithful). On a GPU the same tests also run bf16 and larger shapes.
"""
from __future__ import annotations

import pytest
import torch

from tests.kernels.conftest import ON_GPU, random_vq, rel_err
from vqdm.kernels import dequantize, vq_conv2d, vq_conv2d_reference, vq_linear, vq_linear_reference

# Relative L2 error allowed per activation dtype (weights rounded to it, fp32 accumulation).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
SHAPES = [  # (M, n, d, K): M = 1 and 77 with n, d off every tile size, each K once
    (1, 24, 40, 3), (77, 40, 24, 4), (5, 17, 16, 1), (33, 8, 72, 2),
] + ([(333, 1000, 1288, 3), (154, 1280, 2048, 4), (1, 640, 640, 4)] if ON_GPU else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,d,k", SHAPES)
@pytest.mark.parametrize("backend", ["triton_fused", "triton_decode"])
def test_linear_matches_reference(triton_device, backend, m, n, d, k, dtype):
    codes, cb, s, b = random_vq(n, d, k, device=triton_device, seed=m + n)
    x = torch.randn(m, d, device=triton_device)
    ref = vq_linear_reference(x, codes, cb, s, b)
    y = vq_linear(x.to(dtype), codes, cb.half(), s, b, backend=backend)
    assert y.shape == (m, n) and y.dtype == dtype
    assert rel_err(y, vq_linear_reference(x, codes, cb.half().float(), s, b)) < TOL[dtype]
    assert rel_err(y, ref) < TOL[dtype] + 1e-3  # fp16 codebooks at rest


def test_fused_batched_input_without_bias(triton_device):
    codes, cb, s, _ = random_vq(24, 32, 4, device=triton_device)
    x = torch.randn(2, 3, 32, device=triton_device, dtype=torch.float16)
    y = vq_linear(x, codes, cb, s, None, backend="triton_fused")
    assert y.shape == (2, 3, 24)
    assert rel_err(y, vq_linear_reference(x.float(), codes, cb, s)) < TOL[torch.float16]


@pytest.mark.parametrize("k", [1, 3, 4])
def test_decode_kernel_matches_dequantize(triton_device, k):
    from vqdm.kernels.triton_vq import decode_triton

    codes, cb, s, _ = random_vq(45, 88, k, device=triton_device, seed=k)
    ref = dequantize(codes, cb, s)
    assert rel_err(decode_triton(codes, cb, s, torch.float32), ref) < 1e-6
    # conv layout: columns (k_h, k_w, C_in) land in an NCHW [C_out, C_in, k_h, k_w] weight
    codes, cb, s, _ = random_vq(12, 9 * 8, k, device=triton_device, seed=k)
    w = decode_triton(codes, cb, s, torch.float32, conv=(8, (3, 3)))
    assert w.is_contiguous() and w.shape == (12, 8, 3, 3)
    assert rel_err(w, dequantize(codes, cb, s).view(12, 3, 3, 8).permute(0, 3, 1, 2)) < 1e-6


@pytest.mark.parametrize("cin,cout,ksize,stride,padding,k", [
    (16, 24, (1, 1), (1, 1), (0, 0), 4),
    (8, 16, (3, 3), (2, 2), (1, 1), 3),
])
def test_conv_matches_reference(triton_device, cin, cout, ksize, stride, padding, k):
    codes, cb, s, b = random_vq(cout, ksize[0] * ksize[1] * cin, k, device=triton_device)
    x = torch.randn(2, cin, 7, 9, device=triton_device)
    ref = vq_conv2d_reference(x, codes, cb, s, b, cin, ksize, stride, padding)
    dtype = torch.float16 if ON_GPU else torch.float32
    y = vq_conv2d(x.to(dtype), codes, cb, s, b, cin, ksize, stride, padding, backend="triton_decode")
    assert rel_err(y, ref) < TOL[dtype]
