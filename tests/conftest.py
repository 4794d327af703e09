"""Shared fixtures: tiny pipelines and a simple VQ assignment for tests that need any VQ weights."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import pytest
import torch

# `make test` runs two pytest-xdist workers on two cores: one torch thread each, or four threads
# would fight over two cores. A lone pytest keeps two.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // _WORKERS))
# Without a GPU the Triton kernels run under the interpreter, which @triton.jit reads when
# vqdm.kernels.triton_vq is imported: set it here, before any test module is collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def nearest_codeword_quantizer(num_codebooks: int, group_size: int = 8, seed: int = 0):
    """A deliberately simple VQ assignment: codebook 0 = sampled normalised g-vectors, nearest code;
    the other codebooks fit the residual the same way. Real quantization lives in vqdm.quantizer."""

    def fn(name: str, w: torch.Tensor):
        gen = torch.Generator().manual_seed(seed)
        n, d = w.shape
        scales = w.norm(dim=1).clamp_min(1e-8)
        residual = (w / scales[:, None]).reshape(-1, group_size)
        codes, books = [], []
        for _ in range(num_codebooks):
            pick = torch.randperm(residual.shape[0], generator=gen)[:256]
            book = torch.zeros(256, group_size)
            book[: len(pick)] = residual[pick]
            idx = torch.cdist(residual, book).argmin(1)
            residual = residual - book[idx]
            codes.append(idx.to(torch.uint8).reshape(n, d // group_size))
            books.append(book)
        return torch.stack(codes, -1), torch.stack(books), scales

    return fn


@pytest.fixture(scope="session")
def simple_quantizer():
    return nearest_codeword_quantizer


@pytest.fixture
def tiny_pipeline():
    from vqdm.models import build_pipeline

    return build_pipeline("tiny-sdxl", seed=0)
