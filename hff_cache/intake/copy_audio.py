"""Copies of a selection's audio in one format: compact Opus to carry a corpus somewhere, FLAC/WAV to decode it
once on arrival (so training does not decode Opus every epoch).

``hff-cache manifest ... --copy-audio DIR`` writes them; the manifest it writes points at the copies.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from hff_cache.intake.audio import AudioError, load_audio

__all__ = ["AUDIO_FORMATS", "DEFAULT_OPUS_KBPS", "copy_audio", "opus_compression_level"]

AUDIO_FORMATS = ("flac", "wav", "opus")
DEFAULT_OPUS_KBPS = 16.0
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)  # the only rates libsndfile's Opus encoder takes
OPUS_FALLBACK_RATE = 16000
# libsndfile (src/ogg_opus.c, SFC_SET_COMPRESSION_LEVEL) sets the Opus target to
# (1 - level) * 250000 + 6000 bit/s per channel: 6 kbit/s at level 1, 256 kbit/s at level 0.
_OPUS_MIN_KBPS, _OPUS_SPAN_KBPS = 6.0, 250.0


@dataclass(frozen=True)
class _Target:
    format: str  # libsndfile's major format
    ext: str
    level: float | None  # compression_level; None leaves libsndfile's default

    @property
    def opus(self) -> bool:
        return self.format == "OGG"


def opus_compression_level(bitrate_kbps: float) -> float:
    """libsndfile's ``compression_level`` for an Opus target bitrate (mono), clipped to its 6-256 kbit/s range.

    Inverts libsndfile's ``bitrate = (1 - level) * 250000 + 6000`` bit/s (src/ogg_opus.c). Measured with
    libsndfile 1.2.2 on 10 s of 16 kHz speech-like audio, 16 kbit/s makes a 17.5 kbit/s file: the Ogg headers
    add about 0.5 kB a file, which weighs more in short utterances."""
    if not bitrate_kbps > 0:
        raise ValueError(f"the Opus bitrate must be positive, got {bitrate_kbps} kbit/s")
    level = 1.0 - (bitrate_kbps - _OPUS_MIN_KBPS) / _OPUS_SPAN_KBPS
    return min(1.0, max(0.0, level))


def copy_audio(rows: Sequence[dict[str, Any]], dest: str | Path, *, audio_format: str = "flac",
               bitrate_kbps: float | None = None, jobs: int = 1, relative_to: str | Path | None = None
               ) -> list[dict[str, Any]]:
    """Write ``dest/<id>.<ext>`` for each manifest row and return the rows pointing at the copies.

    ``rows`` are manifest rows as ``select_utterances`` returns them (id, absolute audio path, text, duration,
    extra columns). Every field is kept; ``audio`` becomes the copy's path, relative to ``relative_to`` (the
    output manifest's folder) when the copy lies inside it, so a manifest and its audio folder move together;
    ``duration`` is read back from the written file. Copies are mono (as every reader here downmixes).

    ``audio_format`` is flac, wav (both keep the source's sample rate and, where the format holds it, its
    sample type) or opus (an Ogg Opus ``.opus`` at ``bitrate_kbps``, default 16). libsndfile's Opus takes only
    8, 12, 16, 24 and 48 kHz: other rates are resampled to 16 kHz with soxr (high quality).

    Unsafe characters of an id ('/' and the like) become '_' in its file name; two ids that map to one file
    name (ignoring case, for case-insensitive disks) are refused before anything is written.

    Resumable: each copy is written under a temporary name and renamed into place, and a copy already there
    that reads back in the asked format is kept, not rewritten (whatever bitrate made it: delete the folder to
    redo it), so a rerun after an interruption or a full disk continues. ``jobs`` > 1 copies on that many
    threads (libsndfile and soxr release the GIL); the output order is the input order.
    """
    target = _target(audio_format, bitrate_kbps)
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    rows = list(rows)
    names = _file_names(rows, target.ext)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    base = Path(relative_to).resolve() if relative_to is not None else None
    if jobs == 1:
        return [_copy_one(row, dest / name, target, base) for row, name in zip(rows, names, strict=True)]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(_copy_one, row, dest / name, target, base)
                   for row, name in zip(rows, names, strict=True)]
        try:
            return [f.result() for f in futures]
        except BaseException:
            # the copies in flight finish (each lands whole or not at all); the rest never start
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _target(audio_format: str, bitrate_kbps: float | None) -> _Target:
    if audio_format not in AUDIO_FORMATS:
        raise ValueError(f"audio format must be one of {', '.join(AUDIO_FORMATS)}, not {audio_format!r}")
    if audio_format != "opus":
        if bitrate_kbps is not None:
            raise ValueError(f"a bitrate applies to opus only; {audio_format} is lossless (drop the bitrate)")
        return _Target(audio_format.upper(), f".{audio_format}", None)
    kbps = DEFAULT_OPUS_KBPS if bitrate_kbps is None else bitrate_kbps
    return _Target("OGG", ".opus", opus_compression_level(kbps))


def _file_names(rows: Sequence[dict[str, Any]], ext: str) -> list[str]:
    names: list[str] = []
    owner: dict[str, str] = {}
    for row in rows:
        uid = str(row["id"])
        # \w is Unicode-aware; a leading dot would hide the file (and '..' is no name)
        name = re.sub(r"^\.", "_", re.sub(r"[^\w.-]", "_", uid)) + ext
        key = name.casefold()
        if key in owner:
            raise ValueError(f"ids {owner[key]!r} and {uid!r} would both be copied to {name} (characters other than "
                             "letters, digits, '.', '-' and '_' become '_', and case is ignored); rename one")
        owner[key] = uid
        names.append(name)
    return names


def _copy_one(row: dict[str, Any], final: Path, target: _Target, base: Path | None) -> dict[str, Any]:
    uid = str(row["id"])
    info = _existing_copy(final, target)
    if info is None:
        wave, rate, subtype = _read_source(uid, str(row["audio"]), target)
        info = _write(uid, final, wave, rate, subtype, target)
    return {**row, "audio": _where(final, base), "duration": round(info.frames / info.samplerate, 4)}


def _existing_copy(final: Path, target: _Target) -> Any | None:
    """The header of a finished copy at ``final`` (renamed into place only when whole), else None."""
    if not final.is_file():
        return None
    try:
        info = sf.info(str(final))
    except Exception:  # noqa: BLE001 - whatever is there is not a readable copy: write it again
        return None
    if info.format != target.format or (target.opus and info.subtype != "OPUS") or info.frames <= 0:
        return None
    return info


def _read_source(uid: str, path: str, target: _Target) -> tuple[np.ndarray, int, str]:
    """(mono float32 samples, the rate to write them at, the sample type to write)."""
    try:
        src = sf.info(path)
    except Exception:  # noqa: BLE001 - load_audio below says why (missing, empty, unreadable...)
        src = None
    rate = src.samplerate if src is not None else OPUS_FALLBACK_RATE
    if target.opus and rate not in OPUS_RATES:
        rate = OPUS_FALLBACK_RATE
    try:
        # no length limit: a copy carries what the selection holds; extraction applies its own limit
        wave = load_audio(path, rate, max_seconds=math.inf)
    except AudioError as exc:
        raise AudioError(f"{uid} ({exc.source})", exc.reason, "fix or drop it, then rerun: the copies already "
                         "written are kept") from None
    return wave, rate, _subtype(target, src.subtype if src is not None else "")


def _subtype(target: _Target, source_subtype: str) -> str:
    if target.opus:
        return "OPUS"
    if source_subtype and sf.check_format(target.format, source_subtype):
        return source_subtype  # FLAC/WAV of PCM keeps every bit
    # a float source keeps 24 bits in FLAC; a lossy one (Opus, MP3...) has no more than 16 bits' worth
    return "PCM_24" if source_subtype in ("FLOAT", "DOUBLE", "PCM_32") else "PCM_16"


def _write(uid: str, final: Path, wave: np.ndarray, rate: int, subtype: str, target: _Target) -> Any:
    # a fixed temporary name: a killed run's leftover is simply overwritten by the rerun
    tmp = final.with_name(f".{final.name}.partial")
    try:
        sf.write(tmp, wave, rate, format=target.format, subtype=subtype, compression_level=target.level)
        os.replace(tmp, final)
    except (OSError, sf.SoundFileError) as exc:  # libsndfile reports a full disk as LibsndfileError
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise _write_error(uid, final, exc) from exc
    return sf.info(str(final))


def _write_error(uid: str, final: Path, exc: BaseException) -> OSError:
    reason = getattr(exc, "strerror", None) or getattr(exc, "error_string", None) or str(exc)
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(final.parent).free
        if free < 1 << 20:
            reason += f"; the disk is full ({free // 1024} KiB free)"
    msg = (f"{uid}: could not write its copy {final}: {reason}. The copies already written to {final.parent} "
           "are kept: make room (or fix the cause) and rerun the same command to continue")
    errno = getattr(exc, "errno", None)
    return OSError(errno, msg) if isinstance(errno, int) else OSError(msg)


def _where(final: Path, base: Path | None) -> str:
    path = final.resolve()
    if base is not None and path.is_relative_to(base):
        return path.relative_to(base).as_posix()
    return str(path)
