"""`hff-cache transcribe`: a run trained on a cache and a run trained online both transcribe new audio.

The audio is a toy "speech" in which each letter is a tone (A 330 Hz, B 660 Hz, C 1320 Hz) and a space is
a short pause, so a tiny random encoder plus a small head can overfit it in a few dozen steps and the
transcripts must come back exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from hff_cache.cli import app
from hff_cache.config import ExtractConfig, TrainConfig
from hff_cache.encoders.tiny import tiny_encoder
from hff_cache.extraction.extract import extract
from hff_cache.model.fusion import FusionConfig

TEXTS = ["A B", "BA", "C AB"]
FREQ = {"A": 330.0, "B": 660.0, "C": 1320.0}
RATE = 16000
HEAD = dict(fusion=FusionConfig(width=64, blocks=1, dropout=0.0), lr=1e-2, lr_schedule="constant",
            warmup_steps=0, spec_time_masks=0, device="cpu", threads=1, num_workers=1)


def tone_wave(text: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)

    def segment(seconds: float, freq: float | None = None) -> np.ndarray:
        t = np.arange(int(seconds * RATE)) / RATE
        x = 0.01 * rng.standard_normal(t.size)
        if freq:
            x += 0.3 * np.sin(2 * np.pi * freq * t) + 0.1 * np.sin(4 * np.pi * freq * t)
        return x

    parts = [segment(0.1)] + [segment(0.12) if ch == " " else segment(0.2, FREQ[ch]) for ch in text]
    return np.concatenate(parts + [segment(0.1)]).astype(np.float32)


@pytest.fixture(scope="module")
def tones(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tones")
    manifest = folder / "manifest.jsonl"
    with manifest.open("w") as f:
        for i, text in enumerate(TEXTS):
            sf.write(folder / f"tone{i}.wav", tone_wave(text, seed=i), RATE)
            f.write(json.dumps({"id": f"tone{i}", "audio": f"tone{i}.wav", "text": text, "speaker": "s"}) + "\n")
    return manifest


@pytest.fixture(scope="module")
def online_run(tones: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """hff-adapters on tiny wav2vec2, trained through the CLI."""
    out = tmp_path_factory.mktemp("online") / "run"
    args = ["train", "--online", "--model", "tiny-random:wav2vec2", "--data", str(tones), "--valid-data",
            str(tones), "--method", "hff-adapters", "--bottleneck", "8", "--out", str(out), "--epochs", "40",
            "--width", "64", "--blocks", "1", "--dropout", "0", "--lr", "1e-2", "--lr-schedule", "constant",
            "--warmup-steps", "0", "--spec-time-masks", "0", "--device", "cpu", "--threads", "1",
            "--eval-every", "100", "--num-workers", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


def _wavs(manifest: Path) -> list[str]:
    return [str(manifest.parent / f"tone{i}.wav") for i in range(len(TEXTS))]


def test_online_run_transcribes_its_training_audio_exactly(online_run: Path, tones: Path) -> None:
    from hff_cache.evaluation.transcribe import transcribe

    metrics = json.loads((online_run / "metrics.json").read_text())
    assert metrics["wer"] == 0.0 and metrics["trainable_encoder_params"] > 0
    rows = transcribe(online_run, _wavs(tones), device="cpu")
    assert rows == [(f"tone{i}", t) for i, t in enumerate(TEXTS)]

    # the CLI: --data, one id<TAB>text line per utterance, batched
    result = CliRunner().invoke(app, ["transcribe", str(online_run), "--data", str(tones), "--device", "cpu",
                                      "--batch-seconds", "2"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [f"tone{i}\t{t}" for i, t in enumerate(TEXTS)]


def test_transcribe_refuses_an_encoder_with_other_weights(online_run: Path, tones: Path) -> None:
    result = CliRunner().invoke(app, ["transcribe", str(online_run), _wavs(tones)[0], "--model",
                                      "tiny-random:hubert", "--device", "cpu"])
    assert result.exit_code == 2 and "trained on" in result.output
    # evaluate reads caches: an online run (its model includes the encoder) is pointed to transcribe
    result = CliRunner().invoke(app, ["evaluate", str(online_run), "--cache", str(tones.parent)])
    assert result.exit_code == 2 and "online run" in result.output and "transcribe" in result.output


def test_cached_run_transcribes_with_its_stats_normalisation(tones: Path, tmp_path: Path) -> None:
    from hff_cache.evaluation.transcribe import transcribe
    from hff_cache.training.cached import train

    cache = tmp_path / "cache.zarr"
    extract(ExtractConfig(model="tiny-random:wav2vec2", data=str(tones), out=str(cache), progress=False),
            encoder=tiny_encoder("wav2vec2"))
    run = tmp_path / "run"
    metrics = train(TrainConfig(cache=str(cache), valid_cache=str(cache), out=str(run), normalize="stats",
                                epochs=40, eval_every=100, **HEAD), log=lambda s: None)
    assert metrics["wer"] == 0.0 and metrics["trainable_encoder_params"] == 0
    # the encoder comes from the cache's metadata; the stats buffers come with the weights
    assert transcribe(run, _wavs(tones), device="cpu") == [(f"tone{i}", t) for i, t in enumerate(TEXTS)]


@pytest.mark.parametrize("method", ["bitfit", "full", "adapters"])
def test_transcribe_matches_the_trained_model_on_whisper(tones: Path, tmp_path: Path, method: str) -> None:
    """Whisper's encoder through the same path: transcribe (a fresh process's view: encoder reloaded,
    method set up again, checkpoint loaded) decodes exactly as the in-memory trained model does."""
    from hff_cache.evaluation.evaluate import evaluate_model
    from hff_cache.evaluation.transcribe import transcribe
    from hff_cache.training.loop import fit
    from hff_cache.training.online import prepare_online

    cfg = TrainConfig(online=True, model="tiny-random:whisper", data=str(tones), valid_data=str(tones),
                      method=method, bottleneck=8, out=str(tmp_path / "run"), epochs=3, **HEAD)
    setup, cfg = prepare_online(cfg, log=lambda s: None)
    fit(setup, cfg, log=lambda s: None)
    want = evaluate_model(setup.model, setup.valid, setup.task, setup.valid_refs).rows
    got = transcribe(tmp_path / "run", data=str(tones), checkpoint="last", device="cpu")
    assert got == [(r["id"], r["hyp"]) for r in want]
