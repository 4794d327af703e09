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
matrix (16-byte stores), then cuBLAS / cuDNN via torch (convs: see vq_conv2d_triton_decode). The
per-call layers decode into a reused scratch buffer (`decode_triton_scratch`); `decode_triton`
without `out` returns a weight that owns its memory (what weight caches keep).

Tile configs are plain dicts (meta-parameters + num_warps / num_stages); `tile_configs` lists every
one a kernel can run with (GPU default, interpreter, each autotune candidate) and the `config=`
argument runs one by name, so the tests check each against the reference.

K (number of codebooks) is a constexpr unrolled with tl.static_range, so K = 3 needs no
power-of-two arange. Every load at an edge (M, N, d) is masked. Under TRITON_INTERPRET=1 (set
before triton is imported) the same kernels run on CPU tensors, which is how CI tests them.
"""
from __future__ import annotations

import os
import threading

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


# Autotune space of the fused kernel (GPU only). The codeword gathers are pipelined through shared
# memory (cp.async, 16 B per codeword), one [BLOCK_N, BLOCK_K] tile per codebook per stage: K=4,
# 128x64 fp16 = 64 KB a stage, so the wide tiles get 2 stages. Configs that do not fit are skipped
# by the autotuner.
MATMUL_AUTOTUNE_CONFIGS: tuple[dict[str, int], ...] = tuple(
    {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "num_warps": w, "num_stages": st}
    for bm, bn, bk, w, st in [
        (16, 32, 64, 4, 3), (16, 64, 64, 4, 3), (32, 64, 64, 4, 3), (64, 64, 64, 4, 3), (32, 128, 64, 4, 2),
        (64, 128, 64, 4, 2), (128, 64, 64, 4, 2), (128, 128, 64, 8, 2), (64, 128, 32, 4, 3),
        (128, 128, 32, 8, 3),
    ])
# GPU without autotuning (VQDM_TRITON_AUTOTUNE=0, set by the tests so that a new shape does not
# autotune): one config good across SDXL shapes. Interpreter (CI): tiny tiles keep it fast.
MATMUL_DEFAULT_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}
MATMUL_INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 4}

# Decode: a memory-bound gather + store; the tile size and warps set how many loads are in flight.
DECODE_AUTOTUNE_CONFIGS: tuple[dict[str, int], ...] = tuple(
    {"BLOCK_N": bn, "BLOCK_J": bj, "num_warps": w}
    for bn, bj, w in [(32, 32, 4), (64, 32, 4), (32, 64, 4), (64, 64, 8), (16, 32, 2), (128, 32, 8)])
DECODE_DEFAULT_CONFIG = {"BLOCK_N": 32, "BLOCK_J": 32, "num_warps": 4}  # GPU without autotuning and interpreter

AUTOTUNE = os.environ.get("VQDM_TRITON_AUTOTUNE", "1") == "1"


# By kernel, then by name: "default" (GPU with autotuning off), "interpret" (the interpreter's, where
# it differs from "default"), "autotune-<i>" (each autotune candidate). Built once: the launch path
# reads it on every layer call.
_CONFIGS: dict[str, dict[str, dict[str, int]]] = {
    "matmul": {"default": MATMUL_DEFAULT_CONFIG, "interpret": MATMUL_INTERPRET_CONFIG,
               **{f"autotune-{i}": c for i, c in enumerate(MATMUL_AUTOTUNE_CONFIGS)}},
    "decode": {"default": DECODE_DEFAULT_CONFIG, **{f"autotune-{i}": c for i, c in enumerate(DECODE_AUTOTUNE_CONFIGS)}},
}


def tile_configs(kernel: str) -> dict[str, dict[str, int]]:
    """Every tile config `kernel` ("matmul" or "decode") can run with, by name ("default",
    "interpret" where it differs, "autotune-<i>"): pass a name as `config=` to
    `vq_linear_triton_fused` / `decode_triton`. Copies: editing them changes nothing."""
    if kernel not in _CONFIGS:
        raise ValueError(f"unknown Triton kernel {kernel!r}; expected one of {sorted(_CONFIGS)}")
    return {name: dict(c) for name, c in _CONFIGS[kernel].items()}


def _triton_config(c: dict[str, int]) -> triton.Config:
    meta = {k: v for k, v in c.items() if k not in ("num_warps", "num_stages")}
    return triton.Config(meta, num_warps=c.get("num_warps", 4), num_stages=c.get("num_stages", 3))


def _quick_bench(fn, quantiles=None):
    # Autotuning 9 configs per new shape with triton's default 25 ms + 100 ms per config is slow
    # when a U-Net brings ~30 shapes; 5 + 25 ms separates the configs just as well.
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


def _autotuned(fn, configs: tuple[dict[str, int], ...], key: list[str]):
    tconfigs = [_triton_config(c) for c in configs]
    try:
        return triton.autotune(configs=tconfigs, key=key, do_bench=_quick_bench)(fn)
    except TypeError:  # older triton without do_bench=
        return triton.autotune(configs=tconfigs, key=key)(fn)


_TUNE = not INTERPRET and AUTOTUNE
_matmul_tuned = (_autotuned(_vq_matmul_kernel, MATMUL_AUTOTUNE_CONFIGS, ["M_BUCKET", "N", "D", "NUM_CB"])
                 if _TUNE else None)
_decode_tuned = (_autotuned(_vq_decode_kernel, DECODE_AUTOTUNE_CONFIGS, ["N", "NUM_GROUPS", "NUM_CB"])
                 if _TUNE else None)


def _launch_config(kernel: str, config: str | None) -> dict[str, int] | None:
    """The tile config to launch `kernel` with, or None for the autotuner."""
    configs = _CONFIGS[kernel]
    if config is None:
        if INTERPRET:
            return configs.get("interpret", configs["default"])
        return None if AUTOTUNE else configs["default"]
    if config not in configs:
        raise ValueError(f"unknown {kernel} tile config {config!r}; known: {sorted(configs)}")
    return configs[config]


class _DecodeScratch(threading.local):
    """Per-thread flat buffers, one per (device, dtype), grown to the largest layer decoded there.

    Why reuse is safe: a thread's decode and the GEMM that reads it are queued in that order on
    the thread's stream, so the next decode into the same buffer runs only after the GEMM read it;
    another thread has its own buffer. The server runs each device's work on one thread, so it
    holds one buffer per device (the largest layer). A caller that decodes on one stream and reads
    on another must synchronise them itself (nothing in vqdm does).

    CUDA graphs: a buffer allocated once keeps its address, so a graph captured after one eager
    call (warm-up) allocates nothing and replays into the same buffer. If a capture has to grow the
    buffer, the old one stays referenced here (`retired`): the captured kernels hold its address,
    and freeing it would let the allocator hand that memory to someone else that replays overwrite.
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self.retired: list[torch.Tensor] = []

    def get(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (device, dtype)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < numel:
            if buf is not None and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                self.retired.append(buf)
            self.buffers.pop(key, None)  # free the old one before allocating the larger one
            # A normal tensor, even when first needed under inference_mode: an inference tensor
            # could not be written in place later by a caller outside inference mode.
            with torch.inference_mode(False):
                buf = torch.empty(numel, dtype=dtype, device=device)
            self.buffers[key] = buf
        return buf[:numel]

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in [*self.buffers.values(), *self.retired])


