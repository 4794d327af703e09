"""Kernel tests: the Triton kernels run on CPU under the interpreter when no GPU is present.

TRITON_INTERPRET must be set before `vqdm.kernels.triton_vq` is imported (its @triton.jit
decorators read it). tests/conftest.py sets it, before any test module is collected, so the
order in which tests import things cannot decide whether the Triton tests run.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

os.environ.setdefault("VQDM_TRITON_AUTOTUNE", "0")  # on a GPU: one config, not a compile per config

HAS_TRITON = importlib.util.find_spec("triton") is not None
ON_GPU = torch.cuda.is_available()


def random_vq(n: int, d: int, k: int, device="cpu", dtype=torch.float32, seed: int = 0, g: int = 8):
    """Random codes/codebooks/scales in the SPEC §2 format (values scaled like a real layer)."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (n, d // g, k), generator=gen, dtype=torch.uint8)
    codebooks = torch.randn(k, 256, g, generator=gen) / (k * g) ** 0.5
    scales = torch.rand(n, generator=gen) + 0.5
    bias = torch.randn(n, generator=gen)
    return (codes.to(device), codebooks.to(device=device, dtype=dtype), scales.to(device=device, dtype=dtype),
            bias.to(device=device, dtype=dtype))


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(y).all(), "non-finite output"
    return ((y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


@pytest.fixture(scope="session")
def triton_device() -> str:
    """Where the Triton kernels can run here: 'cuda', or 'cpu' under the interpreter."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    from vqdm.kernels import triton_vq

    if ON_GPU:
        return "cuda"
    # Not a skip: no GPU is not a reason to leave the kernels untested, and tests/conftest.py sets the
    # interpreter up before anything imports triton_vq; reaching this is a bug in the test setup.
    assert triton_vq.INTERPRET, "triton_vq was imported without TRITON_INTERPRET=1 (see tests/conftest.py)"
    return "cpu"
