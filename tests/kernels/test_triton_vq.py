"""Triton fused dequant-GEMM and decode kernels against the reference.

Without a GPU these run under TRITON_INTERPRET=1 (see conftest.py) on tiny shapes, fp32/fp16 (the
interpreter's bf16 dot is not faithful). On a GPU the same tests also run bf16 and larger shapes.
Every tile config (GPU default, interpreter, each autotune candidate) runs once on a shape ragged
against all of them; the per-call decode's scratch buffer is checked for reuse and for not leaking
into the weights that `decode_weight` hands to caches.
"""
from __future__ import annotations

import pytest
import torch

from tests.kernels.conftest import HAS_TRITON, ON_GPU, random_vq, rel_err
from vqdm.kernels import dequantize, vq_conv2d, vq_conv2d_reference, vq_linear, vq_linear_reference
from vqdm.kernels.dispatch import decode_weight

if HAS_TRITON:  # tests/conftest.py has set TRITON_INTERPRET before collection, where there is no GPU
    from triton.runtime.errors import OutOfResources

    from vqdm.kernels import triton_vq

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


def _config_names(kernel: str) -> list[str]:
    # "interpret" is what every other test here runs under the interpreter (and the slowest there).
    return [n for n in triton_vq.tile_configs(kernel) if n != "interpret"] if HAS_TRITON else []


# Ragged against every tile: M = 33 and n = 136 are off every BLOCK_M / BLOCK_N (16..128), d = 72
# (9 groups) off every BLOCK_K (16..64); the decode's 40 groups are off every BLOCK_J (32, 64).
@pytest.mark.parametrize("config", _config_names("matmul"))
def test_every_fused_tile_config_matches_reference(triton_device, config):
    # fp16 (and bf16 on a GPU), the dtypes it serves; its fp32 path (IEEE dot) runs in test_linear_matches_reference.
    codes, cb, s, b = random_vq(136, 72, 3, device=triton_device, seed=7)
    x = torch.randn(33, 72, device=triton_device)
    for dtype in [torch.float16] + ([torch.bfloat16] if ON_GPU else []):
        try:
            y = triton_vq.vq_linear_triton_fused(x.to(dtype), codes, cb.half(), s, b, config=config)
        except OutOfResources as e:  # only on a GPU; the autotuner skips such a config too
            pytest.skip(f"{config} does not fit this GPU: {e}")
        assert rel_err(y, vq_linear_reference(x, codes, cb.half().float(), s, b)) < TOL[dtype], (config, dtype)


@pytest.mark.parametrize("config", _config_names("decode"))
def test_every_decode_tile_config_matches_reference(triton_device, config):
    # fp16, the dtype it serves (fp32 runs in test_decode_kernel_matches_dequantize).
    codes, cb, s, _ = random_vq(136, 320, 3, device=triton_device, seed=8)
    w = triton_vq.decode_triton(codes, cb, s, torch.float16, config=config)
    assert w.dtype == torch.float16 and rel_err(w, dequantize(codes, cb, s)) < 1e-3


def test_configs_cover_defaults_and_autotune_space(triton_device):
    # What the parametrized tests above iterate is what the launch path uses.
    matmul, decode = triton_vq.tile_configs("matmul"), triton_vq.tile_configs("decode")
    assert matmul["default"] == triton_vq.MATMUL_DEFAULT_CONFIG and decode["default"] == triton_vq.DECODE_DEFAULT_CONFIG
    assert matmul["interpret"] == triton_vq.MATMUL_INTERPRET_CONFIG
    assert [c for n, c in matmul.items() if n.startswith("autotune")] == list(triton_vq.MATMUL_AUTOTUNE_CONFIGS)
    assert [c for n, c in decode.items() if n.startswith("autotune")] == list(triton_vq.DECODE_AUTOTUNE_CONFIGS)
    with pytest.raises(ValueError, match="unknown decode tile config 'nope'"):
        triton_vq.decode_triton(*random_vq(8, 16, 1, device=triton_device)[:3], config="nope")


