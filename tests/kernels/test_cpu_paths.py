"""CPU decode-then-BLAS and lookup-table paths against the plain-torch reference."""
from __future__ import annotations

import pytest
import torch

from tests.kernels.conftest import random_vq, rel_err
from vqdm.kernels import cpu_decode, dequantize, vq_conv2d, vq_conv2d_reference, vq_linear, vq_linear_reference

# Relative L2 error allowed per activation dtype (the reference computes in fp32).
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("n,d", [(40, 264), (333, 48), (7, 8)])
def test_decode_matches_reference(monkeypatch, n, d, k):
    # Small chunks force several chunks and a ragged last one.
    monkeypatch.setattr(cpu_decode, "CHUNK_BYTES", 3 * d * 4 + 4)
    codes, cb, s, _ = random_vq(n, d, k, seed=n + k)
    ref = dequantize(codes, cb, s)
    assert torch.equal(cpu_decode.decode_cpu(codes, cb, s), ref)
    w16 = cpu_decode.decode_cpu(codes, cb.half(), s.half(), torch.bfloat16)
    assert w16.dtype == torch.bfloat16 and rel_err(w16, ref) < 1e-2


def test_decode_respects_out_and_rejects_bad_out():
    codes, cb, s, _ = random_vq(16, 24, 2)
    out = torch.full((16, 24), float("nan"))
    assert cpu_decode.decode_cpu(codes, cb, s, out=out) is out
    assert torch.equal(out, dequantize(codes, cb, s))
    with pytest.raises(ValueError, match="contiguous"):
        cpu_decode.decode_cpu(codes, cb, s, out=torch.empty(24, 16).t())


@pytest.mark.parametrize("backend", ["cpu_decode", "cpu_lut"])
@pytest.mark.parametrize("m", [1, 77, 333])
@pytest.mark.parametrize("n,d,k", [(40, 264, 3), (333, 48, 4), (24, 16, 1), (17, 40, 2)])
def test_linear_matches_reference(backend, m, n, d, k):
    codes, cb, s, b = random_vq(n, d, k, seed=m)
    x = torch.randn(m, d)
    ref = vq_linear_reference(x, codes, cb, s, b)
    assert rel_err(vq_linear(x, codes, cb, s, b, backend=backend), ref) < TOL[torch.float32]
    assert rel_err(vq_linear(x, codes, cb, s, None, backend=backend), vq_linear_reference(x, codes, cb, s)) < 1e-5


@pytest.mark.parametrize("backend", ["cpu_decode", "cpu_lut"])
def test_linear_bf16_and_batched_input(backend):
    codes, cb, s, b = random_vq(72, 136, 4)
    x = torch.randn(2, 77, 136)
    ref = vq_linear_reference(x, codes, cb, s, b)
    y = vq_linear(x.bfloat16(), codes, cb, s, b, backend=backend)
    assert y.shape == (2, 77, 72) and y.dtype == torch.bfloat16
    assert rel_err(y, ref) < TOL[torch.bfloat16]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("cin,cout,ksize,stride,padding,k", [
    (16, 24, (1, 1), (1, 1), (0, 0), 4),
    (24, 40, (3, 3), (1, 1), (1, 1), 3),
    (8, 16, (3, 3), (2, 2), (1, 1), 2),
    (16, 8, (3, 1), (1, 2), (1, 0), 1),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_matches_reference(cin, cout, ksize, stride, padding, k, channels_last, dtype):
    codes, cb, s, b = random_vq(cout, ksize[0] * ksize[1] * cin, k, seed=cin + cout)
    x = torch.randn(2, cin, 11, 9)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ref = vq_conv2d_reference(x, codes, cb, s, b, cin, ksize, stride, padding)
    y = vq_conv2d(x.to(dtype), codes, cb, s, b, cin, ksize, stride, padding, backend="cpu_decode")
    assert y.shape == ref.shape and y.dtype == dtype
    assert rel_err(y, ref) < TOL[dtype]
    # The U-Net around the conv keeps its layout: output in x's memory format.
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt)


def test_scratch_holds_one_layer_and_is_reused():
    cpu_decode.release_scratch()
    big, small = random_vq(64, 512, 4), random_vq(32, 64, 4)
    x_big, x_small = torch.randn(5, 512), torch.randn(5, 64)
    vq_linear(x_big, *big[:3], backend="cpu_decode")
    held = cpu_decode.scratch_bytes()
    assert held == 64 * 512 * 4  # exactly the largest layer decoded so far, fp32
    y1 = vq_linear(x_small, *small[:3], backend="cpu_decode")
    vq_linear(x_big, *big[:3], backend="cpu_decode")
    assert cpu_decode.scratch_bytes() == held  # reused, not grown
    # Results do not alias the scratch: decoding another layer leaves y1 unchanged.
    assert rel_err(y1, vq_linear_reference(x_small, *small[:3])) < 1e-5


def test_scratch_first_grown_under_inference_mode_serves_callers_outside_it():
    """The server decodes under inference_mode; the same thread may later decode under no_grad."""
    from vqdm.kernels.cpu_decode import release_scratch, vq_linear_cpu_decode

    codes = torch.randint(0, 256, (16, 4, 2), dtype=torch.uint8)
    books, scales, x = torch.randn(2, 256, 8), torch.rand(16) + 0.5, torch.randn(3, 32)
    release_scratch()
    with torch.inference_mode():
        a = vq_linear_cpu_decode(x, codes, books, scales)
    with torch.no_grad():
        b = vq_linear_cpu_decode(x, codes, books, scales)
    assert torch.equal(a, b)
