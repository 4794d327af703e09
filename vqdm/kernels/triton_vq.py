"""Triton kernels for the VQ weight format: a fused dequant-GEMM and a decode-once kernel.

Fused (`vq_linear_triton_fused`): each program owns a BLOCK_M x BLOCK_N tile of y. Per K-tile it
loads the x tile, gathers the K codewords of every (output, group) pair of the weight tile from the
codebook table (K·2^B·g values, 16 KB in fp16 for K = 4, so the gathers hit L1), sums them in fp32
registers, casts to the activation dtype and feeds `tl.dot` (fp32 accumulation). s_out and bias are
applied once in the epilogue, on the output tile. Only codes travel from HBM for the weight (0.5 B
per weight at K = 4 against 2 B dense fp16), which should pay where the GEMM is memory-bound. As
written it does not: measured on an H100 it runs 5-26x slower than the dense GEMM at every M
(Triton stages each gathered codeword tile through shared memory with cp.async and the main loop
is latency-bound; docs/kernels.md), so dispatch never picks it. It stays, tested, by name.

Decode-once (`decode_triton`): codes -> dense Ŵ (scaled) in the activation dtype as an [n, d]
matrix (16-byte stores), then cuBLAS / cuDNN via torch (convs: see vq_conv2d_triton_decode).

K (number of codebooks) is a constexpr unrolled with tl.static_range, so K = 3 needs no
power-of-two arange. Every load at an edge (M, N, d) is masked. Under TRITON_INTERPRET=1 (set
before triton is imported) the same kernels run on CPU tensors, which is how CI tests them.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
import triton.testing

from vqdm.kernels.decoded import conv2d_decoded, conv_weight_for, conv_weight_view
from vqdm.vq_format import check_format

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _decode_tile(codes_ptr, cb_ptr, offs_n, offs_j, mask_nj, stride_cn, stride_cj, stride_cbk,
                 NUM_CB: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr):
    """Σ_m C_m[codes[n, j, m]] for a [BLOCK_N, BLOCK_J] tile of (output, group): [BLOCK_N, BLOCK_J, GROUP] fp32."""
    offs_e = tl.arange(0, GROUP)
    code_ptrs = codes_ptr + offs_n[:, None] * stride_cn + offs_j[None, :] * stride_cj  # [BN, BJ]
    w = tl.zeros((BLOCK_N, BLOCK_J, GROUP), dtype=tl.float32)
    for m in tl.static_range(NUM_CB):
        # Masked codes read as 0: a valid codeword, so the gather below needs no mask.
        c = tl.load(code_ptrs + m, mask=mask_nj, other=0, eviction_policy="evict_first").to(tl.int32)
        # A codeword is GROUP contiguous values at a multiple of GROUP: say so, so the gather
        # becomes one 16-byte vector load per codeword (fp16, g = 8) instead of GROUP scalar loads.
        cw_offs = c[:, :, None] * GROUP + offs_e[None, None, :]
        cw_offs = tl.max_contiguous(tl.multiple_of(cw_offs, [1, 1, GROUP]), [1, 1, GROUP])
        w += tl.load(cb_ptr + m * stride_cbk + cw_offs, eviction_policy="evict_last").to(tl.float32)
    return w


@triton.jit
def _vq_matmul_kernel(
    x_ptr, codes_ptr, cb_ptr, scales_ptr, bias_ptr, y_ptr,
    M, N, D, M_BUCKET,
    stride_xm, stride_xd, stride_cn, stride_cj, stride_cbk, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, NUM_CB: tl.constexpr, GROUP: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y[M, N] = (x[M, D] @ Ŵ'[N, D]ᵀ) · s[N] + bias[N], Ŵ' = Σ_m C_m[codes] decoded per tile."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped ordering: GROUP_M row-tiles share each weight tile while it is hot in L2.
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    BLOCK_J: tl.constexpr = BLOCK_K // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_j = tl.arange(0, BLOCK_J)
    mask_m = offs_m < M
    mask_n = offs_n < N
    num_groups = D // GROUP

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + offs_k
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :] * stride_xd,
                    mask=mask_m[:, None] & (kk[None, :] < D), other=0.0)
        jj = k0 // GROUP + offs_j
        w = _decode_tile(codes_ptr, cb_ptr, offs_n, jj, mask_n[:, None] & (jj[None, :] < num_groups),
                         stride_cn, stride_cj, stride_cbk, NUM_CB, GROUP, BLOCK_N, BLOCK_J)
        # Past-the-edge columns of w hold codeword 0 (finite) and meet zeros in a: no effect.
        w = tl.reshape(w, (BLOCK_N, BLOCK_K)).to(a.dtype)
        if IEEE:
            acc = tl.dot(a, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(w), acc)

    s = tl.load(scales_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    acc = acc * s[None, :]
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += b[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _vq_decode_kernel(
    codes_ptr, cb_ptr, scales_ptr, w_ptr,
    N, NUM_GROUPS,
    stride_cn, stride_cj, stride_cbk, stride_wn,
    NUM_CB: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """W[n, j·g + e] = s_n Σ_m C_m[codes[n, j, m]][e]: a [BLOCK_N, BLOCK_J·g] tile, 16-byte stores."""
    pid_n = tl.program_id(0)
    pid_j = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_n = offs_n < N
    mask_nj = mask_n[:, None] & (offs_j[None, :] < NUM_GROUPS)
    w = _decode_tile(codes_ptr, cb_ptr, offs_n, offs_j, mask_nj, stride_cn, stride_cj, stride_cbk,
                     NUM_CB, GROUP, BLOCK_N, BLOCK_J)
    s = tl.load(scales_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    w = w * s[:, None, None]
    col = offs_j[None, :, None] * GROUP + tl.arange(0, GROUP)[None, None, :]  # [1, BJ, GROUP]
    w_ptrs = w_ptr + offs_n[:, None, None] * stride_wn + col
    tl.store(w_ptrs, w.to(w_ptr.dtype.element_ty), mask=mask_nj[:, :, None])


def _matmul_configs() -> list[triton.Config]:
    """Autotune space of the fused kernel (GPU only; the interpreter uses FIXED_CONFIG).

    The codeword gathers are pipelined through shared memory (cp.async, 16 B per codeword), one
    [BLOCK_N, BLOCK_K] tile per codebook per stage: K=4, 128x64 fp16 = 64 KB a stage, so the wide
    tiles get 2 stages. Configs that do not fit are skipped by the autotuner.
    """
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=st)
            for bm, bn, bk, w, st in [
                (16, 32, 64, 4, 3), (16, 64, 64, 4, 3), (32, 64, 64, 4, 3), (64, 64, 64, 4, 3), (32, 128, 64, 4, 2),
                (64, 128, 64, 4, 2), (128, 64, 64, 4, 2), (128, 128, 64, 8, 2), (64, 128, 32, 4, 3),
                (128, 128, 32, 8, 3),
            ]]


# Interpreter (CI): tiny tiles keep it fast. GPU without autotuning (VQDM_TRITON_AUTOTUNE=0, used
# by the tests so they do not compile every config): one config good across SDXL shapes.
FIXED_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 4}
DEFAULT_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}
DECODE_BLOCK = {"BLOCK_N": 32, "BLOCK_J": 32}
AUTOTUNE = os.environ.get("VQDM_TRITON_AUTOTUNE", "1") == "1"


def _quick_bench(fn, quantiles=None):
    # Autotuning 9 configs per new shape with triton's default 25 ms + 100 ms per config is slow
    # when a U-Net brings ~30 shapes; 5 + 25 ms separates the configs just as well.
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


def _autotuned(fn):
    try:
        return triton.autotune(configs=_matmul_configs(), key=["M_BUCKET", "N", "D", "NUM_CB"], do_bench=_quick_bench)(fn)
    except TypeError:  # older triton without do_bench=
        return triton.autotune(configs=_matmul_configs(), key=["M_BUCKET", "N", "D", "NUM_CB"])(fn)


_matmul_tuned = _vq_matmul_kernel if INTERPRET or not AUTOTUNE else _autotuned(_vq_matmul_kernel)


def _decode_configs() -> list[triton.Config]:
    # Memory-bound gather + store: the tile size and warps set how many loads are in flight.
    return [triton.Config({"BLOCK_N": bn, "BLOCK_J": bj}, num_warps=w)
            for bn, bj, w in [(32, 32, 4), (64, 32, 4), (32, 64, 4), (64, 64, 8), (16, 32, 2), (128, 32, 8)]]


def _decode_autotuned(fn):
    key = ["N", "NUM_GROUPS", "NUM_CB"]
    try:
        return triton.autotune(configs=_decode_configs(), key=key, do_bench=_quick_bench)(fn)
    except TypeError:
        return triton.autotune(configs=_decode_configs(), key=key)(fn)


_decode_tuned = _vq_decode_kernel if INTERPRET or not AUTOTUNE else _decode_autotuned(_vq_decode_kernel)


def _check_group(codes: torch.Tensor, codebooks: torch.Tensor) -> int:
    g = codebooks.shape[2]
    if g & (g - 1) or g < 2:
        raise ValueError(f"the Triton kernels need a power-of-two group size, got g={g}")
    return g


def vq_linear_triton_fused(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                           bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x Ŵᵀ + bias for x [..., d] (fp16/bf16; fp32 runs with IEEE dot) -> [..., n] in x's dtype."""
    check_format(codes, codebooks, scales)
    g = _check_group(codes, codebooks)
    n, groups, k = codes.shape
    d = groups * g
    if x.shape[-1] != d:
        raise ValueError(f"x has {x.shape[-1]} input features, the VQ weight expects {d}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, d)
    m = x2.shape[0]
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0:
        return y.reshape(*lead, n)
    codes = codes.contiguous()
    codebooks = codebooks.detach().contiguous()
    bias_arg = bias.detach() if bias is not None else scales  # unused pointer when HAS_BIAS is False
    args = (x2, codes, codebooks, scales.detach(), bias_arg, y, m, n, d, triton.next_power_of_2(m),
            x2.stride(0), x2.stride(1), codes.stride(0), codes.stride(1), codebooks.stride(0), y.stride(0), y.stride(1))
    meta = dict(HAS_BIAS=bias is not None, NUM_CB=k, GROUP=g, IEEE=x.dtype == torch.float32)

    def grid(c):
        return (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"]),)

    if INTERPRET:
        _vq_matmul_kernel[grid(FIXED_CONFIG)](*args, **meta, **FIXED_CONFIG)
    elif not AUTOTUNE:
        _vq_matmul_kernel[grid(DEFAULT_CONFIG)](*args, **meta, **DEFAULT_CONFIG)
    else:
        _matmul_tuned[grid](*args, **meta)
    return y.reshape(*lead, n)


def decode_triton(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                  dtype: torch.dtype = torch.float16, conv: tuple[int, tuple[int, int]] | None = None) -> torch.Tensor:
    """Dense scaled Ŵ [n, d] on codes' device; with conv=(C_in, (k_h, k_w)) an NCHW conv weight.

    The kernel always writes the [n, d] matrix (columns (k_h, k_w, C_in) for convs) with 16-byte
    stores; an NCHW conv weight is then one coalesced permute-copy. Writing NCHW directly from the
    kernel scatters 2-byte stores k_h·k_w apart: measured on an H100 it made a 2560->1280 3x3
    conv's decode 20x slower than this.
    """
    check_format(codes, codebooks, scales)
    g = _check_group(codes, codebooks)
    n, groups, k = codes.shape
    d = groups * g
    codes = codes.contiguous()
    codebooks = codebooks.detach().contiguous()
    w = torch.empty(n, d, device=codes.device, dtype=dtype)
    args = (codes, codebooks, scales.detach(), w, n, groups, codes.stride(0), codes.stride(1),
            codebooks.stride(0), w.stride(0))
    if INTERPRET or not AUTOTUNE:
        bn, bj = DECODE_BLOCK["BLOCK_N"], DECODE_BLOCK["BLOCK_J"]
        _vq_decode_kernel[(triton.cdiv(n, bn), triton.cdiv(groups, bj))](*args, NUM_CB=k, GROUP=g, BLOCK_N=bn,
                                                                        BLOCK_J=bj)
    else:
        _decode_tuned[lambda c: (triton.cdiv(n, c["BLOCK_N"]), triton.cdiv(groups, c["BLOCK_J"]))](
            *args, NUM_CB=k, GROUP=g)
    if conv is None:
        return w
    cin, ksize = conv
    if ksize[0] * ksize[1] * cin != d:
        raise ValueError(f"conv weight {n}x{cin}x{ksize[0]}x{ksize[1]} does not match d={d}")
    return conv_weight_view(w, cin, ksize).contiguous()


def vq_linear_triton_decode(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                            bias: torch.Tensor | None = None) -> torch.Tensor:
    """Decode once into a dense scratch weight (x's dtype), then cuBLAS via F.linear."""
    w = decode_triton(codes, codebooks, scales, x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


def vq_conv2d_triton_decode(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                            bias: torch.Tensor | None, in_channels: int, kernel_size: tuple[int, int],
                            stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups: int = 1) -> torch.Tensor:
    """Decode once, then cuDNN via F.conv2d (weight layout: `decoded.conv_weight_for`)."""
    w = decode_triton(codes, codebooks, scales, x.dtype)
    return conv2d_decoded(x, conv_weight_for(x, w, in_channels // groups, tuple(kernel_size)), bias, stride,
                          padding, dilation, groups)
