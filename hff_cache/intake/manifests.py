"""Intake: turn a manifest, a LibriSpeech folder, a folder of audio or a saved HF dataset
into `Utterance` records.

Everything downstream (extraction, online training, transcription) consumes the same
records, so there is one place that knows the input layouts.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hff_cache.intake.audio import DEFAULT_MAX_SECONDS, audio_duration, load_audio

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

    def load_wave(self, rate: int, max_seconds: float = DEFAULT_MAX_SECONDS) -> np.ndarray:
        """The audio as mono float32 at ``rate``; an ``AudioError`` names this utterance and its file."""
        if self.samples is not None:
            return load_audio(self.samples, rate, source_rate=self.sample_rate, max_seconds=max_seconds, name=self.id)
        return load_audio(self.audio, rate, max_seconds=max_seconds, name=f"{self.id} ({self.audio})")


def load_intake(spec: str | Path, *, check_duplicates: bool = True,
                errors: list[dict[str, str]] | None = None) -> list[Utterance]:
    """Read utterances from a manifest (.jsonl/.csv/.tsv), a LibriSpeech-layout folder, a folder
    of audio files, or a Hugging Face dataset folder written by `save_to_disk`.

    A bad manifest line or a duplicated id raises `IntakeError`, unless `errors` is a list: then each is
    appended to it as {"id", "audio", "reason"} and left out (`--on-error skip`). A bad line's "id" is its
    location ``manifest.jsonl:7``; a duplicated id drops every copy, since which one is meant is unknown.
    """
    path = Path(spec)
    if not path.exists():
        raise IntakeError(f"{spec}: no such file or folder (give a manifest, an audio folder or a dataset)")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            utts = _read_jsonl(path, errors)
        elif suffix in (".csv", ".tsv"):
            utts = _read_table(path, "\t" if suffix == ".tsv" else ",", errors)
        else:
            raise IntakeError(f"{path}: unknown manifest type {suffix!r} (use .jsonl, .csv or .tsv)")
    elif (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        utts = _read_hf_dataset(path)
    elif any(path.rglob("*.trans.txt")):
        utts = _read_librispeech(path)
    else:
        utts = _read_audio_dir(path)
    if check_duplicates:
        utts = _check_unique(utts, str(spec), errors)
    if not utts and not errors:
        raise IntakeError(f"{spec}: no utterances found")
    return utts


def intake_fingerprint(utts: Sequence[Utterance]) -> str:
    """A stable hash of what was asked for (ids, sources, durations), recorded in the cache."""
    h = hashlib.sha256()
    for u in sorted(utts, key=lambda u: u.id):
        h.update(f"{u.id}\t{u.audio}\t{u.duration:.3f}\n".encode())
    return h.hexdigest()[:16]


def _check_unique(utts: Sequence[Utterance], source: str, errors: list[dict[str, str]] | None = None
                  ) -> list[Utterance]:
    seen: dict[str, list[str]] = {}
    for u in utts:
        if u.id in seen and errors is None:
            raise IntakeError(f"{source}: duplicate utterance id {u.id!r} ({seen[u.id][0]} and {u.audio}); "
                              "ids must be unique")
        seen.setdefault(u.id, []).append(u.audio)
    dups = {k: v for k, v in seen.items() if len(v) > 1}
    if errors is None or not dups:  # without a list, the first duplicate raised above
        return list(utts)
    for k, audios in dups.items():
        errors.append({"id": k, "audio": ", ".join(audios),
                       "reason": f"duplicate utterance id in {source} ({len(audios)} entries: {', '.join(audios)}); "
                                 "ids must be unique, so none of them was taken"})
    return [u for u in utts if u.id not in dups]


def _line_error(errors: list[dict[str, str]] | None, exc: IntakeError, where: str, row: object) -> None:
    """Raise, or record a bad manifest line (its location is its id: it may have no usable id)."""
    if errors is None:
        raise exc
    audio = row.get("audio", row.get("path")) if isinstance(row, dict) else None
    reason = str(exc).removeprefix(f"{where}: ")  # the id already says where
    errors.append({"id": where, "audio": audio if isinstance(audio, str) else where, "reason": reason})


def _make(row: dict[str, Any], base: Path, where: str) -> Utterance:
    if None in row:  # csv.DictReader puts surplus fields under the key None
        raise IntakeError(f"{where}: more fields than the header names")
    audio = row.get("audio", row.get("path"))
    if not audio:
        raise IntakeError(f"{where}: no 'audio' (or 'path') field")
    if not isinstance(audio, str):
        raise IntakeError(f"{where}: 'audio' must be a path string, got {type(audio).__name__} {audio!r}")
    audio_path = Path(audio)
    if not audio_path.is_absolute():
        audio_path = base / audio_path
    raw_id = row.get("id")
    if isinstance(raw_id, (dict, list)):
        raise IntakeError(f"{where}: 'id' must be a string, got {type(raw_id).__name__}")
    utt_id = str(raw_id) if raw_id not in (None, "") else audio_path.stem  # id 0 is an id, not "missing"
    duration = _duration(row.get("duration"), where) if row.get("duration") not in (None, "") \
        else audio_duration(audio_path)
    meta = {k: v for k, v in row.items() if k not in _KNOWN_FIELDS and v not in (None, "")}
    text = str(row.get("text") or "")
    try:  # ids, texts and metas are stored as UTF-8; a lone surrogate (JSON "\ud800") cannot be
        (utt_id + text + json.dumps(meta, ensure_ascii=False)).encode("utf-8")
    except (UnicodeEncodeError, TypeError, ValueError) as exc:
        raise IntakeError(f"{where}: id, text or an extra field cannot be stored ({exc})") from None
    return Utterance(utt_id, str(audio_path), text, duration, meta)


def _duration(value: Any, where: str) -> float:
    try:
        d = float(value)
    except (TypeError, ValueError):
        raise IntakeError(f"{where}: 'duration' must be a number of seconds, got {value!r}") from None
    if not math.isfinite(d) or d < 0:
        raise IntakeError(f"{where}: 'duration' must be a finite, non-negative number of seconds, got {value!r}")
    return d


def _read_jsonl(path: Path, errors: list[dict[str, str]] | None = None) -> list[Utterance]:
    utts = []
    # Bytes, split on b"\n" only: one undecodable line is one bad line, and no other character (\r, \x85,
    # U+2028 inside a JSON string) can split a record.
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            row: object = None
            try:
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    raise IntakeError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except (json.JSONDecodeError, RecursionError) as exc:
                    raise IntakeError(f"{where}: not valid JSON ({getattr(exc, 'msg', 'nested too deeply')})"
                                      ) from None
                if not isinstance(row, dict):
                    raise IntakeError(f"{where}: each line must be a JSON object")
                utts.append(_make(row, path.parent, where))
            except IntakeError as exc:
                _line_error(errors, exc, where, row)
    return utts


def _read_table(path: Path, delimiter: str, errors: list[dict[str, str]] | None = None) -> list[Utterance]:
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            if not reader.fieldnames or not ({"audio", "path"} & set(reader.fieldnames)):
                raise IntakeError(f"{path}: the header must name an 'audio' (or 'path') column")
            utts = []
            for row in reader:
                where = f"{path}:{reader.line_num}"
                try:
                    utts.append(_make(row, path.parent, where))
                except IntakeError as exc:
                    _line_error(errors, exc, where, row)
            return utts
    except UnicodeDecodeError as exc:
        raise IntakeError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except csv.Error as exc:
        raise IntakeError(f"{path}: malformed {'TSV' if delimiter == chr(9) else 'CSV'} ({exc})") from None


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
