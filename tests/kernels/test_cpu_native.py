"""The native C decode (vqdm.kernels.cpu_native) against the reference decode, and its fallback."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from tests.kernels.conftest import random_vq
from vqdm.kernels import cpu_decode, cpu_native, dequantize, vq_linear, vq_linear_reference

HAS_CC = shutil.which("cc") is not None


@pytest.mark.skipif(not HAS_CC, reason="no C compiler on this machine: the FBGEMM decode runs instead")
def test_native_decode_is_built_and_used_where_a_compiler_exists():
    st = cpu_native.status()
    assert st.available, st.reason
    codes, cb, s, _ = random_vq(24, 64, 3)
    assert cpu_native.handles(cb, torch.float32) and cpu_native.handles(cb, torch.bfloat16)
    assert not cpu_native.handles(cb, torch.float16)  # fp16 weights stay on FBGEMM


@pytest.mark.skipif(not HAS_CC, reason="no C compiler")
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("n,d", [(1, 8), (7, 40), (333, 264), (64, 1280)])
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_native_decode_equals_reference(n, d, k, table_dtype):
    codes, cb, s, _ = random_vq(n, d, k, seed=n * 10 + k)
    cb, s = cb.to(table_dtype), s.to(table_dtype)
    ref = dequantize(codes, cb.float(), s.float())  # fp32 sums in codebook order, then the scale
    out = torch.full((n, d), float("nan"))
    assert cpu_native.decode(codes, cb, s, out) is out
    assert torch.equal(out, ref)  # same operations in the same order: bit for bit
    out16 = torch.empty(n, d, dtype=torch.bfloat16)
    cpu_native.decode(codes, cb, s, out16)
    assert torch.equal(out16, ref.to(torch.bfloat16))  # one round-to-nearest-even from the fp32 value


@pytest.mark.skipif(not HAS_CC, reason="no C compiler")
def test_native_decode_reads_strided_codes_and_rejects_bad_out():
    codes, cb, s, _ = random_vq(40, 96, 2, seed=3)
    wide = torch.cat([codes, codes], dim=1)[:, ::2]  # non-contiguous view of the same codes
    assert not wide.is_contiguous()
    assert torch.equal(cpu_native.decode(wide, cb, s, torch.empty(40, 96)), dequantize(wide.contiguous(), cb, s))
    with pytest.raises(ValueError, match="contiguous"):
        cpu_native.decode(codes, cb, s, torch.empty(96, 40).t())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fbgemm_decode_still_matches_reference(monkeypatch, dtype):
    # The fallback where no compiler exists (and fp16 everywhere): several chunks and a ragged last one.
    monkeypatch.setattr(cpu_decode, "CHUNK_BYTES", 3 * 264 * 4 + 4)
    codes, cb, s, _ = random_vq(40, 264, 3, seed=5)
    ref = dequantize(codes, cb, s)
    out = cpu_decode.decode_cpu_fbgemm(codes, cb.to(dtype) if dtype != torch.float32 else cb, s, torch.empty(40, 264, dtype=dtype))
    if dtype == torch.float32:
        assert torch.equal(out, ref)
    else:
        assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2


def _run_fresh(env_extra: dict, tmp_path) -> str:
    # A fresh interpreter: the library is loaded once per process (lru_cache), so the fallback needs its own.
    code = ("import torch; from vqdm.kernels import cpu_native, cpu_decode, dequantize\n"
            "from tests.kernels.conftest import random_vq\n"
            "codes, cb, s, _ = random_vq(33, 136, 3)\n"
            "assert torch.equal(cpu_decode.decode_cpu(codes, cb, s), dequantize(codes, cb, s))\n"
            "print(cpu_native.status().available, cpu_native.status().reason)\n")
    import os

    env = {**os.environ, "VQDM_KERNEL_CACHE": str(tmp_path / "cache"), **env_extra}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_without_a_compiler_the_decode_falls_back_and_says_why(tmp_path):
    line = _run_fresh({"CC": str(tmp_path / "no-such-cc")}, tmp_path)
    assert line.startswith("False no C compiler"), line


def test_a_failing_build_falls_back_with_the_compiler_error(tmp_path):
    line = _run_fresh({"CC": "cc -DVQDM_NO_SUCH_FLAG -Werror=this-is-not-a-warning"}, tmp_path) if HAS_CC else None
    if line is None:
        pytest.skip("no C compiler")
    assert line.startswith("False building the native CPU decode failed"), line


def test_turned_off_by_environment(tmp_path):
    assert _run_fresh({"VQDM_CPU_NATIVE": "0"}, tmp_path) == "False turned off by VQDM_CPU_NATIVE=0"


@pytest.mark.skipif(not HAS_CC, reason="no C compiler")
def test_a_fresh_cache_builds_once_and_is_reused(tmp_path):
    first = _run_fresh({}, tmp_path)
    assert first.startswith("True loaded"), first
    libs = list((tmp_path / "cache").glob("vq_decode-*.so"))
    assert len(libs) == 1 and not list((tmp_path / "cache").glob("tmp*"))
    mtime = libs[0].stat().st_mtime_ns
    assert _run_fresh({}, tmp_path) == first and libs[0].stat().st_mtime_ns == mtime


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_through_the_native_decode_matches_reference(dtype):
    codes, cb, s, b = random_vq(72, 136, 3, seed=9)
    x = torch.randn(3, 77, 136).to(dtype)
    y = vq_linear(x, codes, cb, s, b, backend="cpu_decode")
    ref = vq_linear_reference(x.float(), codes, cb, s, b)
    assert ((y.float() - ref).norm() / ref.norm()).item() < (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.skipif(not HAS_CC, reason="no C compiler")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streaming_stores_write_the_same_weights(monkeypatch, dtype):
    # Big weights are written with non-temporal stores; force that path on a small one, aligned and not.
    monkeypatch.setattr(cpu_native, "STREAM_MIN_BYTES", 0)
    codes, cb, s, _ = random_vq(45, 136, 3, seed=11)
    ref = dequantize(codes, cb, s).to(dtype)
    aligned = torch.empty(45 * 136, dtype=dtype)
    assert aligned.data_ptr() % 32 == 0
    assert torch.equal(cpu_native.decode(codes, cb, s, aligned.view(45, 136)), ref)
    shifted = torch.empty(45 * 136 + 1, dtype=dtype)[1:].view(45, 136)  # not 32-byte aligned: plain stores
    assert torch.equal(cpu_native.decode(codes, cb, s, shifted), ref)
