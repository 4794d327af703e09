"""Torch threads from the CPUs the process really has: cgroup v2 / v1 quota and affinity."""
from __future__ import annotations

import os

from vqdm.server import threads


def test_cgroup_v2_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert threads.cgroup_cpu_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads.cgroup_cpu_quota(tmp_path) is None


def test_cgroup_v1_quota(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.cgroup_cpu_quota(tmp_path) == 0.5
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert threads.cgroup_cpu_quota(tmp_path) is None


def test_threads_follow_the_smaller_of_quota_and_affinity_less_one(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    (tmp_path / "cpu.max").write_text("250000 100000\n")  # 2.5 CPUs → 3
    assert threads.available_cpus(tmp_path) == 3 and threads.torch_threads(None, tmp_path) == 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})  # taskset / cpuset: 2 CPUs
    assert threads.available_cpus(tmp_path) == 2 and threads.torch_threads(None, tmp_path) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    assert threads.torch_threads(None, tmp_path) == 1  # never zero
    assert threads.torch_threads(6, tmp_path) == 6  # the override wins
