"""Intake: every input layout gives the same Utterance records; bad input names the item."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from hff_cache.intake.audio import AudioError, load_audio
from hff_cache.intake.manifests import IntakeError, intake_fingerprint, load_intake
from hff_cache.testing import synthetic_waves, write_corpus

LIBRI = Path(__file__).resolve().parents[2] / "shared" / "data" / "librispeech-subset"


def test_jsonl_csv_tsv_agree(tmp_path: Path) -> None:
    manifest = write_corpus(tmp_path, [0.5, 0.8], texts=["HELLO", "WORLD"])
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    for sep, suffix in ((",", ".csv"), ("\t", ".tsv")):
        lines = [sep.join(["id", "audio", "text", "speaker"])]
        lines += [sep.join([r["id"], r["audio"], r["text"], r["speaker"]]) for r in rows]
        (tmp_path / f"m{suffix}").write_text("\n".join(lines) + "\n")
    a, b, c = (load_intake(tmp_path / n) for n in ("manifest.jsonl", "m.csv", "m.tsv"))
    assert [u.id for u in a] == [u.id for u in b] == [u.id for u in c] == ["utt000", "utt001"]
    assert a[0].audio == b[0].audio == str(tmp_path / "utt000.wav")
    assert a[1].text == c[1].text == "WORLD"
    assert a[0].meta == {"speaker": "spk0"} == b[0].meta
    assert abs(a[1].duration - 0.8) < 1e-3
    assert intake_fingerprint(a) == intake_fingerprint(b)


def test_audio_folder(tmp_path: Path) -> None:
    write_corpus(tmp_path / "x", [0.3])
    write_corpus(tmp_path / "y", [0.3])  # same file names in another folder: ids stay distinct
    utts = load_intake(tmp_path)
    assert sorted(u.id for u in utts) == ["x__utt000", "y__utt000"]


@pytest.mark.skipif(not LIBRI.exists(), reason="shared LibriSpeech subset not present")
def test_librispeech_layout() -> None:
    utts = load_intake(LIBRI)
    assert len(utts) == 378
    u = next(u for u in utts if u.id.startswith("5652-"))
    assert u.meta["speaker"] == "5652" and u.text.isupper() and u.duration > 1 and Path(u.audio).exists()


def test_hf_dataset_saved_to_disk(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    manifest = write_corpus(tmp_path / "a", [0.4, 0.6], texts=["ONE", "TWO"])
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    ds = datasets.Dataset.from_dict({
        "audio": [str(tmp_path / "a" / r["audio"]) for r in rows],
        "text": [r["text"] for r in rows],
        "speaker": [r["speaker"] for r in rows],
    }).cast_column("audio", datasets.Audio(decode=False))
    ds.save_to_disk(str(tmp_path / "ds"))
    utts = load_intake(tmp_path / "ds")
    assert [u.text for u in utts] == ["ONE", "TWO"]
    assert utts[1].meta["speaker"] == "spk1"
    assert abs(utts[0].duration - 0.4) < 1e-3


def test_duplicate_ids_and_bad_lines(tmp_path: Path) -> None:
    write_corpus(tmp_path, [0.3])
    (tmp_path / "dup.jsonl").write_text('{"id": "a", "audio": "utt000.wav"}\n{"id": "a", "audio": "utt000.wav"}\n')
    with pytest.raises(IntakeError, match="duplicate utterance id 'a'"):
        load_intake(tmp_path / "dup.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"id": "a", "audio": "utt000.wav"}\n{not json\n')
    with pytest.raises(IntakeError, match=r"bad.jsonl:2: not valid JSON"):
        load_intake(tmp_path / "bad.jsonl")
    with pytest.raises(IntakeError, match="no such file"):
        load_intake(tmp_path / "missing.jsonl")


def test_audio_resample_downmix_and_errors(tmp_path: Path) -> None:
    w = synthetic_waves([1.0], rate=8000)[0]
    sf.write(tmp_path / "stereo8k.wav", np.stack([w, w], axis=1), 8000)
    out = load_audio(tmp_path / "stereo8k.wav", 16000)
    assert out.ndim == 1 and out.dtype == np.float32 and abs(len(out) - 16000) <= 1
    (tmp_path / "fake.wav").write_bytes(b"not audio at all")
    with pytest.raises(AudioError, match="fake.wav: unreadable audio"):
        load_audio(tmp_path / "fake.wav", 16000)
    with pytest.raises(AudioError, match="file not found"):
        load_audio(tmp_path / "nope.wav", 16000)
    sf.write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(AudioError, match="no samples"):
        load_audio(tmp_path / "empty.wav", 16000)
    with pytest.raises(AudioError, match="NaN"):
        load_audio(np.array([0.0, np.nan] * 1000, dtype=np.float32), 16000, source_rate=16000, name="x")
    with pytest.raises(AudioError, match="over the 1 s limit"):
        load_audio(np.zeros(32000, dtype=np.float32), 16000, source_rate=16000, max_seconds=1, name="long")
