"""Output formats of ``hff-cache transcribe``: text, JSONL with timed words, SRT and WebVTT subtitles.

- ``text``: ``id<TAB>text``, one line per recording (the default, as before word times existed);
- ``jsonl``: one object per recording: id, text, duration and words (text, start, end, score; seconds);
- ``srt`` / ``vtt``: one subtitle file per recording, its cues grouped from the timed words.

A cue ends at a pause (``CUE_PAUSE_SECONDS`` or more between two words), or before a word that would make it
longer than ``MAX_CUE_CHARS`` characters (the usual one-line subtitle limit) or ``MAX_CUE_SECONDS``. The
writers are a few lines each; tests parse their output back with the ``srt`` and ``webvtt-py`` libraries.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hff_cache.evaluation.long_audio import Transcript, Word

__all__ = ["FORMATS", "Cue", "group_cues", "render", "to_srt", "to_vtt", "write_transcripts"]

FORMATS = ("text", "jsonl", "srt", "vtt")
SUBTITLE_FORMATS = ("srt", "vtt")
MAX_CUE_CHARS = 42
MAX_CUE_SECONDS = 6.0
CUE_PAUSE_SECONDS = 0.5


@dataclass(frozen=True)
class Cue:
    start: float
    end: float
    text: str


def group_cues(words: Sequence[Word], max_chars: int = MAX_CUE_CHARS, max_seconds: float = MAX_CUE_SECONDS,
               pause_seconds: float = CUE_PAUSE_SECONDS) -> list[Cue]:
    """Consecutive words grouped into cues (module docstring); a single over-long word is a cue of its own."""
    cues: list[Cue] = []
    current: list[Word] = []
    for w in words:
        if current:
            chars = sum(len(x.text) + 1 for x in current) + len(w.text)
            if (w.start - current[-1].end >= pause_seconds or chars > max_chars
                    or w.end - current[0].start > max_seconds):
                cues.append(Cue(current[0].start, current[-1].end, " ".join(x.text for x in current)))
                current = []
        current.append(w)
    if current:
        cues.append(Cue(current[0].start, current[-1].end, " ".join(x.text for x in current)))
    return cues


def _timestamp(seconds: float, decimal: str) -> str:
    ms = max(0, round(seconds * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{ms:03d}"


def to_srt(transcript: Transcript) -> str:
    """SubRip: numbered cues, ``HH:MM:SS,mmm --> HH:MM:SS,mmm``, blank line between cues."""
    blocks = [f"{i}\n{_timestamp(c.start, ',')} --> {_timestamp(c.end, ',')}\n{c.text}\n"
              for i, c in enumerate(group_cues(transcript.words), 1)]
    return "\n".join(blocks)


def _vtt_escape(text: str) -> str:
    # cue text is markup in WebVTT: a bare "&" or "<" would start an entity or a tag
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def to_vtt(transcript: Transcript) -> str:
    """WebVTT: the ``WEBVTT`` header, then cues ``HH:MM:SS.mmm --> HH:MM:SS.mmm``."""
    blocks = [f"{_timestamp(c.start, '.')} --> {_timestamp(c.end, '.')}\n{_vtt_escape(c.text)}\n"
              for c in group_cues(transcript.words)]
    return "\n".join(["WEBVTT\n", *blocks])


def render(transcripts: Sequence[Transcript], fmt: str) -> str:
    """The whole output of ``transcripts`` in ``fmt``; srt and vtt hold one recording."""
    if fmt == "text":
        return "".join(f"{t.id}\t{t.text}\n" for t in transcripts)
    if fmt == "jsonl":
        return "".join(json.dumps(t.to_dict(), ensure_ascii=False) + "\n" for t in transcripts)
    if fmt in SUBTITLE_FORMATS:
        if len(transcripts) != 1:
            raise ValueError(f"{fmt} holds one recording, not {len(transcripts)}: give --out DIR "
                             f"(one ID.{fmt} each)")
        return (to_srt if fmt == "srt" else to_vtt)(transcripts[0])
    raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _file_names(ids: Sequence[str], suffix: str) -> list[str]:
    """A file name per id: path separators flattened (ids of colliding stems are paths), duplicates numbered."""
    names: list[str] = []
    for uid in ids:
        base = uid.replace("/", "_").replace("\\", "_").strip(".") or "recording"
        name, k = f"{base}.{suffix}", 1
        while name in names:
            name, k = f"{base}-{k}.{suffix}", k + 1
        names.append(name)
    return names


def write_transcripts(transcripts: Sequence[Transcript], fmt: str, out: str | Path) -> list[Path]:
    """Write to ``out``: one file, or for srt/vtt of several recordings (or an existing folder) one file
    per recording inside the folder ``out``. Returns the files written."""
    out = Path(out)
    if fmt in SUBTITLE_FORMATS and (len(transcripts) > 1 or out.is_dir()):
        out.mkdir(parents=True, exist_ok=True)
        paths = [out / name for name in _file_names([t.id for t in transcripts], fmt)]
        for t, path in zip(transcripts, paths, strict=True):
            path.write_text(render([t], fmt), encoding="utf-8")
        return paths
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(transcripts, fmt), encoding="utf-8")
    return [out]