_SCRATCH = _DecodeScratch()


def decode_scratch_bytes() -> int:
    """Bytes held by this thread's Triton decode scratch buffers (the largest layer per device, dtype)."""
    return _SCRATCH.nbytes()


def release_decode_scratch() -> None:
    """Drop this thread's Triton decode scratch buffers (re-grown on the next call). Not while a
    captured CUDA graph that decodes may still be replayed: it writes to their addresses."""
    _SCRATCH.buffers.clear()
    _SCRATCH.retired.clear()


def _check_group(codes: torch.Tensor, codebooks: torch.Tensor) -> int:
    g = codebooks.shape[2]
    if g & (g - 1) or g < 2:
        raise ValueError(f"the Triton kernels need a power-of-two group size, got g={g}")
    return g


def vq_linear_triton_fused(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                           bias: torch.Tensor | None = None, config: str | None = None) -> torch.Tensor:
    """y = x Ŵᵀ + bias for x [..., d] (fp16/bf16; fp32 runs with IEEE dot) -> [..., n] in x's dtype.

    config: a name from `tile_configs("matmul")` to run with instead of the default / autotuner.
    """
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

    c = _launch_config("matmul", config)
    if c is None:
        _matmul_tuned[grid](*args, **meta)
    else:
        _vq_matmul_kernel[grid(c)](*args, **meta, **c)
    return y.reshape(*lead, n)


