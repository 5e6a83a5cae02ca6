"""Tests for the offline synthetic speech corpus (needs espeak-ng or flite; CI installs espeak-ng)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from hff_cache.intake.synth import NO_ENGINE_MSG, SynthConfig, available_engines, generate_sentences, synthesize_corpus


def _rows(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text().splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    if not available_engines():
        pytest.fail(NO_ENGINE_MSG)  # deliberately not a skip: the demo is useless without a synthesizer
    calls: list[tuple[int, int]] = []
    cfg = SynthConfig(tmp_path_factory.mktemp("synth"), num_train=12, num_valid=4, seed=3)
    train, valid = synthesize_corpus(cfg, progress=lambda d, t: calls.append((d, t)))
    return cfg, train, valid, calls


def test_engine_available():
    assert available_engines(), NO_ENGINE_MSG


def test_manifests_and_audio(corpus):
    cfg, train, valid, calls = corpus
    assert calls[-1] == (16, 16) and len(calls) == 16
    for manifest, n in ((train, 12), (valid, 4)):
        rows = _rows(manifest)
        assert len(rows) == n and len({r["id"] for r in rows}) == n
        for r in rows:
            assert set(r) == {"id", "audio", "text", "speaker", "duration"}
            assert r["text"] == r["text"].upper() and 3 <= len(r["text"].split()) <= 10
            path = manifest.parent / r["audio"]
            info = sf.info(path)
            assert (info.samplerate, info.channels) == (16000, 1)
            audio, _ = sf.read(path, dtype="float32")
            assert np.isfinite(audio).all()
            assert np.sqrt(np.mean(audio**2)) > 0.01, f"{r['id']} ({r['speaker']}) is near-silent"
            assert 0.5 <= r["duration"] <= 10.0
            assert abs(len(audio) / 16000 - r["duration"]) < 1e-2


def test_valid_voices_unseen_in_train(corpus):
    _, train, valid, _ = corpus
    train_voices = {r["speaker"] for r in _rows(train)}
    valid_voices = {r["speaker"] for r in _rows(valid)}
    assert train_voices and valid_voices and not train_voices & valid_voices


def test_sentences_deterministic(corpus):
    cfg, train, valid, _ = corpus
    a, b = generate_sentences(50, seed=3), generate_sentences(50, seed=3)
    assert a == b and len(set(a)) == 50 and a != generate_sentences(50, seed=4)
    assert all(3 <= len(s.split()) <= 10 for s in a)
    assert [r["text"] for r in _rows(train)] == [s.upper() for s in generate_sentences(12, cfg.seed)]
    assert not {r["text"] for r in _rows(train)} & {r["text"] for r in _rows(valid)}


def test_second_call_is_noop(corpus):
    cfg, train, valid, _ = corpus
    before = {p: p.stat().st_mtime_ns for p in Path(cfg.out_dir).rglob("*") if p.is_file()}
    calls: list[tuple[int, int]] = []
    assert synthesize_corpus(cfg, progress=lambda d, t: calls.append((d, t))) == (train, valid)
    after = {p: p.stat().st_mtime_ns for p in Path(cfg.out_dir).rglob("*") if p.is_file()}
    assert before == after and not calls


def test_changed_config_rebuilds(tmp_path):
    cfg = SynthConfig(tmp_path, num_train=3, num_valid=2, seed=1)
    synthesize_corpus(cfg)
    cfg.num_valid = 3
    _, valid = synthesize_corpus(cfg)
    assert len(_rows(valid)) == 3
