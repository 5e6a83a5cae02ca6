"""Stage one end to end: intake -> tiny random encoder -> Zarr cache -> reader."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from hff_cache.cache import CacheMismatchError, CacheReader
from hff_cache.config import ExtractConfig
from hff_cache.encoders.tiny import tiny_encoder
from hff_cache.extraction.extract import extract, make_batches, shard_utterances
from hff_cache.intake.audio import AudioError, load_audio
from hff_cache.intake.manifests import load_intake
from hff_cache.testing import write_corpus

DURATIONS = [1.3, 0.45, 2.1, 0.9, 1.7, 0.6, 1.1]


def _cfg(manifest: Path, out: Path, **kw) -> ExtractConfig:
    base = dict(model="tiny-random:x", data=str(manifest), out=str(out), progress=False, batch_seconds=4.0)
    return ExtractConfig(**{**base, **kw})


def _direct(encoder, path: str) -> list[np.ndarray]:
    wave = load_audio(path, encoder.info.sample_rate)
    with torch.inference_mode():
        return [h[0].numpy() for h in encoder(encoder.prepare([wave]))]


@pytest.mark.parametrize("family", ["wav2vec2", "wavlm", "wav2vec2-bert", "whisper"])
@pytest.mark.parametrize("codec,atol", [("fp16", 2e-3), ("int8", None)])
def test_cache_equals_single_forward(tmp_path: Path, family: str, codec: str, atol: float | None) -> None:
    manifest = write_corpus(tmp_path / "a", DURATIONS, texts=[f"T{i}" for i in range(len(DURATIONS))])
    enc = tiny_encoder(family)
    report = extract(_cfg(manifest, tmp_path / "c.zarr", codec=codec), encoder=enc)
    assert report.extracted == len(DURATIONS) and report.already_done == 0
    reader = CacheReader(str(tmp_path / "c.zarr"))
    assert len(reader) == len(DURATIONS) and reader.meta.layers == [0, 1, 2, 3]
    utts = load_intake(manifest)
    wants = {u.id: np.stack(_direct(enc, u.audio), axis=1) for u in utts}  # (T, L, D) each
    # int8 scales are per part and dimension: the error is at most half a step of absmax/127.
    absmax = np.max([np.abs(w).max(axis=0) for w in wants.values()], axis=0)
    tol = atol if atol is not None else absmax / 127 * 0.51 + 1e-6
    for u in utts:
        got, want = reader.read(u.id), wants[u.id]
        assert got.shape == want.shape
        assert got.shape[0] == enc.num_frames(round(u.duration * 16000))
        assert np.all(np.abs(got - want) <= tol + 1e-3 * np.abs(want))
        assert reader.texts[reader.index_of(u.id)] == u.text
        assert reader.metas[reader.index_of(u.id)]["speaker"] == u.meta["speaker"]


def test_layer_subset_and_rerun_is_noop(tmp_path: Path) -> None:
    manifest = write_corpus(tmp_path / "a", DURATIONS)
    out = tmp_path / "c.zarr"
    enc = tiny_encoder("hubert")
    extract(_cfg(manifest, out, layers=[0, 2]), encoder=enc)
    reader = CacheReader(str(out))
    assert reader.meta.layers == [0, 2]
    u = load_intake(manifest)[0]
    np.testing.assert_allclose(reader.read(u.id, layers=[2])[:, 0], _direct(enc, u.audio)[2], atol=2e-3)
    with pytest.raises(Exception, match="1"):
        reader.read(u.id, layers=[1])
    again = extract(_cfg(manifest, out, layers=[0, 2]), encoder=enc)
    assert again.extracted == 0 and again.already_done == len(DURATIONS)


def test_other_model_or_codec_is_refused(tmp_path: Path) -> None:
    manifest = write_corpus(tmp_path / "a", DURATIONS[:2])
    out = tmp_path / "c.zarr"
    extract(_cfg(manifest, out), encoder=tiny_encoder("wav2vec2"))
    with pytest.raises(CacheMismatchError, match="encoder.file_hash"):
        extract(_cfg(manifest, out), encoder=tiny_encoder("wav2vec2", seed=3))
    with pytest.raises(CacheMismatchError, match="codec.name"):
        extract(_cfg(manifest, out, codec="int8"), encoder=tiny_encoder("wav2vec2"))


class _FailingEncoder(torch.nn.Module):
    """Wraps an encoder and dies on its n-th batch, like a crash mid-run."""

    def __init__(self, inner, fail_at: int) -> None:
        super().__init__()
        self.inner, self.fail_at, self.calls = inner, fail_at, 0
        self.info, self.num_hidden_states = inner.info, inner.num_hidden_states
        self.prepare = inner.prepare

    def forward(self, batch, layers=None):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("simulated crash")
        return self.inner(batch, layers)


def test_interrupted_run_resumes_to_the_same_cache(tmp_path: Path) -> None:
    durations = [0.5 + 0.1 * (i % 7) for i in range(24)]
    manifest = write_corpus(tmp_path / "a", durations)
    kw = dict(batch_seconds=2.0, part_frames=80)
    extract(_cfg(manifest, tmp_path / "full.zarr", **kw), encoder=tiny_encoder("wav2vec2"))
    broken = _FailingEncoder(tiny_encoder("wav2vec2"), fail_at=5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        extract(_cfg(manifest, tmp_path / "resumed.zarr", **kw), encoder=broken)
    partial = CacheReader(str(tmp_path / "resumed.zarr"))
    assert 0 < len(partial) < len(durations)  # what was done before the crash is kept
    report = extract(_cfg(manifest, tmp_path / "resumed.zarr", **kw), encoder=tiny_encoder("wav2vec2"))
    assert report.already_done == len(partial) and report.extracted == len(durations) - len(partial)
    full, resumed = CacheReader(str(tmp_path / "full.zarr")), CacheReader(str(tmp_path / "resumed.zarr"))
    assert sorted(full.ids) == sorted(resumed.ids) and len(set(resumed.ids)) == len(durations)
    for utt_id in full.ids:
        np.testing.assert_array_equal(full.read(utt_id), resumed.read(utt_id))


def test_bad_audio_raise_and_skip(tmp_path: Path) -> None:
    manifest = write_corpus(tmp_path / "a", [0.8, 0.9, 1.0])
    (tmp_path / "a" / "broken.wav").write_bytes(b"RIFF....garbage")
    sf.write(tmp_path / "a" / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    rows = manifest.read_text() + "".join(
        json.dumps({"id": i, "audio": a}) + "\n"
        for i, a in (("bad1", "broken.wav"), ("bad2", "empty.wav"), ("bad3", "missing.wav")))
    manifest.write_text(rows)
    with pytest.raises(AudioError, match=r"bad|broken|empty|missing"):
        extract(_cfg(manifest, tmp_path / "c.zarr"), encoder=tiny_encoder("wav2vec2"))
    report = extract(_cfg(manifest, tmp_path / "c.zarr", on_error="skip"), encoder=tiny_encoder("wav2vec2"))
    reasons = {s["id"]: s["reason"] for s in report.skipped}
    assert set(reasons) == {"bad1", "bad2", "bad3"}
    assert "unreadable" in reasons["bad1"] and "no samples" in reasons["bad2"] and "not found" in reasons["bad3"]
    reader = CacheReader(str(tmp_path / "c.zarr"))
    assert len(reader) == 3 and {s["id"] for s in reader.skipped()} == set(reasons)
    assert reader.info()["skipped"] == 3


def test_shards_are_balanced_and_disjoint(tmp_path: Path) -> None:
    manifest = write_corpus(tmp_path / "a", DURATIONS)
    utts = load_intake(manifest)
    shards = [shard_utterances(utts, 3, i) for i in range(3)]
    ids = [u.id for s in shards for u in s]
    assert sorted(ids) == sorted(u.id for u in utts)
    loads = [sum(u.duration for u in s) for s in shards]
    assert max(loads) - min(loads) <= max(DURATIONS)
    batches = make_batches(utts, batch_seconds=3.0)
    assert all(max(u.duration for u in b) * len(b) <= 3.0 or len(b) == 1 for b in batches)


def test_cli_extract_and_info(tmp_path: Path) -> None:
    manifest = write_corpus(tmp_path / "a", DURATIONS[:3])
    out = tmp_path / "c.zarr"
    cmd = [sys.executable, "-m", "hff_cache", "extract", "--model", "tiny-random:wav2vec2", "--data",
           str(manifest), "--out", str(out), "--codec", "int8", "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "extracted 3 utterances" in done.stdout
    info = json.loads(subprocess.run([sys.executable, "-m", "hff_cache", "info", str(out), "--json"],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["utterances"] == 3 and info["codec"]["name"] == "int8" and info["layers"] == [0, 1, 2, 3]
    assert info["hidden_size"] == 32 and info["frame_rate"] == 50.0 and info["bytes"] > 0
    assert info["model"] == "tiny-random:wav2vec2" and info["skipped"] == 0
    again = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "nothing to do" in again.stdout
    bad = subprocess.run(cmd[:-3] + ["--codec", "fp16"], capture_output=True, text=True)
    assert bad.returncode == 2 and "codec.name" in bad.stderr


def test_whisper_window_is_recorded_and_a_mixed_resume_refused(tmp_path: Path) -> None:
    manifest = write_corpus(tmp_path / "a", DURATIONS[:3])
    out = tmp_path / "c.zarr"

    def run(window: str) -> None:
        extract(ExtractConfig(model="tiny-random:whisper", data=str(manifest), out=str(out), progress=False,
                              whisper_window=window), encoder=tiny_encoder("whisper"))

    run("30s")
    reader = CacheReader(out)
    assert reader.meta.encoder.input_window == "30s"
    frames = {uid: int(n) for uid, n in zip(reader.ids, reader.lengths, strict=True)}
    assert frames == {f"utt{i:03d}": tiny_encoder("whisper").num_frames(int(d * 16000))
                      for i, d in enumerate(DURATIONS[:3])}  # the real frames only
    with pytest.raises(CacheMismatchError, match="input_window"):
        run("real")