def decode_triton(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                  dtype: torch.dtype = torch.float16, conv: tuple[int, tuple[int, int]] | None = None,
                  out: torch.Tensor | None = None, config: str | None = None) -> torch.Tensor:
    """Dense scaled Ŵ [n, d] on codes' device; with conv=(C_in, (k_h, k_w)) an NCHW conv weight.

    Without `out` the result owns its memory (weight caches keep it); with `out` (a contiguous
    [n, d] tensor of `dtype`, not with conv) the kernel writes there. config: a name from
    `tile_configs("decode")` to run with instead of the default / autotuner.

    The kernel always writes the [n, d] matrix (columns (k_h, k_w, C_in) for convs) with 16-byte
    stores; an NCHW conv weight is then one coalesced permute-copy. Writing NCHW directly from the
    kernel scatters 2-byte stores k_h·k_w apart: measured on an H100 it made a 2560->1280 3x3
    conv's decode 20x slower than this.
    """
    check_format(codes, codebooks, scales)
    g = _check_group(codes, codebooks)
    n, groups, k = codes.shape
    d = groups * g
    if conv is not None and conv[1][0] * conv[1][1] * conv[0] != d:
        raise ValueError(f"conv weight {n}x{conv[0]}x{conv[1][0]}x{conv[1][1]} does not match d={d}")
    if conv is not None and out is not None:
        raise ValueError("decode_triton returns a conv weight in fresh memory only: pass conv= or out=, not both")
    if out is None:
        out = torch.empty(n, d, device=codes.device, dtype=dtype)
    elif out.shape != (n, d) or out.dtype != dtype or out.device != codes.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [{n}, {d}] {dtype} tensor on {codes.device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    codes = codes.contiguous()
    codebooks = codebooks.detach().contiguous()
    args = (codes, codebooks, scales.detach(), out, n, groups, codes.stride(0), codes.stride(1),
            codebooks.stride(0), out.stride(0))
    c = _launch_config("decode", config)
    if c is None:
        _decode_tuned[lambda c: (triton.cdiv(n, c["BLOCK_N"]), triton.cdiv(groups, c["BLOCK_J"]))](
            *args, NUM_CB=k, GROUP=g)
    else:
        _vq_decode_kernel[(triton.cdiv(n, c["BLOCK_N"]), triton.cdiv(groups, c["BLOCK_J"]))](
            *args, NUM_CB=k, GROUP=g, **c)
    if conv is None:
        return out
    return conv_weight_view(out, conv[0], conv[1]).contiguous()


def decode_triton_scratch(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                          dtype: torch.dtype) -> torch.Tensor:
    """Ŵ [n, d] decoded into this thread's scratch buffer for codes' device: valid until the next
    decode here (see _DecodeScratch for why that is safe, CUDA graphs included)."""
    n, groups, _ = codes.shape
    d = groups * codebooks.shape[2]
    return decode_triton(codes, codebooks, scales, dtype, out=_SCRATCH.get(n * d, dtype, codes.device).view(n, d))


def _per_call_weight(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor,
                     scales: torch.Tensor) -> torch.Tensor:
    # With a gradient for x, autograd saves the weight for the backward pass, and the next layer's
    # decode would overwrite the scratch under it (Triton's stores bump no version counter, so
    # nothing would notice): decode into fresh memory then.
    if torch.is_grad_enabled() and x.requires_grad:
        return decode_triton(codes, codebooks, scales, x.dtype)
    return decode_triton_scratch(codes, codebooks, scales, x.dtype)


def vq_linear_triton_decode(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                            bias: torch.Tensor | None = None) -> torch.Tensor:
    """Decode once into the scratch weight (x's dtype), then cuBLAS via F.linear."""
    w = _per_call_weight(x, codes, codebooks, scales)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


def vq_conv2d_triton_decode(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                            bias: torch.Tensor | None, in_channels: int, kernel_size: tuple[int, int],
                            stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups: int = 1) -> torch.Tensor:
    """Decode once into the scratch weight, then cuDNN via F.conv2d (layout: `decoded.conv_weight_for`)."""
    w = _per_call_weight(x, codes, codebooks, scales)
    return conv2d_decoded(x, conv_weight_for(x, w, in_channels // groups, tuple(kernel_size)), bias, stride,
                          padding, dilation, groups)
