"""The demo's machinery end to end on a tiny synthetic corpus with a tiny random Whisper (seconds, not minutes)."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from hff_cache.cli import app
from hff_cache.demo import FUSIONS
from hff_cache.intake.synth import NO_ENGINE_MSG, available_engines


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    if not available_engines():
        pytest.fail(NO_ENGINE_MSG)
    out = tmp_path_factory.mktemp("demo")
    args = ["demo", "--out", str(out), "--model", "tiny-random:whisper", "--num-train", "10", "--num-valid",
            "4", "--epochs", "2", "--probe-epochs", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out, args, result.output


def test_table_and_files(demo_dir):
    out, _, output = demo_dir
    assert "| fusion | WER % | CER %" in output
    md = (out / "results.md").read_text()
    summary = json.loads((out / "results.json").read_text())
    assert [r["fusion"] for r in summary["fusions"]] == list(FUSIONS)
    for r in summary["fusions"]:
        assert f"| {r['fusion']} |" in md
        assert 0 <= r["cer"] <= 1000 and math.isfinite(r["wer"])
        assert r["trainable_params"] > 0 and r["epoch_seconds"] > 0
        metrics = json.loads((out / "runs" / r["fusion"] / "metrics.json").read_text())
        assert metrics["epochs"] == 2 and metrics["fusion"] == r["fusion"]
    assert len(summary["probe"]) == summary["cache"]["layers"].__len__() == 4  # embedding + 3 layers
    for path in summary["plots"].values():
        assert path.endswith(".png") and (out / path.split(str(out) + "/", 1)[-1]).exists()


def test_rerun_reuses_every_stage(demo_dir):
    out, args, _ = demo_dir
    before = (out / "runs" / "last" / "checkpoints" / "best.safetensors").stat().st_mtime_ns
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "results.json").read_text())
    assert (out / "runs" / "last" / "checkpoints" / "best.safetensors").stat().st_mtime_ns == before
    assert "reusing" in result.output or summary["seconds"]["probe"] < 5
