"""Audio intake: read, downmix, resample and validate one file.

Every failure is an `AudioError` that names the file and says what to do, so a bad
item in a 100-hour corpus costs one line in a report, not a crashed extraction.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

# A single utterance longer than this is almost always a mistake (a whole session file
# in a manifest meant for utterances); it would also blow up encoder attention memory.
DEFAULT_MAX_SECONDS = 60.0 * 10
# Shorter than one encoder frame (20 ms) gives no features at all.
MIN_SECONDS = 0.025


class AudioError(ValueError):
    """A clear, per-item audio problem: names the file, the reason and the fix."""

    def __init__(self, source: str, reason: str, fix: str = "") -> None:
        self.source = source
        self.reason = reason
        msg = f"{source}: {reason}"
        if fix:
            msg += f" ({fix})"
        super().__init__(msg)


def load_audio(
    source: str | Path | bytes | np.ndarray,
    target_rate: int,
    *,
    source_rate: int | None = None,
    max_seconds: float = DEFAULT_MAX_SECONDS,
    name: str | None = None,
) -> np.ndarray:
    """Return mono float32 samples at `target_rate`.

    `source` is a path, the encoded bytes of a file, or an array (then `source_rate`
    is required). Multi-channel audio is averaged to mono; other rates are resampled
    with soxr (high quality).
    """
    label = name or (str(source) if isinstance(source, (str, Path)) else "<in-memory audio>")
    if isinstance(source, np.ndarray):
        if source_rate is None:
            raise AudioError(label, "an array was given without its sample rate", "pass source_rate")
        wave, rate = np.asarray(source, dtype=np.float32), int(source_rate)
    else:
        wave, rate = _read(source, label, max_seconds)
    if wave.ndim == 2:
        wave = wave.mean(axis=1)
    elif wave.ndim != 1:
        raise AudioError(label, f"unexpected audio shape {wave.shape}")
    if wave.size == 0:
        raise AudioError(label, "the file holds no samples", "remove it from the manifest")
    if not np.isfinite(wave).all():
        raise AudioError(label, "the audio contains NaN or infinite samples", "re-encode or drop the file")
    seconds = wave.size / rate
    if seconds > max_seconds:
        raise AudioError(
            label,
            f"{seconds:.0f} s long, over the {max_seconds:.0f} s limit",
            "segment it into utterances or raise --max-seconds",
        )
    if seconds < MIN_SECONDS:
        raise AudioError(label, f"only {seconds * 1000:.1f} ms long, shorter than one encoder frame")
    if rate != target_rate:
        wave = soxr.resample(wave, rate, target_rate, quality="HQ")
    return np.ascontiguousarray(wave, dtype=np.float32)


def _read(source: str | Path | bytes, label: str, max_seconds: float = DEFAULT_MAX_SECONDS
          ) -> tuple[np.ndarray, int]:
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise AudioError(label, "file not found", "check the path in the manifest (relative paths are "
                             "resolved against the manifest's folder)")
        if path.is_dir():
            raise AudioError(label, "is a directory, not an audio file")
        _check_header(path, label, max_seconds)
        target: object = path
    else:
        target = io.BytesIO(source)
    try:
        wave, rate = sf.read(target, dtype="float32", always_2d=False)
    except Exception as exc:  # soundfile raises LibsndfileError, RuntimeError, TypeError...
        detail = getattr(exc, "error_string", "") or str(exc)  # error_string: without the path again
        if "lost sync" in detail or "decoder" in detail.lower():
            detail += " - the file is truncated or corrupt"
        raise AudioError(label, f"unreadable audio ({exc.__class__.__name__}: {detail})",
                         "re-encode it as WAV/FLAC or drop it; --on-error skip records it and goes on") from None
    return wave, int(rate)


def _check_header(path: Path, label: str, max_seconds: float) -> None:
    """Cheap checks before decoding: empty file, over-long file (from the header: an hour-long file is
    refused without decoding it) and a WAV cut short (libsndfile would silently return the rest)."""
    size = path.stat().st_size
    if size == 0:
        raise AudioError(label, "the file is empty (0 bytes)", "re-copy it or remove it from the manifest")
    try:
        info = sf.info(str(path))
    except Exception:  # noqa: BLE001 - the decode below reports unreadable files with the full reason
        return
    if info.samplerate > 0 and 0 < info.frames < 2**62:  # 2**62+: libsndfile's "length unknown"
        seconds = info.frames / info.samplerate
        if seconds > max_seconds:
            raise AudioError(label, f"{seconds:.0f} s long (from the file header), over the {max_seconds:.0f} s "
                             "limit", "segment it into utterances or raise --max-seconds")
    if info.format in ("WAV", "WAVEX"):
        declared, available = _wav_data_sizes(path, size)
        if declared is not None and declared > available:
            raise AudioError(label, f"truncated: the WAV header declares {declared} bytes of audio, the file "
                             f"holds {available}", "re-copy or re-download it, or drop it")


def _wav_data_sizes(path: Path, size: int) -> tuple[int | None, int]:
    """(bytes the RIFF 'data' chunk declares, bytes actually after its header); (None, 0) if not found or
    the writer left the size open (0 or 0xFFFFFFFF, as streaming writers do)."""
    with path.open("rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None, 0
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            chunk = f.read(8)
            if len(chunk) < 8:
                break
            n = int.from_bytes(chunk[4:], "little")
            if chunk[:4] == b"data":
                return (None, 0) if n in (0, 0xFFFFFFFF) else (n, size - pos - 8)
            pos += 8 + n + (n & 1)  # chunks are padded to even sizes
    return None, 0


def audio_duration(path: str | Path) -> float:
    """Duration in seconds from the file header, without decoding (0.0 when unreadable)."""
    try:
        info = sf.info(str(path))
    except Exception:
        return 0.0
    return float(info.frames) / float(info.samplerate) if info.samplerate else 0.0
