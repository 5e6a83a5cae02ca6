"""How many CPU threads this process may really use, and torch's intra-op team sized to it.

``os.cpu_count()`` counts the machine's cores, not the ones a container or ``taskset`` grants: torch then
starts more OpenMP threads than it has cores, and an oversubscribed team collapses (a 45 s epoch took over
10 minutes with two other CPU-bound jobs on 2 cores). The usable count is the smaller of the CPU affinity
mask and the cgroup quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["cgroup_cpu_limit", "set_threads", "usable_cpus"]

_CGROUP = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = _CGROUP) -> float | None:
    """CPUs the cgroup quota allows (e.g. 1.5), or None when unlimited or unknown."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def usable_cpus(root: Path = _CGROUP) -> int:
    """Whole CPUs this process may use: min(affinity mask, ceil(cgroup quota)), at least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        n = min(n, max(1, math.ceil(limit)))
    return max(1, n)


def set_threads(requested: int = 0) -> int:
    """Set torch's intra-op threads: ``requested`` when > 0, else ``usable_cpus()``; returns the count set."""
    import torch

    n = requested if requested > 0 else usable_cpus()
    torch.set_num_threads(n)
    return n
