"""`hff-cache doctor`: a sound install reports every core check passing; a missing extra is named with its
install command and does not fail the report; a broken core check does."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hff_cache import doctor


def test_doctor_reports_the_install_and_passes_its_smoke_test(tmp_path) -> None:
    out = subprocess.run([sys.executable, "-m", "hff_cache", "doctor", "--json", "--cache-dir", str(tmp_path)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert report["ok"] and checks["smoke test"]["ok"] and "max |cache - forward|" in checks["smoke test"]["detail"]
    assert {"versions", "threads", "gpu", "disk"} <= set(checks)
    assert "torch 2." in checks["versions"]["detail"] and "usable CPUs" in checks["threads"]["detail"]
    # make test installs every extra the doctor knows of, real Whisper weights included
    assert checks["extra: whisper base weights"]["ok"] and checks["extra: decode"]["ok"]


def test_a_missing_extra_is_named_with_its_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = doctor._has_module
    monkeypatch.setattr(doctor, "_has_module", lambda name: name != "sentencepiece" and real(name))
    report = doctor.diagnose(smoke=False)
    decode = next(c for c in report.checks if c.name == "extra: decode")
    assert not decode.ok and "sentencepiece" in decode.detail and decode.fix == "pip install 'hff-cache[decode]'"
    assert report.ok  # an optional part, not a broken install


def test_a_failing_core_check_fails_the_report(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> doctor.Check:
        raise ImportError("zarr is broken")

    monkeypatch.setattr(doctor, "_versions", broken)
    report = doctor.diagnose(smoke=False)
    assert not report.ok and any("zarr is broken" in c.detail for c in report.checks)
