"""CPU decode in C (cpu_native.c): one vector pass per group of 8 weights, compiled on first use.

FBGEMM's embedding_bag decode (`cpu_decode`'s fallback) makes four passes per chunk (codes to int32,
codebook offsets, the gathered bag sums, the scales) and costs 0.63-1.7 ns a weight in fp32 on SDXL
shapes; this kernel does one and costs 0.12-0.25 ns in fp32 and 0.10-0.15 ns in bf16 (AMD EPYC
Zen4, 2 cores, gcc 12, -O3 -march=native, K = 3: benchmarks/results/bench_decode_cpu.json; the big
layers are bound by writing the decoded weight to DRAM). On a Turbo 512² fp32 step the FBGEMM
decode took ~2 s of ~12 s (torch.profiler: embedding_bag, mul, copy_).

The library is built with the machine's C compiler (`$CC`, else `cc`) into a cache folder
(`$VQDM_KERNEL_CACHE`, else ~/.cache/vqdm/kernels), keyed by the source, the compiler and the CPU's
flags (so a shared cache never hands a -march=native build to another CPU), and loaded with ctypes.
Without a compiler, or when the build fails, `status()` says why and `cpu_decode` runs FBGEMM: same
results, slower. `VQDM_CPU_NATIVE=0` turns it off.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_native.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
GROUP = 8  # the C kernel's vector width: vq_format.GROUP_SIZE
CODEBOOK_SIZE = 256  # uint8 codes index 2^8 codewords: every code is in bounds by construction
_OUT = {torch.float32: "vq_decode_f32", torch.bfloat16: "vq_decode_bf16"}
# Decoded weights of at least this many bytes are written with non-temporal stores. Measured on AMD
# EPYC Zen4 (2 cores, 32 MB L3, fp32 decode + MKL GEMM at M = 256, the rows of a Turbo 512² step's
# 1280-channel stage; medians of 30 interleaved calls: benchmarks/results/bench_decode_cpu.json):
# 10240x1280 (52 MB) 1.052x -> 1.013x dense, 1280x5120 (26 MB) 1.146x -> 1.060x, 1280x11520 (a 3x3
# conv, 59 MB) 1.083x -> 1.059x; but 1280x1280 (6.5 MB) 1.032x -> 1.044x: a weight that fits the L3
# is read back from cache by the GEMM, which streaming forfeits.
STREAM_MIN_BYTES = 16 << 20


@dataclass(frozen=True)
class NativeStatus:
    available: bool
    reason: str  # why not, or where the library was loaded from
    library: str | None = None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _compiler() -> list[str] | None:
    cc = shlex.split(os.environ.get("CC", "")) or ["cc"]
    return cc if shutil.which(cc[0]) else None


def _cache_dir() -> Path:
    return Path(os.environ.get("VQDM_KERNEL_CACHE") or Path.home() / ".cache" / "vqdm" / "kernels")


def _build(cc: list[str]) -> Path:
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=60).stdout.splitlines()[:1]
    key = hashlib.sha256("\n".join([SOURCE.read_text(), *cc, *FLAGS, *version, _cpu_flags()]).encode()).hexdigest()[:16]
    lib = _cache_dir() / f"vq_decode-{key}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    # Built beside its final name and renamed: processes starting together (test workers, replicas)
    # each build their own copy and the rename is atomic, so none loads a half-written library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
    os.close(fd)
    try:
        proc = subprocess.run([*cc, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{shlex.join([*cc, *FLAGS])} failed: {proc.stderr.strip()[-500:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


@functools.lru_cache(maxsize=None)
def _load() -> tuple[ctypes.CDLL | None, NativeStatus]:
    if os.environ.get("VQDM_CPU_NATIVE", "1") == "0":
        return None, NativeStatus(False, "turned off by VQDM_CPU_NATIVE=0")
    cc = _compiler()
    if cc is None:
        return None, NativeStatus(False, f"no C compiler ({os.environ.get('CC') or 'cc'} not found); install gcc, "
                                         "or set CC, for the faster CPU decode")
    try:
        path = _build(cc)
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return None, NativeStatus(False, f"building the native CPU decode failed: {e}")
    for name in _OUT.values():
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4 + [ctypes.c_int, ctypes.c_int]
        fn.restype = None
    return lib, NativeStatus(True, f"loaded {path}", str(path))


def status() -> NativeStatus:
    """Whether the native decode is in use here, and why not (built on the first call)."""
    lib, st = _load()
    if not st.available:
        _warn_once(st.reason)
    return st


@functools.lru_cache(maxsize=None)
def _warn_once(reason: str) -> None:
    log.warning("native CPU decode unavailable (%s); using the FBGEMM decode", reason)


def handles(codebooks: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """Whether `decode` can run this layer into `out_dtype` here."""
    return (out_dtype in _OUT and codebooks.shape[1] == CODEBOOK_SIZE and codebooks.shape[2] == GROUP
            and status().available)


def decode(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Ŵ [n, d] into `out` (contiguous, fp32 or bf16). Preconditions (checked by the caller, `decode_cpu`):
    check_format passed and `handles(codebooks, out.dtype)`."""
    lib, _ = _load()
    n, groups, k = codes.shape
    codes = codes.contiguous()
    table = codebooks.detach().to(torch.float32).contiguous()  # [K, 256, 8]: 8 KB per codebook
    s = scales.detach().to(torch.float32).contiguous()
    if out.shape != (n, groups * GROUP) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [{n}, {groups * GROUP}] tensor, got {tuple(out.shape)}")
    stream = out.numel() * out.element_size() >= STREAM_MIN_BYTES and out.data_ptr() % 32 == 0
    getattr(lib, _OUT[out.dtype])(codes.data_ptr(), table.data_ptr(), s.data_ptr(), out.data_ptr(),
                                  n, groups, k, CODEBOOK_SIZE, torch.get_num_threads(), int(stream))
    return out