def test_decode_scratch_is_reused_and_results_match(triton_device):
    triton_vq.release_decode_scratch()
    big = random_vq(40, 128, 4, device=triton_device, seed=1)
    x = torch.randn(5, 128, device=triton_device)
    for _ in range(2):  # the per-call path decodes into the scratch, sized to its layer
        assert rel_err(vq_linear(x, *big, backend="triton_decode"), vq_linear_reference(x, *big)) < 1e-5
    assert triton_vq.decode_scratch_bytes() == 40 * 128 * 4
    w = triton_vq.decode_triton_scratch(*big[:3], torch.float32)
    ptr = w.data_ptr()
    assert rel_err(w, dequantize(*big[:3])) < 1e-6
    # A smaller layer and a conv decode into the same buffer, and still match.
    small = random_vq(24, 64, 3, device=triton_device, seed=2)
    w = triton_vq.decode_triton_scratch(*small[:3], torch.float32)
    assert w.data_ptr() == ptr and rel_err(w, dequantize(*small[:3])) < 1e-6
    conv = random_vq(16, 9 * 8, 3, device=triton_device, seed=3)
    xc = torch.randn(2, 8, 5, 6, device=triton_device)
    y = vq_conv2d(xc, *conv, 8, (3, 3), (1, 1), (1, 1), backend="triton_decode")
    assert rel_err(y, vq_conv2d_reference(xc, *conv, 8, (3, 3), (1, 1), (1, 1))) < 1e-5
    assert triton_vq.decode_triton_scratch(*big[:3], torch.float32).data_ptr() == ptr
    assert triton_vq.decode_scratch_bytes() == 40 * 128 * 4
    # A larger layer grows it once; then that buffer is reused. Another dtype has its own.
    bigger = random_vq(48, 256, 2, device=triton_device, seed=4)
    ptr = triton_vq.decode_triton_scratch(*bigger[:3], torch.float32).data_ptr()
    w = triton_vq.decode_triton_scratch(*bigger[:3], torch.float32)
    assert w.data_ptr() == ptr and rel_err(w, dequantize(*bigger[:3])) < 1e-6
    w16 = triton_vq.decode_triton_scratch(*small[:3], torch.float16)
    assert w16.dtype == torch.float16 and rel_err(w16, dequantize(*small[:3])) < 1e-3
    assert triton_vq.decode_scratch_bytes() == 48 * 256 * 4 + 24 * 64 * 2


def test_decode_weight_owns_its_memory(triton_device):
    # Weight caches keep decode_weight's results: they must never be (views of) the scratch.
    codes, cb, s, _ = random_vq(24, 64, 3, device=triton_device, seed=5)
    ref = dequantize(codes, cb, s)
    kept = [decode_weight(codes, cb, s, torch.float32), decode_weight(codes, cb, s, torch.float32),
            triton_vq.decode_triton(codes, cb, s, torch.float32)]  # what decode_weight runs on CUDA
    scratch = triton_vq.decode_triton_scratch(codes, cb, s, torch.float32)
    assert len({t.untyped_storage().data_ptr() for t in [*kept, scratch]}) == 4
    other = random_vq(24, 64, 3, device=triton_device, seed=6)
    triton_vq.decode_triton_scratch(*other[:3], torch.float32)  # later layers overwrite the scratch ...
    for w in kept:  # ... and leave the kept weights as they were
        assert rel_err(w, ref) < 1e-6


def test_gradient_for_x_through_two_layers_matches_reference(triton_device):
    # Autograd keeps each layer's weight for the backward pass: the second layer's decode must not
    # overwrite the first one's (same size, so the same scratch if both used it).
    first = random_vq(32, 32, 3, device=triton_device, seed=13)
    second = random_vq(32, 32, 2, device=triton_device, seed=14)
    conv = random_vq(8, 9 * 8, 2, device=triton_device, seed=15)
    grads = []
    for backend in ("triton_decode", "reference"):
        x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0)).to(triton_device).requires_grad_()
        h = vq_linear(vq_linear(x, *first, backend=backend), *second, backend=backend)
        y = vq_conv2d(h.reshape(5, 8, 2, 2), *conv, 8, (3, 3), (1, 1), (1, 1), backend=backend)
        vq_conv2d(y, *conv, 8, (3, 3), (1, 1), (1, 1), backend=backend).square().sum().backward()
        grads.append(x.grad)
    assert rel_err(grads[0], grads[1]) < 1e-5


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_decode_scratch_replays_under_cuda_graph(triton_device):
    triton_vq.release_decode_scratch()
    codes, cb, s, b = random_vq(64, 128, 3, device="cuda", seed=10)
    x = torch.randn(16, 128, device="cuda", dtype=torch.float16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles, sizes the scratch) on a side stream, as torch advises
        vq_linear(x, codes, cb, s, b, backend="triton_decode")
    torch.cuda.current_stream().wait_stream(side)
    before = triton_vq.decode_scratch_bytes()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = vq_linear(x, codes, cb, s, b, backend="triton_decode")
    assert triton_vq.decode_scratch_bytes() == before  # the capture allocated no scratch
    x.copy_(torch.randn_like(x))
    other = random_vq(64, 128, 3, device="cuda", seed=11)
    vq_linear(x, *other, backend="triton_decode")  # eager work between replays overwrites the scratch
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(y, vq_linear_reference(x.float(), codes, cb, s, b)) < TOL[torch.float16]
    # A capture that grows the scratch keeps the old buffer alive (its address is in the first graph).
    big = random_vq(256, 256, 3, device="cuda", seed=12)
    xb = torch.randn(16, 256, device="cuda", dtype=torch.float16)
    graph_big = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph_big):
        yb = vq_linear(xb, *big, backend="triton_decode")
    assert triton_vq.decode_scratch_bytes() == before + 256 * 256 * 2
    graph.replay()
    graph_big.replay()
    torch.cuda.synchronize()
    assert rel_err(y, vq_linear_reference(x.float(), codes, cb, s, b)) < TOL[torch.float16]
    assert rel_err(yb, vq_linear_reference(xb.float(), *big)) < TOL[torch.float16]
    del graph, graph_big
    triton_vq.release_decode_scratch()
