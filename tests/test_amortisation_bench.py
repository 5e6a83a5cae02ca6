"""benchmarks/amortisation.py's real-speech subset: every speaker on both sides of the speaker split, the
class checks, and the page it renders (no CLI calls)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("amortisation", ROOT / "benchmarks" / "amortisation.py")
am = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
sys.modules["amortisation"] = am  # its dataclasses look their module up while the file runs
spec.loader.exec_module(am)  # type: ignore[union-attr]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _speech(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A training manifest of 6 speakers x 10 utterances (every 5th held out for speaker id) plus LibriSpeech."""
    rows, held = [], []
    for s in range(6):
        for i in range(10):
            r = {"id": f"{s:04d}{i:04d}", "audio": "x.wav", "text": "A", "duration": 1.0, "speaker": f"{s:04d}",
                 "gender": "mf"[s % 2], "age_group": ("child", "adult")[s // 3 % 2], "corpus": "speechocean762"}
            rows.append(r)
            (held if i % 5 == 4 else []).append(r)
    libri = [{"id": f"4088-1-{i:04d}", "audio": "x.flac", "text": "A", "duration": 1.0, "corpus": "librispeech"}
             for i in range(10)]
    so_rest = [r for r in rows if r not in held]
    return (_write(tmp_path / "train.jsonl", rows + libri), _write(tmp_path / "spk_train.jsonl", so_rest),
            _write(tmp_path / "spk_valid.jsonl", held))


@pytest.mark.parametrize("n", [4, 9, 30])
def test_every_speaker_on_both_sides(tmp_path: Path, n: int) -> None:
    train, spk_train, spk_valid = _speech(tmp_path)
    keep = set(am.real_train_ids(train, spk_train, spk_valid, n))
    assert 2 <= len(keep) <= n
    side = {name: {r["speaker"] for r in map(json.loads, f.open()) if r["id"] in keep}
            for name, f in (("train", spk_train), ("valid", spk_valid))}
    assert side["train"] == side["valid"] and side["train"]


def test_check_classes_names_the_task() -> None:
    train = [{"gender": "m"}, {"gender": "f"}]
    am.check_classes("gender", "gender", train, [{"gender": "f"}, {}])
    with pytest.raises(SystemExit, match="too small for gender"):
        am.check_classes("gender", "gender", train[:1], [{"gender": "m"}])
    with pytest.raises(SystemExit, match="too small for speaker"):
        am.check_classes("speaker", "speaker", [{"speaker": "1"}, {"speaker": "2"}], [{"speaker": "3"}])


def test_render_real_speech_page() -> None:
    a = am.parse_args(["--setup", "real-speech", "--threads", "1"])
    assert a.model == "faster-whisper:tiny.en" and a.doc.endswith("amortisation_real.md")
    tasks = ["asr", "phones", "speaker", "gender", "age_group"]
    times = {"extract": 10.0, "cached": dict.fromkeys(tasks, 5.0), "online": dict.fromkeys(tasks, 20.0)}
    scores = {m: dict.fromkeys(tasks, "acc 50.0") for m in ("cached", "online")}
    md = am.render(times, scores, a, "python benchmarks/amortisation.py --setup real-speech", "machine: quiet", "x")
    assert "| age_group | 5 | 20 |" in md and "**total, 5 tasks** | **35** | **100**" in md
    assert "2.86x" in md and "--threads 1 per call" in md and "../img/amortisation_real.png" in md
    assert isinstance(am.parse_args([]), argparse.Namespace) and am.parse_args([]).model == "faster-whisper:base"
