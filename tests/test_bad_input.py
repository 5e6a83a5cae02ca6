"""Bad inputs: every broken audio file or manifest line is one clear per-item error; with
``--on-error skip`` the rest is extracted and the report lists each skipped item with its reason.

Legal but unusual audio (all-silence, 8 kHz, stereo, non-ASCII names) must extract like any other.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hff_cache.cache import CacheReader
from hff_cache.cache.verify import verify_cache
from hff_cache.config import ExtractConfig
from hff_cache.extraction.extract import extract
from hff_cache.intake.audio import AudioError, load_audio
from hff_cache.intake.manifests import IntakeError, load_intake
from hff_cache.testing import synthetic_waves

RATE = 16_000


# --- making bad (and odd but legal) files ---------------------------------------------------------------


def _speech(seconds: float, rate: int = RATE, seed: int = 0) -> np.ndarray:
    return synthetic_waves([seconds], rate, seed)[0]


def _flac_bytes(folder: Path) -> bytes:
    p = folder / "_src.flac"
    sf.write(p, _speech(1.0), RATE)
    data = p.read_bytes()
    p.unlink()
    return data


def hour_long_wav(path: Path, seconds: int = 3600, rate: int = 8000) -> Path:
    """A valid PCM WAV header for `seconds` of audio over a sparse file: 57 MB that cost no disk or time."""
    data_bytes = seconds * rate * 2
    header = (b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVE"
              + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
              + b"data" + struct.pack("<I", data_bytes))
    with path.open("wb") as f:
        f.write(header)
        f.truncate(len(header) + data_bytes)  # zeros, unallocated
    return path


# name -> (write(path), substring the per-item reason must contain)
def _bad_files(folder: Path) -> dict[str, tuple[Path, str]]:
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, tuple[Path, str]] = {}

    def put(name: str, suffix: str, reason: str) -> Path:
        p = folder / f"{name}{suffix}"
        out[name] = (p, reason)
        return p

    sf.write(p := put("trunc_wav", ".wav", "truncated: the WAV header declares"), _speech(1.0), RATE)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    flac = _flac_bytes(folder)
    put("trunc_flac", ".flac", "truncated or corrupt").write_bytes(flac[: len(flac) // 2])
    rng = np.random.default_rng(1)
    cut = len(flac) // 3
    put("corrupt_flac", ".flac", "truncated or corrupt").write_bytes(
        flac[:cut] + rng.integers(0, 256, 2000, dtype=np.uint8).tobytes() + flac[cut + 2000:])
    sf.write(p := put("corrupt_wav_header", ".wav", "unreadable audio"), _speech(0.5), RATE)
    p.write_bytes(rng.integers(0, 256, 44, dtype=np.uint8).tobytes() + p.read_bytes()[44:])
    put("zero_bytes", ".wav", "empty (0 bytes)").write_bytes(b"")
    sf.write(put("no_samples", ".wav", "no samples"), np.zeros(0, np.float32), RATE)  # header only
    nan = _speech(0.5)
    nan[100:110] = np.nan
    sf.write(put("nan_samples", ".wav", "NaN"), nan, RATE, subtype="FLOAT")
    hour_long_wav(put("one_hour", ".wav", "3600 s long (from the file header), over the 600 s limit"))
    put("text_as_flac", ".flac", "unreadable audio").write_text("this is a text file, not audio\n" * 20)
    put("folder_as_wav", ".wav", "is a directory").mkdir()
    sf.write(put("too_short", ".wav", "shorter than one encoder frame"), _speech(0.01), RATE)
    out["missing"] = (folder / "missing.wav", "file not found")
    return out


def _odd_but_legal(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {"silence": folder / "silence.wav", "rate8k": folder / "rate8k.flac",
           "stereo44k": folder / "stereo44k.wav", "unicode ü 日本-語/x": folder / "données été" / "語 ü.flac"}
    sf.write(out["silence"], np.zeros(RATE, np.float32), RATE)
    sf.write(out["rate8k"], _speech(1.2, 8000, seed=2), 8000)
    left, right = _speech(0.8, 44100, seed=3), _speech(0.8, 44100, seed=4)
    sf.write(out["stereo44k"], np.stack([left, right], axis=1), 44100)
    out["unicode ü 日本-語/x"].parent.mkdir()
    sf.write(out["unicode ü 日本-語/x"], _speech(0.9, seed=5), RATE)
    return out


# --- per-item errors, one load at a time ----------------------------------------------------------------


def test_each_bad_file_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = _bad_files(tmp_path)
    real_read = sf.read
    decoded: list[str] = []

    def spy(file, *a, **k):  # noqa: ANN001, ANN202 - record what gets fully decoded
        decoded.append(str(file))
        return real_read(file, *a, **k)

    monkeypatch.setattr(sf, "read", spy)
    for name, (path, reason) in bad.items():
        with pytest.raises(AudioError) as ei:
            load_audio(str(path), RATE)
        assert reason in ei.value.reason, (name, ei.value.reason)
        assert str(path) in str(ei.value), name  # the message names the file
    # The hour is refused from its header, never decoded (57 MB of samples here, 230 MB as float32).
    assert str(bad["one_hour"][0]) not in decoded
    # Raising the limit is the documented fix; the header check honours it.
    assert "over the" not in _reason(bad["one_hour"][0], max_seconds=4000)


def _reason(path: Path, **kw: float) -> str:
    try:
        load_audio(str(path), RATE, **kw)  # decodes the sparse hour: zeros, fine
    except AudioError as e:
        return e.reason
    return ""


def test_odd_but_legal_audio_loads(tmp_path: Path) -> None:
    ok = _odd_but_legal(tmp_path)
    silence = load_audio(str(ok["silence"]), RATE)
    assert silence.shape == (RATE,) and not silence.any()  # legal: e.g. the _silence_ class of keyword spotting
    assert load_audio(str(ok["rate8k"]), RATE).shape == (round(1.2 * RATE),)  # resampled 8k -> 16k
    stereo = load_audio(str(ok["stereo44k"]), RATE)
    assert stereo.ndim == 1 and stereo.shape == (round(0.8 * RATE),)  # downmixed, resampled


# --- the whole pipeline, --on-error skip ----------------------------------------------------------------


def _manifest(tmp_path: Path) -> tuple[Path, dict[str, str], list[str]]:
    """Good, odd and bad items plus malformed lines; returns (manifest, {skipped id: reason part}, good ids)."""
    audio = tmp_path / "audio"
    good = {f"good{i}": audio / f"good{i}.wav" for i in range(3)}
    audio.mkdir(parents=True)
    for i, p in enumerate(good.values()):
        sf.write(p, _speech(0.6 + 0.2 * i, seed=10 + i), RATE)
    good.update(_odd_but_legal(audio / "odd"))
    bad = _bad_files(audio / "bad")
    rows = [json.dumps({"id": k, "audio": str(p.relative_to(tmp_path)), "text": "ok"}, ensure_ascii=False)
            for k, p in good.items()]
    rows += [json.dumps({"id": k, "audio": str(p.relative_to(tmp_path))}) for k, (p, _) in bad.items()]
    expected = {k: r for k, (_, r) in bad.items()}
    manifest = tmp_path / "manifest.jsonl"
    malformed = ['{"id": "x", "audio": ', '["a list"]', '{"id": "no-audio"}',
                 '{"id": "d", "audio": "good0.wav", "duration": "long"}']
    dup = json.dumps({"id": "dup", "audio": "audio/good0.wav"})
    lines = rows[:2] + malformed[:2] + rows[2:] + [dup, dup] + malformed[2:]
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    for text, reason in zip(malformed, ["not valid JSON", "must be a JSON object", "no 'audio'",
                                        "'duration' must be a number"], strict=True):
        expected[f"{manifest}:{lines.index(text) + 1}"] = reason
    expected["dup"] = "duplicate utterance id"
    return manifest, expected, list(good)


def test_skip_completes_and_reports_every_bad_item(tmp_path: Path) -> None:
    manifest, expected, good = _manifest(tmp_path)
    out = tmp_path / "c.zarr"
    with pytest.raises(IntakeError, match=r"manifest.jsonl:3: not valid JSON"):  # raise mode: first bad line
        extract(ExtractConfig(model="tiny-random:wav2vec2", data=str(manifest), out=str(out), progress=False))

    cmd = [sys.executable, "-m", "hff_cache", "extract", "--model", "tiny-random:wav2vec2", "--data",
           str(manifest), "--out", str(out), "--on-error", "skip", "--no-progress", "--batch-seconds", "4"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert f"extracted {len(good)} utterances" in run.stdout and f"{len(expected)} skipped" in run.stdout
    printed = [ln.strip() for ln in run.stderr.splitlines() if ln.strip().startswith("skipped ")]
    assert len(printed) == len(expected)
    for uid, reason in expected.items():  # one line per item: its id and its reason
        assert any(ln.startswith(f"skipped {uid}") and reason in ln for ln in printed), (uid, printed)

    reader = CacheReader(str(out))
    assert sorted(reader.ids) == sorted(good)  # non-ASCII id and path included, byte for byte
    recorded = {r["id"]: r["reason"] for r in reader.skipped()}
    assert set(recorded) == set(expected)
    assert all(reason in recorded[uid] for uid, reason in expected.items())
    # 8 kHz was resampled: its frames are those of 1.2 s at the encoder's rate (50 Hz, wav2vec2 framing)
    assert reader.lengths[reader.index_of("rate8k")] == (round(1.2 * RATE) - 400) // 320 + 1
    assert reader.num_samples[reader.index_of("stereo44k")] == round(0.8 * RATE)
    assert reader.texts[reader.index_of("unicode ü 日本-語/x")] == "ok"
    assert verify_cache(str(out)).ok

    # A rerun has nothing left to do and records nothing twice (answered without loading the model).
    again = extract(ExtractConfig(model="tiny-random:wav2vec2", data=str(manifest), out=str(out),
                                  on_error="skip", progress=False))
    assert again.extracted == 0 and again.skipped == []
    assert len(CacheReader(str(out)).skipped()) == len(expected)


# --- malformed manifests, property-based -----------------------------------------------------------------

_TEXT = st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\ufeff")
_ID = st.text(_TEXT, min_size=1, max_size=10)


@st.composite
def _bad_line(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["text", "non_object", "no_audio", "audio_type", "duration", "bytes",
                                 "surrogate", "deep", "truncated"]))
    if kind == "text":
        line = draw(st.text(_TEXT, min_size=1, max_size=30).filter(lambda s: s.strip() != ""))
    elif kind == "non_object":
        line = json.dumps(draw(st.one_of(st.integers(), st.none(), st.booleans(), st.text(_TEXT, max_size=5),
                                         st.lists(st.integers(), max_size=3))))
    elif kind == "no_audio":
        line = json.dumps(draw(st.dictionaries(_ID.filter(lambda k: k not in ("audio", "path")), st.integers(),
                                               max_size=3)))
    elif kind == "audio_type":
        line = json.dumps({"id": "x", "audio": draw(st.one_of(st.integers(1), st.just(True), st.just(False),
                                                                  st.lists(st.text(max_size=3), min_size=1),
                                                                  st.just({"p": "a.wav"})))})
    elif kind == "duration":
        d = draw(st.sampled_from(["abc", "-1", "1,5", float("nan"), float("inf"), -0.5, [], {"s": 1}]))
        line = json.dumps({"id": "x", "audio": "a.wav", "duration": d})
    elif kind == "bytes":
        return b'{"id": "x", "audio": "\xff\xfe.wav"}'  # not UTF-8
    elif kind == "surrogate":
        line = '{"id": "\\ud800", "audio": "a.wav"}'  # valid JSON, not storable as UTF-8
    elif kind == "deep":
        line = "[" * 100_000
    else:
        line = json.dumps({"id": "x", "audio": "a.wav"})[: draw(st.integers(1, 20))]
    return line.encode("utf-8")


@st.composite
def _manifest_lines(draw: st.DrawFn) -> list[tuple[str, str | None, bytes]]:
    """[(kind, id, line)], kind: good | bad | blank | dup (a good line repeating an earlier good id)."""
    ids = draw(st.lists(_ID, unique=True, max_size=6))
    items: list[tuple[str, str | None, bytes]] = []
    for uid in ids:
        row = {"id": uid, "audio": draw(st.text(_TEXT, min_size=1, max_size=8)) + ".wav"}
        if draw(st.booleans()):
            row["duration"] = draw(st.one_of(st.floats(0, 100), st.integers(0, 9).map(str)))
        if draw(st.booleans()):
            row["speaker"] = draw(st.text(_TEXT, max_size=5))
        items.append(("good", uid, json.dumps(row, ensure_ascii=draw(st.booleans())).encode()))
    items += [("bad", None, b) for b in draw(st.lists(_bad_line(), max_size=5))]
    items += [("blank", None, b) for b in draw(st.lists(st.sampled_from([b"", b"  ", b"\t", b"\r"]), max_size=2))]
    if ids and draw(st.booleans()):
        uid = draw(st.sampled_from(ids))
        items.append(("dup", uid, json.dumps({"id": uid, "audio": "other.wav"}).encode()))
    return draw(st.permutations(items))


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=_manifest_lines())
def test_manifest_lines_property(lines: list[tuple[str, str | None, bytes]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.jsonl"
        path.write_bytes(b"\n".join(b for _, _, b in lines) + b"\n")
        dup_ids = {uid for kind, uid, _ in lines if kind == "dup"}
        want_ids = [uid for kind, uid, _ in lines if kind == "good" and uid not in dup_ids]
        bad_lines = [i + 1 for i, (kind, _, _) in enumerate(lines) if kind == "bad"]

        errors: list[dict[str, str]] = []
        if not want_ids and not bad_lines and not dup_ids:
            with pytest.raises(IntakeError, match="no utterances"):
                load_intake(path, errors=errors)
            return
        utts = load_intake(path, errors=errors)  # lenient: never raises for per-line problems
        assert [u.id for u in utts] == want_ids
        assert all(isinstance(v, str) and v for e in errors for v in e.values())
        assert [e["id"] for e in errors if e["id"].startswith(f"{path}:")] == \
            [f"{path}:{n}" for n in bad_lines]
        assert {e["id"] for e in errors if not e["id"].startswith(f"{path}:")} == dup_ids
        for u in utts:
            u.id.encode("utf-8")  # storable
            json.dumps(u.meta, ensure_ascii=False).encode("utf-8")

        if bad_lines or dup_ids:  # strict: one IntakeError naming the first bad line (or the duplicate)
            with pytest.raises(IntakeError) as ei:
                load_intake(path)
            if bad_lines:
                assert f"{path}:{bad_lines[0]}:" in str(ei.value)
            else:
                assert "duplicate utterance id" in str(ei.value)
        else:
            assert [u.id for u in load_intake(path)] == want_ids


def test_csv_and_bom_manifests(tmp_path: Path) -> None:
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps({"id": "a", "audio": "a.wav"}).encode() + b"\n")
    assert [u.id for u in load_intake(bom)] == ["a"]  # a BOM from a Windows editor is not an error
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("id,audio,duration\nok,a.wav,1.5\nextra,b.wav,1,surplus\nnoaudio,,\nbad,c.wav,x\n"
                        "0,d.wav,\n", encoding="utf-8")
    errors: list[dict[str, str]] = []
    utts = load_intake(csv_path, errors=errors)
    assert [u.id for u in utts] == ["ok", "0"]  # id "0" is an id, not a missing one
    assert [(e["id"], e["reason"].split(" (")[0]) for e in errors] == [
        (f"{csv_path}:3", "more fields than the header names"), (f"{csv_path}:4", "no 'audio'"),
        (f"{csv_path}:5", "'duration' must be a number of seconds, got 'x'")]
    with pytest.raises(IntakeError, match=r"m.csv:3: more fields"):
        load_intake(csv_path)
    latin = tmp_path / "latin.tsv"
    latin.write_bytes("id\taudio\nd\xe9j\xe0\ta.wav\n".encode("latin-1"))
    with pytest.raises(IntakeError, match="not UTF-8"):
        load_intake(latin, errors=[])


def test_hour_file_stops_raise_mode_with_the_fix(tmp_path: Path) -> None:
    """In raise mode extraction stops on the hour-long file, names it and says how to fix it."""
    from hff_cache.encoders.tiny import tiny_encoder

    wav = hour_long_wav(tmp_path / "session.wav")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "s", "audio": str(wav)}) + "\n")
    cfg = ExtractConfig(model="tiny-random:wav2vec2", data=str(manifest), out=str(tmp_path / "c.zarr"),
                        progress=False)
    with pytest.raises(AudioError) as ei:
        extract(cfg, encoder=tiny_encoder("wav2vec2"))
    assert "session.wav" in str(ei.value) and "3600 s long" in str(ei.value) and "--max-seconds" in str(ei.value)


# --- a run given a cache or a tokenizer that does not match it -------------------------------------------

TEXTS = ["AB", "BA", "ABBA", "BAB", "A B", "BB A"]
_TRAIN = ["--fusion", "weighted", "--width", "16", "--blocks", "1", "--batch-frames", "200", "--threads", "1",
          "--spec-time-masks", "0"]


def test_runs_refuse_another_encoder_layer_set_codec_or_tokenizer(tmp_path: Path) -> None:
    """Training, resuming and evaluating with a cache of another encoder checkpoint, layer set or codec, or
    a checkpoint of another vocabulary, is refused (exit 2) with a message naming what differs."""
    import shutil

    from typer.testing import CliRunner

    from hff_cache.cli import app
    from hff_cache.encoders.tiny import tiny_encoder
    from hff_cache.testing import tiny_cache

    base = tiny_cache(tmp_path / "base", [1.0, 1.2, 0.8, 1.5, 1.1, 0.9], TEXTS)
    manifest = tmp_path / "base" / "audio" / "manifest.jsonl"
    others: dict[str, tuple[Path, dict, int]] = {
        "encoder.file_hash": (tmp_path / "ckpt.zarr", {}, 1),  # same architecture, other weights
        "layers": (tmp_path / "layers.zarr", {"layers": [0, 2]}, 0),
        "codec.name": (tmp_path / "int8.zarr", {"codec": "int8"}, 0),
    }
    for out, kw, seed in others.values():
        extract(ExtractConfig(model="tiny-random:wav2vec2", data=str(manifest), out=str(out), progress=False,
                              batch_seconds=4.0, **kw), encoder=tiny_encoder("wav2vec2", seed=seed))
    cli = CliRunner()
    run = tmp_path / "run"
    labels = tmp_path / "labels.jsonl"

    def write_labels(path: Path, suffix: str) -> None:
        path.write_text("".join(json.dumps({"id": f"utt{i:03d}", "text": t + suffix}) + "\n"
                                for i, t in enumerate(TEXTS)))

    write_labels(labels, "")
    ok = cli.invoke(app, ["train", "--cache", str(base), "--valid-cache", str(base), "--out", str(run),
                          "--epochs", "1", "--labels", str(labels), *_TRAIN])
    assert ok.exit_code == 0, ok.output

    for field, (other, _, _) in others.items():
        for argv in (["evaluate", str(run), "--cache", str(other)],
                     ["train", "--cache", str(base), "--valid-cache", str(other), "--out", str(tmp_path / "v"),
                      "--epochs", "1", *_TRAIN],
                     ["train", "--cache", str(other), "--valid-cache", str(other), "--out", str(run), "--epochs",
                      "2", "--resume", "--labels", str(labels), *_TRAIN]):
            res = cli.invoke(app, argv)
            assert res.exit_code == 2, (field, argv[0], res.output)
            assert field in res.output and "does not match" in res.output, (field, argv, res.output)

    # The label file edited under the run (a new symbol), and a checkpoint of another vocabulary.
    write_labels(labels, " Z")
    res = cli.invoke(app, ["train", "--cache", str(base), "--valid-cache", str(base), "--out", str(run), "--epochs",
                           "2", "--resume", "--labels", str(labels), *_TRAIN])
    assert res.exit_code == 2 and "tokenizer" in res.output, res.output
    other_run = tmp_path / "run_z"
    assert cli.invoke(app, ["train", "--cache", str(base), "--out", str(other_run), "--epochs", "1",
                            "--labels", str(labels), *_TRAIN]).exit_code == 0
    shutil.copy(other_run / "checkpoints" / "best.safetensors", run / "checkpoints" / "best.safetensors")
    res = cli.invoke(app, ["evaluate", str(run), "--cache", str(base)])
    assert res.exit_code == 2 and "tokenizer" in res.output, res.output


class _NaNOnLength(torch.nn.Module):
    """Wraps an encoder and returns NaN for the batch items of one frame length (fp16 overflow on a GPU looks
    like this): an encoder failure on one item, not on the run."""

    def __init__(self, inner: Any, frames: int) -> None:
        super().__init__()
        self.inner, self.frames = inner, frames
        self.info, self.num_hidden_states, self.prepare = inner.info, inner.num_hidden_states, inner.prepare

    def forward(self, batch: Any, layers: Any = None) -> list[torch.Tensor]:
        states = self.inner(batch, layers)
        hit = batch.frame_lengths == self.frames
        return [torch.where(hit[:, None, None], torch.full_like(s, float("nan")), s) for s in states]


def test_encoder_nan_is_one_skipped_item(tmp_path: Path) -> None:
    from hff_cache.encoders.tiny import tiny_encoder
    from hff_cache.testing import write_corpus

    manifest = write_corpus(tmp_path / "a", [0.8, 1.7, 1.0, 1.2])
    enc = _NaNOnLength(tiny_encoder("wav2vec2"), frames=(round(1.7 * RATE) - 400) // 320 + 1)
    cfg = dict(model="tiny-random:wav2vec2", data=str(manifest), out=str(tmp_path / "c.zarr"), progress=False)
    with pytest.raises(ValueError, match="utt001.*NaN"):
        extract(ExtractConfig(**cfg), encoder=enc)
    report = extract(ExtractConfig(**cfg, on_error="skip"), encoder=enc)
    assert [s["id"] for s in report.skipped] == ["utt001"] and "--precision fp32" in report.skipped[0]["reason"]
    assert sorted(CacheReader(cfg["out"]).ids) == ["utt000", "utt002", "utt003"]
