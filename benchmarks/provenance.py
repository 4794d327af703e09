"""Where a result came from: the commit (with `-dirty` when tracked files differ from it) and the
machine, written into every results file beside its figures."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                           capture_output=True, text=True).stdout.strip()
    return (head or "unknown") + ("-dirty" if dirty else "")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine(device: str | None = None) -> dict:
    """The commit, the processor, and on CUDA the GPU with its CUDA and Triton versions (device None:
    CUDA where torch sees a GPU)."""
    import psutil  # deferred: git_commit alone (gpu_summary.py, after each GPU step) needs neither
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    info = {"commit": git_commit(), "host": platform.node(), "cpu": cpu_model(), "cores": os.cpu_count(),
            "ram_bytes": psutil.virtual_memory().total, "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    if device == "cuda":
        import triton  # deferred: there only on CUDA machines

        info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda, triton=triton.__version__)
    return info
