"""Splits cut with `hff-cache manifest`: speaker-disjoint hold-outs balanced over label fields, several sources,
evenly spaced subsets, tags; and the recipe's intake of the speechocean762 layout (Opus, relative paths, extra
label columns)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from hff_cache.intake.manifests import IntakeError, load_intake
from hff_cache.intake.selection import held_out_speakers, select_utterances

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "speechocean762-train"


def _manifest(folder: Path, speakers: int = 12, per_speaker: int = 3, prefix: str = "") -> Path:
    """speakers x per_speaker one-second WAVs; gender and age group alternate so that four strata exist."""
    folder.mkdir(parents=True)
    rows = []
    for s in range(speakers):
        for k in range(per_speaker):
            uid = f"{prefix}s{s:02d}u{k}"
            sf.write(folder / f"{uid}.wav", np.zeros(1600, dtype=np.float32), 16000)
            rows.append({"id": uid, "audio": f"{uid}.wav", "text": "A B", "speaker": f"{prefix}{s:02d}",
                         "gender": "mf"[s % 2], "age_group": ["child", "adult"][(s // 2) % 2]})
    path = folder / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_held_out_speakers_are_balanced_disjoint_and_seeded(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path / "a")
    utts = load_intake(manifest)
    held = held_out_speakers(utts, 6, balance=["gender", "age_group"], seed=0)
    strata = Counter((u.meta["gender"], u.meta["age_group"]) for u in utts if u.meta["speaker"] in held
                     and u.id.endswith("u0"))
    assert sorted(strata.values()) == [1, 1, 2, 2]  # 6 over 4 strata, round-robin
    assert held == held_out_speakers(utts, 6, balance=["gender", "age_group"], seed=0)
    assert held != held_out_speakers(utts, 6, balance=["gender", "age_group"], seed=1)
    rest = select_utterances(manifest, holdout_speakers=6, balance=["gender", "age_group"], take="rest")
    hold = select_utterances(manifest, holdout_speakers=6, balance=["gender", "age_group"], take="holdout")
    assert {r["speaker"] for r in hold} == set(held)
    assert not {r["speaker"] for r in hold} & {r["speaker"] for r in rest}  # speaker-disjoint
    assert len(rest) + len(hold) == 36 and rest[0]["gender"] in "mf"  # extra label columns kept
    with pytest.raises(IntakeError, match="cannot hold out 13 speakers"):
        held_out_speakers(utts, 13)


def test_several_sources_subsets_and_duplicate_ids(tmp_path: Path) -> None:
    a, b = _manifest(tmp_path / "a", 2, 3, "a"), _manifest(tmp_path / "b", 2, 3, "b")
    both = select_utterances([a, b])
    assert len(both) == 12 and {r["speaker"][0] for r in both} == {"a", "b"}
    spread = select_utterances([a, b], max_utts=4)
    assert [r["id"] for r in spread] == ["as00u0", "as01u0", "bs00u0", "bs01u0"]  # evenly spaced in id order
    with pytest.raises(IntakeError, match="more than one of"):
        select_utterances([a, a])
    with pytest.raises(ValueError, match="not both"):
        select_utterances(a, holdout=2, holdout_speakers=1, take="rest")


def test_manifest_command_tags_and_merges(tmp_path: Path) -> None:
    a = _manifest(tmp_path / "a", 2, 2, "a")
    out = tmp_path / "tagged.jsonl"
    cmd = [sys.executable, "-m", "hff_cache", "manifest", str(a), "--tag", "corpus=demo", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["corpus"] for r in rows} == {"demo"} and Path(rows[0]["audio"]).is_absolute()
    bad = subprocess.run(cmd[:-4] + ["--tag", "corpus", "--out", str(out)], capture_output=True, text=True)
    assert bad.returncode != 0 and "--tag takes KEY=VALUE" in bad.stderr


@pytest.mark.skipif(not SHARED.exists(), reason="the shared speechocean762 data is beside the checkout")
def test_speechocean762_layout_reads(tmp_path: Path) -> None:
    """The recipe's corpus: Opus audio at paths relative to the manifest, extra label columns in the metadata."""
    rows = [json.loads(line) for line in (SHARED / "train.jsonl").read_text().splitlines()[:3]]
    manifest = tmp_path / "few.jsonl"
    manifest.write_text("".join(json.dumps({**r, "audio": str(SHARED / r["audio"])}) + "\n" for r in rows))
    utts = load_intake(manifest)
    assert [u.meta["age_group"] for u in utts] == [r["age_group"] for r in rows]
    assert {"speaker", "gender", "age"} <= set(utts[0].meta)
    wave = utts[0].load_wave(16000)
    assert wave.dtype == np.float32 and abs(len(wave) / 16000 - rows[0]["duration"]) < 0.1
    # the corpus's own manifest, relative paths and all
    first = load_intake(SHARED / "train.jsonl")[0]
    assert Path(first.audio).is_file() and first.audio.endswith(".opus")


def test_labels_phones_merges_textgrids_and_jsonl_into_one_phone_set(tmp_path: Path) -> None:
    grid = tmp_path / "ali" / "u1.TextGrid"
    grid.parent.mkdir()
    grid.write_text('File type = "ooTextFile"\nObject class = "TextGrid"\nitem [1]:\n    name = "phones"\n'
                    '        intervals [1]:\n            xmin = 0\n            xmax = 1\n            text = "AH0"\n'
                    '        intervals [2]:\n            xmin = 1\n            xmax = 2\n            text = "sil"\n')
    extra = tmp_path / "phones.jsonl"
    extra.write_text(json.dumps({"id": "u2", "phones": "W IY1 sil K"}) + "\n")
    out = tmp_path / "phones_out.jsonl"
    cmd = [sys.executable, "-m", "hff_cache", "labels", "phones", "--alignments", str(grid.parent), "--jsonl",
           str(extra), "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True)
    assert [json.loads(line) for line in out.read_text().splitlines()] == [
        {"id": "u1", "phones": "AH"}, {"id": "u2", "phones": "W IY K"}]
    extra.write_text(json.dumps({"id": "u1", "phones": "B"}) + "\n")  # the same id from two sources
    bad = subprocess.run(cmd, capture_output=True, text=True)
    assert bad.returncode != 0 and "more than one source" in bad.stderr
