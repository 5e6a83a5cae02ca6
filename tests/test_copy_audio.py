"""`copy_audio` and `hff-cache manifest --copy-audio`: compact Opus copies to carry a corpus, FLAC/WAV decoded
back on arrival; resumable, atomic, and the manifest moves with its audio folder."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from hff_cache.cli import app
from hff_cache.intake.audio import AudioError
from hff_cache.intake.copy_audio import copy_audio, opus_compression_level
from hff_cache.intake.manifests import load_intake
from hff_cache.intake.selection import select_utterances
from hff_cache.tasks.task import write_jsonl
from hff_cache.testing import write_corpus

TEXTS = ["one two", "three four five", "six", "seven eight"]


def _rows(tmp_path: Path, durations: list[float] | None = None, rate: int = 16000) -> list[dict]:
    durations = durations or [1.0, 1.5, 0.7, 1.2]
    manifest = write_corpus(tmp_path / "src", durations, TEXTS[: len(durations)], rate=rate)
    return select_utterances(str(manifest))


def _snr_db(ref: np.ndarray, test: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((ref - test).astype(np.float64) ** 2)))


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_flac_copy_is_lossless_keeps_fields_and_moves_with_its_manifest(tmp_path: Path) -> None:
    rows = [{**r, "gender": "f" if i % 2 else "m"} for i, r in enumerate(_rows(tmp_path))]
    out = copy_audio(rows, tmp_path / "a" / "audio", relative_to=tmp_path / "a")
    assert [r["audio"] for r in out] == [f"audio/{r['id']}.flac" for r in rows]  # relative: inside the folder
    for src, copy in zip(rows, out, strict=True):
        assert {k: v for k, v in copy.items() if k not in ("audio", "duration")} == \
            {k: v for k, v in src.items() if k not in ("audio", "duration")}
        assert copy["duration"] == pytest.approx(src["duration"], abs=1e-4)
        info = sf.info(str(tmp_path / "a" / copy["audio"]))
        assert (info.format, info.subtype, info.samplerate) == ("FLAC", "PCM_16", 16000)
        original, _ = sf.read(src["audio"], dtype="int16")
        copied, _ = sf.read(tmp_path / "a" / copy["audio"], dtype="int16")
        np.testing.assert_array_equal(copied, original)
    write_jsonl(out, tmp_path / "a" / "m.jsonl")
    shutil.move(tmp_path / "a", tmp_path / "moved")
    utts = load_intake(tmp_path / "moved" / "m.jsonl")
    assert [u.id for u in utts] == [r["id"] for r in rows]
    for u, src in zip(utts, rows, strict=True):
        assert Path(u.audio).is_relative_to(tmp_path / "moved")
        original, _ = sf.read(src["audio"], dtype="float32")
        np.testing.assert_allclose(u.load_wave(16000), original, atol=1 / 32768)
        assert u.meta["gender"] == src["gender"] and u.text == src["text"]


def test_outside_the_manifest_folder_the_path_is_absolute(tmp_path: Path) -> None:
    out = copy_audio(_rows(tmp_path)[:1], tmp_path / "elsewhere", relative_to=tmp_path / "m")
    assert out[0]["audio"] == str((tmp_path / "elsewhere" / "utt000.flac").resolve())


def test_opus_copy_is_compact_same_length_and_close(tmp_path: Path) -> None:
    rows = _rows(tmp_path, [2.0, 6.0])
    out16 = copy_audio(rows, tmp_path / "o16", audio_format="opus", bitrate_kbps=16)
    out32 = copy_audio(rows, tmp_path / "o32", audio_format="opus", bitrate_kbps=32)
    seconds = sum(r["duration"] for r in rows)
    size16 = sum(Path(r["audio"]).stat().st_size for r in out16)
    size32 = sum(Path(r["audio"]).stat().st_size for r in out32)
    # measured 18.1 kbit/s for 16 (the Ogg headers add ~0.5 kB a file); 16 kHz int16 WAV is 256 kbit/s
    assert 0.6 * 16 < size16 * 8 / 1000 / seconds < 1.6 * 16
    assert size32 > 1.5 * size16  # the bitrate reaches the encoder
    for src, copy in zip(rows, out16, strict=True):
        info = sf.info(copy["audio"])
        assert (info.format, info.subtype, info.samplerate) == ("OGG", "OPUS", 16000)
        assert Path(copy["audio"]).suffix == ".opus"
        assert abs(copy["duration"] - src["duration"]) <= 1e-3  # libsndfile trims the pre-skip: measured exact
        original, _ = sf.read(src["audio"], dtype="float32")
        decoded, _ = sf.read(copy["audio"], dtype="float32")
        assert decoded.shape == original.shape
        assert _snr_db(original, decoded) > 10  # measured 14.7-16.1 dB at 16 kbit/s on this speech-like audio


def test_opus_rates_flac_keeps_any_rate(tmp_path: Path) -> None:
    rows22 = _rows(tmp_path / "r22", [1.0], rate=22050)
    opus = copy_audio(rows22, tmp_path / "o", audio_format="opus")[0]
    assert sf.info(opus["audio"]).samplerate == 16000  # libsndfile's Opus takes no 22.05 kHz: resampled
    assert opus["duration"] == pytest.approx(1.0, abs=2 / 16000)
    flac = copy_audio(rows22, tmp_path / "f")[0]
    assert sf.info(flac["audio"]).samplerate == 22050
    rows48 = _rows(tmp_path / "r48", [0.5], rate=48000)
    assert sf.info(copy_audio(rows48, tmp_path / "o48", audio_format="opus")[0]["audio"]).samplerate == 48000


def test_compression_level_inverts_libsndfile_formula() -> None:
    # libsndfile: bitrate = (1 - level) * 250000 + 6000 bit/s
    for kbps in (6, 16, 64, 256):
        assert (1 - opus_compression_level(kbps)) * 250 + 6 == pytest.approx(kbps)
    assert opus_compression_level(2) == 1.0 and opus_compression_level(1000) == 0.0
    with pytest.raises(ValueError, match="positive"):
        opus_compression_level(0)


def test_rerun_skips_finished_copies_and_completes_a_partial_folder(tmp_path: Path) -> None:
    rows = _rows(tmp_path)
    dest = tmp_path / "copies"
    first = copy_audio(rows, dest, audio_format="opus")
    stamps = {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}
    (dest / "utt001.opus").unlink()  # never written
    (dest / "utt002.opus").write_bytes(b"not audio")  # not a readable copy: redone
    (dest / ".utt001.opus.partial").write_bytes(b"OggS half a file")  # a killed run's leftover
    again = copy_audio(rows, dest, audio_format="opus")
    assert again == first
    assert _files(dest) == [f"{r['id']}.opus" for r in rows]  # the leftover was overwritten and renamed
    for name in ("utt000.opus", "utt003.opus"):
        assert (dest / name).stat().st_mtime_ns == stamps[name]
    assert sf.info(str(dest / "utt002.opus")).subtype == "OPUS"
    # a finished copy in another format is not taken for the one asked
    flac = copy_audio(rows, dest, audio_format="flac")
    assert all(sf.info(str(dest / Path(r["audio"]).name)).format == "FLAC" for r in flac)


def test_unreadable_source_names_the_id_and_file(tmp_path: Path) -> None:
    rows = _rows(tmp_path)
    Path(rows[2]["audio"]).write_bytes(b"RIFF garbage, not a wave")
    with pytest.raises(AudioError, match=r"utt002 \(.*utt002\.wav\).*unreadable") as err:
        copy_audio(rows, tmp_path / "copies")
    assert "rerun" in str(err.value)
    assert _files(tmp_path / "copies") == ["utt000.flac", "utt001.flac"]
    Path(rows[3]["audio"]).unlink()
    with pytest.raises(AudioError, match=r"utt003 .*not found"):
        copy_audio(rows[3:], tmp_path / "copies")


def test_full_disk_names_the_id_keeps_earlier_copies_and_a_rerun_completes(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    rows = _rows(tmp_path)
    dest = tmp_path / "copies"
    real_write = sf.write
    calls = []

    def filling_disk(file, *args, **kwargs) -> None:
        calls.append(file)
        if len(calls) > 2:  # the third file fills the disk half way through
            Path(file).write_bytes(b"fLaC half")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(file, *args, **kwargs)

    monkeypatch.setattr(sf, "write", filling_disk)
    with pytest.raises(OSError, match=r"utt002: could not write .*utt002\.flac.*No space left.*kept.*rerun") as err:
        copy_audio(rows, dest)
    assert err.value.errno == errno.ENOSPC
    assert _files(dest) == ["utt000.flac", "utt001.flac"]  # no temporary file left behind
    stamps = {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}
    monkeypatch.setattr(sf, "write", real_write)
    out = copy_audio(rows, dest)
    assert _files(dest) == [f"{r['id']}.flac" for r in rows]
    assert all((dest / n).stat().st_mtime_ns == t for n, t in stamps.items())
    assert [r["id"] for r in out] == [r["id"] for r in rows]


def test_ids_become_safe_file_names_and_clashes_are_refused(tmp_path: Path) -> None:
    src = _rows(tmp_path)[:2]
    ok = copy_audio([{**src[0], "id": "spk1/ch2/u 3"}, {**src[1], "id": "..x"}], tmp_path / "safe")
    assert [Path(r["audio"]).name for r in ok] == ["spk1_ch2_u_3.flac", "_.x.flac"]
    assert [r["id"] for r in ok] == ["spk1/ch2/u 3", "..x"]  # the id itself is kept
    for a, b in (("spk1/a", "spk1_a"), ("Utt", "utt")):
        with pytest.raises(ValueError, match=rf"ids '{a}' and '{b}' would both be copied"):
            copy_audio([{**src[0], "id": a}, {**src[1], "id": b}], tmp_path / "clash")
    assert not (tmp_path / "clash").exists()  # refused before anything is written


def test_threads_keep_the_input_order(tmp_path: Path) -> None:
    rows = _rows(tmp_path, [2.0, 0.3, 1.0, 0.5])[::-1]
    out = copy_audio(rows, tmp_path / "copies", audio_format="opus", jobs=3)
    assert [r["id"] for r in out] == [r["id"] for r in rows]
    assert [Path(r["audio"]).stem for r in out] == [r["id"] for r in rows]


def test_options_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    rows = _rows(tmp_path)[:1]
    with pytest.raises(ValueError, match="opus only"):
        copy_audio(rows, tmp_path / "c", audio_format="flac", bitrate_kbps=16)
    with pytest.raises(ValueError, match="flac, wav, opus"):
        copy_audio(rows, tmp_path / "c", audio_format="mp3")
    with pytest.raises(ValueError, match="jobs"):
        copy_audio(rows, tmp_path / "c", jobs=0)
    cli = CliRunner()
    manifest = str(tmp_path / "src" / "manifest.jsonl")
    res = cli.invoke(app, ["manifest", manifest, "--bitrate", "16", "--out", str(tmp_path / "m.jsonl")])
    assert res.exit_code == 2 and "--copy-audio" in res.output, res.output
    res = cli.invoke(app, ["manifest", manifest, "--copy-audio", str(tmp_path / "c"), "--bitrate", "16",
                           "--out", str(tmp_path / "m.jsonl")])
    assert res.exit_code == 2 and "opus only" in res.output, res.output
    assert not (tmp_path / "m.jsonl").exists()


def test_cli_opus_there_and_wav_back(tmp_path: Path) -> None:
    rows = _rows(tmp_path)
    cli = CliRunner()
    there, back = tmp_path / "upload", tmp_path / "decoded"
    res = cli.invoke(app, ["manifest", str(tmp_path / "src" / "manifest.jsonl"), "--copy-audio", str(there),
                           "--audio-format", "opus", "--bitrate", "16", "--out", str(there / "m.jsonl")])
    assert res.exit_code == 0, res.output
    assert f"{there}: 4 audio files" in res.output and "kbit/s average" in res.output, res.output
    opus_rows = [json.loads(line) for line in (there / "m.jsonl").read_text().splitlines()]
    assert [r["audio"] for r in opus_rows] == [f"{r['id']}.opus" for r in rows]
    res = cli.invoke(app, ["manifest", str(there / "m.jsonl"), "--copy-audio", str(back), "--audio-format", "wav",
                           "--jobs", "2", "--out", str(back / "m.jsonl")])
    assert res.exit_code == 0, res.output
    wav_rows = [json.loads(line) for line in (back / "m.jsonl").read_text().splitlines()]
    assert [(r["id"], r["text"], r["speaker"]) for r in wav_rows] == [(r["id"], r["text"], r["speaker"])
                                                                       for r in rows]
    for o, w in zip(opus_rows, wav_rows, strict=True):
        info = sf.info(str(back / w["audio"]))
        assert (info.format, info.subtype, info.samplerate) == ("WAV", "PCM_16", 16000)
        assert w["duration"] == pytest.approx(o["duration"], abs=1e-4)
        decoded, _ = sf.read(there / o["audio"], dtype="float32")
        wav, _ = sf.read(back / w["audio"], dtype="float32")
        np.testing.assert_allclose(wav, decoded, atol=1 / 32768)  # PCM_16 rounding of the Opus decode only
