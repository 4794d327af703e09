"""CPU decode-then-BLAS: codes -> dense weight in a reused scratch buffer -> MKL GEMM / oneDNN conv.

The decode is the paper's CPU bottleneck (their per-call PyTorch rebuild cost 23-26% of a step).
It runs in C where the machine has a compiler (`cpu_native`: one vector pass per group of 8 weights,
2.6-7.6x faster in fp32 than the FBGEMM decode below, per bench_decode), for fp32 and bf16 weights.
Otherwise, and for fp16, it runs through FBGEMM as row chunks that stay in L2:

    codes [rows, d/g, K] uint8 --(copy + offset m·2^B)--> int32 indices into the K stacked codebooks
    --(embedding_bag, mode=sum: FBGEMM gathers K codewords per group and adds them)--> [rows·d/g, g]
    --(multiply by s_out, written straight into the scratch buffer in the output dtype)--> Ŵ rows

One scratch buffer per (thread, dtype) is grown to the largest layer and reused, so at most one
dense layer is alive at a time and large allocations never go back to the OS between calls: a
fresh 60 MB buffer per call cost more in page faults (~20 ms) than the whole decode (~9 ms) on the
2-core EPYC this was measured on. Chunking also keeps every allocation inside a chunk small, so
glibc serves them from its heap.
"""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from vqdm.kernels import cpu_native
from vqdm.kernels.decoded import conv2d_decoded, conv_weight_for, linear_decoded
from vqdm.vq_format import check_format

# Output bytes (fp32) decoded per chunk. Measured on AMD EPYC Zen4, 2 cores, 1 MB L2/core, torch
# 2.13: 0.4 MB chunks 16 ms, 1.5 MB 9.3 ms, 3 MB 10.1 ms, 12 MB 11.9 ms for a 1280x11520 weight.
CHUNK_BYTES = 3 << 19


class _Scratch(threading.local):
    """Per-thread flat buffers, one per dtype, grown on demand and never shrunk."""

    def __init__(self) -> None:
        self.buffers: dict[torch.dtype, torch.Tensor] = {}

    def get(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self.buffers.get(dtype)
        if buf is None or buf.numel() < numel:
            self.buffers.pop(dtype, None)  # free the old one before allocating the larger one
            # A normal tensor, even when first needed under inference_mode: an inference tensor
            # could not be written in place later by a caller outside inference mode.
            with torch.inference_mode(False):
                buf = torch.empty(numel, dtype=dtype)
            self.buffers[dtype] = buf
        return buf[:numel]

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())


_SCRATCH = _Scratch()


def scratch_bytes() -> int:
    """Bytes held by this thread's decode scratch buffers (the largest decoded layer per dtype)."""
    return _SCRATCH.nbytes()


def release_scratch() -> None:
    """Drop this thread's scratch buffers (they are re-grown on the next call)."""
    _SCRATCH.buffers.clear()


def _table_dtype(out_dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 tables make FBGEMM accumulate in fp32 and round once; fp32 otherwise.
    return out_dtype if out_dtype in (torch.bfloat16, torch.float16) else torch.float32


@torch.no_grad()
def decode_cpu(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
               dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dense Ŵ [n, d] in `dtype`, written into `out` ([n, d], contiguous) when given.

    Not differentiable itself (runs under no_grad): the `vqdm::` ops' registered autograd (kernels.ops)
    carries gradients past it. The native C decode when `cpu_native` handles it, FBGEMM otherwise.
    """
    check_format(codes, codebooks, scales)
    n, groups, _ = codes.shape
    d = groups * codebooks.shape[2]
    if out is None:
        out = torch.empty(n, d, dtype=dtype)
    elif out.shape != (n, d) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [{n}, {d}] tensor, got {tuple(out.shape)}")
    if cpu_native.handles(codebooks, out.dtype):
        return cpu_native.decode(codes, codebooks, scales, out)
    return decode_cpu_fbgemm(codes, codebooks, scales, out)


@torch.no_grad()
def decode_cpu_fbgemm(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                      out: torch.Tensor) -> torch.Tensor:
    """`decode_cpu` by FBGEMM's embedding_bag, in row chunks, into `out` ([n, d] contiguous, any float dtype)."""
    n, groups, k = codes.shape
    cb_size, g = codebooks.shape[1], codebooks.shape[2]
    d = groups * g
    dtype = out.dtype
    codes = codes.contiguous()
    table = codebooks.detach().to(_table_dtype(dtype)).reshape(k * cb_size, g)  # K stacked codebooks
    s = scales.detach().to(table.dtype)
    rows = max(1, min(n, CHUNK_BYTES // (d * 4)))
    # Index of codebook m's entry c in the stacked table is m·2^B + c; the offsets are one tiled
    # pattern added contiguously (a broadcast add over a size-K last dim is 4x slower).
    offset = torch.arange(k, dtype=torch.int32).mul_(cb_size).repeat(rows * groups)
    idx = torch.empty(rows * groups * k, dtype=torch.int32)
    bag_starts = torch.arange(0, rows * groups * k, k, dtype=torch.int32)  # fixed-size bags of K
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        m = (r1 - r0) * groups * k
        chunk_idx = idx[:m].copy_(codes[r0:r1].reshape(-1)).add_(offset[:m])
        summed = F.embedding_bag(chunk_idx, table, bag_starts[:m // k], mode="sum")  # [(r1-r0)·d/g, g]
        torch.mul(summed.view(r1 - r0, d), s[r0:r1, None], out=out[r0:r1])
    return out


def decode_cpu_scratch(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                       dtype: torch.dtype) -> torch.Tensor:
    """Ŵ [n, d] decoded into this thread's scratch buffer: valid until the next decode here."""
    n, groups, _ = codes.shape
    d = groups * codebooks.shape[2]
    return decode_cpu(codes, codebooks, scales, dtype, out=_SCRATCH.get(n * d, dtype).view(n, d))


def vq_linear_cpu_decode(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """Decode into scratch, then one MKL GEMM in x's dtype (fp32 or bf16)."""
    w = decode_cpu_scratch(codes, codebooks, scales, x.dtype)
    return linear_decoded(x, w, bias)


def vq_conv2d_cpu_decode(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                         bias: torch.Tensor | None, in_channels: int, kernel_size: tuple[int, int],
                         stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups: int = 1) -> torch.Tensor:
    """Decode into scratch, in (k_h, k_w, C_in) order, then oneDNN conv (layout: `conv_weight_for`)."""
    w = decode_cpu_scratch(codes, codebooks, scales, x.dtype)
    return conv2d_decoded(x, conv_weight_for(x, w, in_channels // groups, tuple(kernel_size)), bias,
                          stride, padding, dilation, groups)
