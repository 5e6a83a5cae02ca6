"""The CPU count torch's team is sized to: affinity mask and cgroup quota, not the machine's cores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from hff_cache.runtime.threads import cgroup_cpu_limit, set_threads, usable_cpus


def _cgroup(tmp_path: Path, v2: str | None = None, v1: tuple[int, int] | None = None) -> Path:
    tmp_path.mkdir(parents=True)
    if v2 is not None:
        (tmp_path / "cpu.max").write_text(v2)
    if v1 is not None:
        (tmp_path / "cpu").mkdir()
        (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(str(v1[0]))
        (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(str(v1[1]))
    return tmp_path


def test_cgroup_quota_v2_v1_and_unlimited(tmp_path: Path) -> None:
    assert cgroup_cpu_limit(_cgroup(tmp_path / "a", v2="150000 100000\n")) == 1.5
    assert cgroup_cpu_limit(_cgroup(tmp_path / "b", v2="max 100000\n")) is None
    assert cgroup_cpu_limit(_cgroup(tmp_path / "c", v1=(50000, 100000))) == 0.5
    assert cgroup_cpu_limit(_cgroup(tmp_path / "d", v1=(-1, 100000))) is None
    assert cgroup_cpu_limit(tmp_path / "missing") is None


def test_usable_cpus_takes_the_smaller_of_affinity_and_quota(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    assert usable_cpus(tmp_path / "none") == affinity
    assert usable_cpus(_cgroup(tmp_path / "q", v2="50000 100000")) == 1  # half a CPU: one thread
    assert usable_cpus(_cgroup(tmp_path / "big", v2=f"{100000 * (affinity + 8)} 100000")) == affinity


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to narrow the mask")
def test_affinity_mask_narrows_the_count(tmp_path: Path) -> None:
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(before)})
        assert usable_cpus(tmp_path / "none") == 1
    finally:
        os.sched_setaffinity(0, before)


def test_set_threads_uses_the_request_or_the_usable_count() -> None:
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        assert set_threads(0) == usable_cpus() == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_load_watch_reports_the_load_it_saw(monkeypatch: pytest.MonkeyPatch) -> None:
    from hff_cache.runtime import threads

    loads = iter([0.4, 0.5, 9.0, 9.0, 9.0])
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (next(loads, 9.0), 0.0, 0.0))
    with threads.LoadWatch(every=0.01, own=1) as watch:
        import time

        time.sleep(0.1)
    s = watch.summary()
    assert s["load_min"] == 0.4 and s["load_max"] == 9.0 and s["loaded"] is True
    assert "LOADED" in watch.line()
    quiet = threads.LoadWatch(own=2)
    quiet.samples = [0.9, 1.2]
    assert not quiet.loaded and quiet.line().endswith("quiet")


def test_slow_step_watch_speaks_once_when_an_epoch_crawls() -> None:
    from hff_cache.runtime.threads import SlowStepWatch

    watch = SlowStepWatch(factor=3.0, skip=2, reference=5, window=5)
    steady = [watch.add(0.1) for _ in range(20)]
    assert steady == [None] * 20  # a steady epoch says nothing
    watch.new_epoch()
    said = [watch.add(t) for t in [0.5, 0.5] + [0.1] * 5 + [0.35] * 5]
    assert said[-1] is not None and "3.5x" in said[-1] and "--threads 1" in said[-1]
    assert all(s is None for s in said[:-1])
    assert watch.add(1.0) is None  # once per run
    watch.new_epoch()
    assert [watch.add(t) for t in [0.1] * 7 + [1.0] * 5] == [None] * 12
