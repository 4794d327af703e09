"""CPU lookup-table path: y = x Ŵᵀ without ever forming Ŵ.

For every input group j and codebook m, the dot products of x's group with all 2^B codewords form
a table LUT[j, m, c, :] = x[:, g·j : g·(j+1)] · C_m[c]  (one small batched GEMM). Output i is then
a gathered sum over the table rows its codes name:

    y[:, i] = s_i · Σ_{j, m} LUT[j, m, b[i, j, m], :]

The gathered sums run as one `embedding_bag(mode="sum")` whose bags are the outputs i, so the work
is split over outputs (each thread owns whole output rows; nothing is accumulated across threads,
which a split over input groups would race on). Vectorised by FBGEMM over the M columns of a row.

Cost: table build M·d·K·2^B MACs plus n·(d/g)·K row additions of length M. That beats decoding n·d
weights only while M is tiny (GEMV-like); SDXL layers always see >= 154 rows, where decode + BLAS
wins (see CPU_LUT_MAX_ROWS in dispatch.py for the measured crossover).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vqdm.vq_format import check_format


@torch.no_grad()
def vq_linear_cpu_lut(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x Ŵᵀ + bias for x [..., d] -> [..., n]; fp32 accumulation, result in x's dtype."""
    check_format(codes, codebooks, scales)
    n, groups, k = codes.shape
    cb_size, g = codebooks.shape[1], codebooks.shape[2]
    d = groups * g
    if x.shape[-1] != d:
        raise ValueError(f"x has {x.shape[-1]} input features, the VQ weight expects {d}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, d).float()
    m_rows = x2.shape[0]
    # LUT rows ordered (j, m, c): [d/g, K·2^B, M] = C[K·2^B, g] @ x_j[g, M] for every group j.
    xg = x2.t().reshape(groups, g, m_rows)  # [d/g, g, M]
    lut = torch.matmul(codebooks.detach().float().reshape(k * cb_size, g), xg)
    table = lut.reshape(groups * k * cb_size, m_rows)
    # Row of (j, m, b[i,j,m]) in the table: (j·K + m)·2^B + b. Bags: one per output i.
    base = torch.arange(groups * k, dtype=torch.int32).mul_(cb_size)  # [(d/g)·K]
    idx = codes.reshape(n, groups * k).to(torch.int32).add_(base)
    y_t = F.embedding_bag(idx, table, mode="sum")  # [n, M]
    y_t.mul_(scales.detach().float()[:, None])
    y = y_t.t()
    if bias is not None:
        y = y + bias.detach().float()
    return y.to(x.dtype).reshape(*lead, n)
