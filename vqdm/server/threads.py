"""How many torch threads this process should run: the CPUs it really has, not the node's.

Torch sizes its pool from the machine's cores. In a container with a CPU quota, or beside busy
neighbours, its threads then share fewer cores than they number, and every parallel region waits
for the thread that was descheduled: on a 2-core machine with one core busy, start-up took 285 s
instead of 13 s. So: the CPUs the process may use (the smaller of `sched_getaffinity` and the
cgroup `cpu.max` quota, rounded up), less one left for the event loop, tokenizers and image
encoding, at least one. `VQDM_CPU_THREADS` / `--cpu-threads` overrides.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

log = logging.getLogger("vqdm.server")

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs allowed by the cgroup quota (v2 `cpu.max`, else v1 `cpu.cfs_quota_us`); None: unlimited."""
    v2 = root / "cpu.max"
    try:
        if v2.is_file():
            parts = v2.read_text().split()  # "QUOTA PERIOD" in microseconds, or "max PERIOD"
            if not parts or parts[0] == "max":
                return None
            return int(parts[0]) / int(parts[1] if len(parts) > 1 else 100000)
        v1q, v1p = root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us"
        if v1q.is_file() and v1p.is_file():
            quota = int(v1q.read_text())
            return None if quota <= 0 else quota / int(v1p.read_text())
    except (OSError, ValueError) as e:
        log.warning("cannot read the cgroup CPU quota under %s: %s", root, e)
    return None


def available_cpus(root: Path = CGROUP_ROOT) -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(root)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return cpus


def torch_threads(override: int | None = None, root: Path = CGROUP_ROOT) -> int:
    if override is not None:
        return override
    return max(1, available_cpus(root) - 1)


def apply(override: int | None = None) -> int:
    """Set torch's intra-op pool (and one inter-op thread: the server runs one batch per device)."""
    n = torch_threads(override)
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work already ran in this process
        pass
    log.info("torch threads: %d (%s)", n, "set by cpu_threads" if override else
             f"{available_cpus()} CPU(s) from affinity and cgroup quota, one left for the server")
    return n
