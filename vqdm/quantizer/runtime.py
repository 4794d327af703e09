"""The runtime choices the three pipelines (`vqdm quantize`, `distill`, `eval`) share: dtype
names, and where and in which precision a pipeline runs when the user does not say."""
from __future__ import annotations

import argparse

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}  # --dtype choices
DTYPE_HELP = "(default: float16 on cuda, float32 on cpu)"
DEVICE_HELP = "torch device (default: cuda when available, else cpu)"


def add_runtime_flags(p: argparse.ArgumentParser, dtype_flag: str, dtype_what: str, stop_flag: str) -> None:
    """A pipeline command's "runtime" group: --device, its dtype flag, --no-progress, and the hidden
    `stop_flag` that simulates an interruption (tests)."""
    r = p.add_argument_group("runtime")
    r.add_argument("--device", help=DEVICE_HELP)
    r.add_argument(dtype_flag, choices=list(DTYPES), help=f"{dtype_what} {DTYPE_HELP}")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument(stop_flag, type=int, help=argparse.SUPPRESS)


def default_device(device: str | None = None) -> str:
    """`device`, else "cuda" when available (torchrun ranks: the rank's current device), else "cpu"."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """`dtype` (a DTYPES name or a torch dtype), else float16 on CUDA and float32 elsewhere."""
    if isinstance(dtype, str):
        return DTYPES[dtype]
    return dtype or (torch.float16 if torch.device(device).type == "cuda" else torch.float32)
