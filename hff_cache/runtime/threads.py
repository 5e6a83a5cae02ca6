"""How many CPU threads this process may really use, and torch's intra-op team sized to it.

``os.cpu_count()`` counts the machine's cores, not the ones a container or ``taskset`` grants: torch then
starts more OpenMP threads than it has cores, and an oversubscribed team collapses (a 45 s epoch took over
10 minutes with two other CPU-bound jobs on 2 cores). The usable count is the smaller of the CPU affinity
mask and the cgroup quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us``).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

__all__ = ["LoadWatch", "SlowStepWatch", "cgroup_cpu_limit", "set_threads", "usable_cpus", "warn_if_loaded"]

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


class LoadWatch:
    """Samples the machine's 1-minute load average while a measurement runs (a daemon thread, every few
    seconds), so a benchmark can print beside its timings whether other jobs shared the cores.

    ``loaded`` when the highest load seen exceeds the usable CPUs by more than ``own`` (the load the
    measurement itself adds, default one process per usable CPU minus slack): then the timings mean little.
    """

    def __init__(self, every: float = 5.0, own: float | None = None) -> None:
        import threading

        self.cpus = usable_cpus()
        self.own = self.cpus if own is None else own
        self.samples: list[float] = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True, name="hff-loadwatch")

    def _run(self, every: float) -> None:
        while not self._stop.wait(every):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    @property
    def loaded(self) -> bool:
        return max(self.samples) > self.own + 0.5

    def summary(self) -> dict[str, float | int | bool]:
        import torch

        return {"load_min": round(min(self.samples), 2), "load_max": round(max(self.samples), 2),
                "usable_cpus": self.cpus, "torch_threads": torch.get_num_threads(), "loaded": self.loaded}

    def line(self) -> str:
        s = self.summary()
        verdict = ("LOADED: other jobs shared the cores, so these timings are not comparable; rerun on a quiet "
                   "machine" if s["loaded"] else "quiet")
        return (f"machine: load average {s['load_min']}-{s['load_max']} on {s['usable_cpus']} usable CPUs, "
                f"torch threads {s['torch_threads']}: {verdict}")


def warn_if_loaded(log: Callable[[str], object] | None = None) -> bool:
    """Before a benchmark measures: warn (on stderr unless ``log`` is given) when the 1-minute load average
    is already at least half the usable CPUs, i.e. other jobs share the cores. Returns whether it warned."""
    load, cpus = os.getloadavg()[0], usable_cpus()
    if load < cpus / 2:
        return False
    message = (f"warning: load average {load:.2f} on {cpus} usable CPUs before measuring: other jobs share the "
               "cores, so the timings will not be comparable; rerun on a quiet machine")
    (log or (lambda m: print(m, file=sys.stderr, flush=True)))(message)
    return True


class SlowStepWatch:
    """Notices, once per run, when an epoch's steps run far slower than that epoch's own first steps: the
    signature of an oversubscribed OpenMP team (other CPU-bound jobs on the cores torch's threads use).

    ``reference`` steps after ``skip`` warm-up steps set the epoch's pace; a later window of ``window`` steps
    whose median is ``factor`` times that pace or more triggers the message."""

    def __init__(self, factor: float = 3.0, skip: int = 3, reference: int = 10, window: int = 10) -> None:
        self.factor, self.skip, self.reference, self.window = factor, skip, reference, window
        self.warned = False
        self.new_epoch()

    def new_epoch(self) -> None:
        self.steps: list[float] = []

    def add(self, seconds: float) -> str | None:
        """Record one step; the message to log (once per run), or None."""
        self.steps.append(seconds)
        first = self.steps[self.skip:self.skip + self.reference]
        recent = self.steps[-self.window:]
        if self.warned or len(self.steps) < self.skip + self.reference + self.window:
            return None
        pace, now = sorted(first)[len(first) // 2], sorted(recent)[len(recent) // 2]
        if now < self.factor * pace:
            return None
        self.warned = True
        import torch

        return (f"steps now take {now / pace:.1f}x this epoch's first steps ({1000 * now:.0f} ms vs "
                f"{1000 * pace:.0f} ms) with {torch.get_num_threads()} torch threads and load average "
                f"{os.getloadavg()[0]:.1f} on {usable_cpus()} usable CPUs: other CPU-bound jobs probably share the "
                "cores, and an oversubscribed thread team crawls. Try --threads 1 (or fewer jobs at once).")
