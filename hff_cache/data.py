"""Intake: turn a manifest, a LibriSpeech folder, a folder of audio or a saved HF dataset
into `Utterance` records.

Everything downstream (extraction, online training, transcription) consumes the same
records, so there is one place that knows the input layouts.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hff_cache.audio import audio_duration

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".opus", ".aiff", ".aif", ".sph")
_KNOWN_FIELDS = {"id", "audio", "path", "text", "duration"}


class IntakeError(ValueError):
    """A problem with the data description itself (not one audio file): names the source."""


@dataclass
class Utterance:
    """One utterance: where its audio is and what we know about it."""

    id: str
    audio: str  # a path, or "<dataset>#row" for in-memory audio
    text: str = ""
    duration: float = 0.0  # seconds, from the file header; 0 when unknown
    meta: dict[str, Any] = field(default_factory=dict)  # speaker and any extra label columns
    samples: np.ndarray | None = field(default=None, repr=False)  # in-memory audio (HF datasets)
    sample_rate: int | None = None


def load_intake(spec: str | Path, *, check_duplicates: bool = True) -> list[Utterance]:
    """Read utterances from a manifest (.jsonl/.csv/.tsv), a LibriSpeech-layout folder, a folder
    of audio files, or a Hugging Face dataset folder written by `save_to_disk`."""
    path = Path(spec)
    if not path.exists():
        raise IntakeError(f"{spec}: no such file or folder (give a manifest, an audio folder or a dataset)")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            utts = _read_jsonl(path)
        elif suffix in (".csv", ".tsv"):
            utts = _read_table(path, "\t" if suffix == ".tsv" else ",")
        else:
            raise IntakeError(f"{path}: unknown manifest type {suffix!r} (use .jsonl, .csv or .tsv)")
    elif (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        utts = _read_hf_dataset(path)
    elif any(path.rglob("*.trans.txt")):
        utts = _read_librispeech(path)
    else:
        utts = _read_audio_dir(path)
    if not utts:
        raise IntakeError(f"{spec}: no utterances found")
    if check_duplicates:
        _check_unique(utts, str(spec))
    return utts


def intake_fingerprint(utts: Sequence[Utterance]) -> str:
    """A stable hash of what was asked for (ids, sources, durations), recorded in the cache."""
    h = hashlib.sha256()
    for u in sorted(utts, key=lambda u: u.id):
        h.update(f"{u.id}\t{u.audio}\t{u.duration:.3f}\n".encode())
    return h.hexdigest()[:16]


def _check_unique(utts: Iterable[Utterance], source: str) -> None:
    seen: dict[str, str] = {}
    for u in utts:
        if u.id in seen:
            raise IntakeError(f"{source}: duplicate utterance id {u.id!r} ({seen[u.id]} and {u.audio}); "
                              "ids must be unique")
        seen[u.id] = u.audio


def _make(row: dict[str, Any], base: Path, where: str) -> Utterance:
    audio = row.get("audio", row.get("path"))
    if not audio:
        raise IntakeError(f"{where}: no 'audio' (or 'path') field")
    audio_path = Path(str(audio))
    if not audio_path.is_absolute():
        audio_path = base / audio_path
    utt_id = str(row.get("id") or audio_path.stem)
    duration = float(row["duration"]) if row.get("duration") not in (None, "") else audio_duration(audio_path)
    meta = {k: v for k, v in row.items() if k not in _KNOWN_FIELDS and v not in (None, "")}
    return Utterance(utt_id, str(audio_path), str(row.get("text") or ""), duration, meta)


def _read_jsonl(path: Path) -> list[Utterance]:
    utts = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise IntakeError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise IntakeError(f"{where}: each line must be a JSON object")
            utts.append(_make(row, path.parent, where))
    return utts


def _read_table(path: Path, delimiter: str) -> list[Utterance]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        if not reader.fieldnames or not ({"audio", "path"} & set(reader.fieldnames)):
            raise IntakeError(f"{path}: the header must name an 'audio' (or 'path') column")
        return [_make(row, path.parent, f"{path}:{i + 2}") for i, row in enumerate(reader)]


def _read_librispeech(root: Path) -> list[Utterance]:
    utts = []
    for trans in sorted(root.rglob("*.trans.txt")):
        for line in trans.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            utt_id, _, text = line.partition(" ")
            audio = next((trans.parent / f"{utt_id}{ext}" for ext in (".flac", ".wav")
                          if (trans.parent / f"{utt_id}{ext}").exists()), trans.parent / f"{utt_id}.flac")
            speaker, chapter = (utt_id.split("-") + ["", ""])[:2]
            utts.append(Utterance(utt_id, str(audio), text.strip(), audio_duration(audio),
                                  {"speaker": speaker, "chapter": chapter}))
    return utts


def _read_audio_dir(root: Path) -> list[Utterance]:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())
    utts = []
    for p in files:
        # Ids from the relative path keep files with the same name in different folders apart.
        rel = p.relative_to(root).with_suffix("")
        utts.append(Utterance(str(rel).replace("/", "__"), str(p), "", audio_duration(p)))
    return utts


def _read_hf_dataset(path: Path) -> list[Utterance]:
    try:
        import datasets
    except ImportError:
        raise IntakeError(f"{path}: a Hugging Face dataset needs the 'datasets' package "
                          "(pip install 'hff-cache[datasets]')") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        raise IntakeError(f"{path}: a DatasetDict; point --data at one split's folder, "
                          f"one of {sorted(ds.keys())}")
    audio_cols = [k for k, f in ds.features.items() if isinstance(f, datasets.Audio)]
    if not audio_cols:
        raise IntakeError(f"{path}: no Audio column in {list(ds.features)}")
    col = audio_cols[0]
    # Decode to arrays ourselves: avoids datasets' optional decoders (torchcodec).
    ds = ds.cast_column(col, datasets.Audio(decode=False))
    text_col = next((c for c in ("text", "sentence", "transcript", "transcription") if c in ds.features), None)
    utts = []
    for i, row in enumerate(ds):
        a = row[col]
        audio_ref = a.get("path") or f"{path}#{i}"
        utt_id = str(row.get("id") or Path(a.get("path") or f"row{i:06d}").stem)
        meta = {k: v for k, v in row.items() if k not in (col, text_col, "id") and _is_scalar(v)}
        utt = Utterance(utt_id, audio_ref, str(row.get(text_col) or "") if text_col else "", 0.0, meta)
        if a.get("bytes"):
            import io

            import soundfile as sf

            wave, rate = sf.read(io.BytesIO(a["bytes"]), dtype="float32")
            utt.samples, utt.sample_rate, utt.duration = wave, int(rate), len(wave) / rate
        elif a.get("path"):
            utt.duration = audio_duration(a["path"])
        utts.append(utt)
    return utts


def _is_scalar(v: Any) -> bool:
    return isinstance(v, (str, int, float, bool))
