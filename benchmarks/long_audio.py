"""Long audio: utterances concatenated into one recording, transcribed whole, its word times checked against
the known utterance boundaries (issue 13: "within 0.2 s of the per-utterance boundaries").

The first N utterances of a manifest (default: enough for ``--minutes``) are joined into one 16 kHz WAV with a
seeded 0.3-0.8 s of pauses between them (noise at the previous file's own background level). Every utterance keeps
its whole file, so its own leading and trailing silence (up to half a second in LibriSpeech) stays in the
recording; the boundary an utterance is held to is therefore where its speech starts and ends inside its file: the
first and last 10 ms frame (smoothed over 30 ms) within ``--speech-db`` (30 dB) of the file's loud frames (99th
percentile).

The recording is transcribed by ``Transcriber.load(run).transcribe_files([wav])`` -- windows cut at quiet
points, stitched log-probs, word times from ctc-segmentation -- once greedy and once with the run's tuned
decoder (RUN/decoder.json), and written as SRT. Measured for each:

- boundary error: the first hypothesis word's start minus the utterance's speech start, and the last word's
  end minus its speech end. The hypothesis is aligned word by word to the concatenated references (jiwer),
  and an utterance counts only when its first (last) reference word is aligned to the same hypothesis word,
  i.e. the model recognised it; the counts say how many did. Reported: median |error|, 90th percentile
  |error|, the share within 0.2 s, and the median signed error (positive: the word is placed late);
- WER of the long-file transcript against the concatenated references (jiwer);
- speed: audio seconds / wall seconds of ``transcribe_files`` (audio reading, encoder, head, decoding and
  alignment; the run is loaded beforehand), and the decoder's share of the wall time.

A control transcribes the same utterances one file at a time (``--no-control`` skips it): its word times,
shifted to where each file sits in the long recording, go through the same measurement, so the table shows
what cutting, stitching and aligning a long recording changes.

    python benchmarks/long_audio.py --run runs/real_speech/tiny.en/asr_weighted-s0 \\
        --manifest runs/real_speech/manifests/libri_valid.jsonl --minutes 10 --threads 1

Writes the recording, its boundaries, the SRT and JSONL of each decode under ``--work``, and
docs/results/long_audio.md (and prints the same table).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import jiwer
import numpy as np
import soundfile as sf

from hff_cache.evaluation.long_audio import Transcript, Word
from hff_cache.evaluation.subtitles import write_transcripts
from hff_cache.evaluation.transcribe import DecodeFn, Transcriber
from hff_cache.intake.manifests import Utterance, load_intake
from hff_cache.runtime.threads import LoadWatch, set_threads, warn_if_loaded
from hff_cache.tasks.tokenizers import normalize_text

ROOT = Path(__file__).resolve().parents[1]
RATE = 16_000
TOLERANCE_SECONDS = 0.2
SPEECH_FRAME_SECONDS = 0.01
SPEECH_SMOOTH_FRAMES = 3


@dataclass(frozen=True)
class Segment:
    """One utterance in the long recording, in seconds from its start: the file's span and its speech's."""

    id: str
    text: str  # normalised reference
    file_start: float
    file_end: float
    speech_start: float
    speech_end: float


@dataclass
class Measurement:
    name: str
    audio_seconds: float
    wall_seconds: float
    decode_seconds: float
    wer: float
    start_errors: list[float]  # seconds, one per utterance whose first word was recognised
    end_errors: list[float]
    utterances: int
    srt_cues: int | None = None


def speech_span(wave: np.ndarray, rate: int, below_peak_db: float) -> tuple[int, int]:
    """[first, last) sample of the speech in ``wave``: frames within ``below_peak_db`` of its loud frames."""
    hop = round(SPEECH_FRAME_SECONDS * rate)
    n = len(wave) // hop
    if n == 0:
        return 0, len(wave)
    db = 10.0 * np.log10(np.mean(wave[: n * hop].astype(np.float64).reshape(n, hop) ** 2, axis=1) + 1e-10)
    k = SPEECH_SMOOTH_FRAMES
    db = np.convolve(np.pad(db, (k // 2, k - 1 - k // 2), mode="edge"), np.ones(k) / k, mode="valid")
    loud = np.flatnonzero(db > np.percentile(db, 99) - below_peak_db)
    return int(loud[0]) * hop, min(len(wave), (int(loud[-1]) + 1) * hop)


def noise_floor(wave: np.ndarray) -> float:
    """RMS of the quietest tenth of a file's 10 ms frames: its background level."""
    hop = RATE // 100
    frames = wave[: len(wave) // hop * hop].reshape(-1, hop).astype(np.float64)
    rms = np.sqrt(np.mean(frames**2, axis=1))
    return float(np.sqrt(np.mean(np.sort(rms)[: max(1, len(rms) // 10)] ** 2)))


def build_recording(utts: Sequence[Utterance], gaps: tuple[float, float], seed: int,
                    below_peak_db: float) -> tuple[np.ndarray, list[Segment]]:
    """The utterances joined with seeded pauses (the files' own background noise) between them, and where each
    one lies."""
    rng = np.random.default_rng(seed)
    parts: list[np.ndarray] = []
    segments: list[Segment] = []
    pos = 0
    for k, utt in enumerate(utts):
        if k:  # room tone, not digital silence: noise at the previous file's own floor
            gap = rng.normal(0.0, noise_floor(parts[-1]), round(rng.uniform(*gaps) * RATE)).astype(np.float32)
            parts.append(gap)
            pos += len(gap)
        wave = utt.load_wave(RATE)
        a, b = speech_span(wave, RATE, below_peak_db)
        segments.append(Segment(utt.id, normalize_text(utt.text), pos / RATE, (pos + len(wave)) / RATE,
                                (pos + a) / RATE, (pos + b) / RATE))
        parts.append(wave)
        pos += len(wave)
    return np.concatenate(parts), segments


def pick_utterances(manifest: str, minutes: float, count: int, gaps: tuple[float, float]) -> list[Utterance]:
    """The first ``count`` utterances, or (count 0) the first ones whose audio and mean gaps reach ``minutes``."""
    utts = load_intake(manifest)
    if count:
        return utts[:count]
    chosen: list[Utterance] = []
    total, mean_gap = 0.0, sum(gaps) / 2
    for utt in utts:
        if total >= minutes * 60:
            break
        chosen.append(utt)
        total += utt.duration + (mean_gap if len(chosen) > 1 else 0.0)
    if total < minutes * 60:
        print(f"warning: {manifest} holds only {total / 60:.1f} minutes; using all of it", file=sys.stderr)
    return chosen


def boundary_errors(segments: Sequence[Segment], words: Sequence[Word]) -> tuple[list[float], list[float]]:
    """(start errors, end errors) in seconds, over the utterances whose first (last) reference word is aligned
    to an identical hypothesis word; ``words`` are timed from the start of the long recording."""
    hyp = [(normalize_text(w.text), w) for w in words]
    hyp = [(text, w) for text, w in hyp if text]
    refs = [s.text.split() for s in segments]
    if not hyp:
        return [], []
    alignment = jiwer.process_words(" ".join(w for r in refs for w in r), " ".join(t for t, _ in hyp))
    matched: dict[int, int] = {}  # reference word index -> the identical hypothesis word aligned to it
    for chunk in alignment.alignments[0]:
        if chunk.type == "equal":
            for r in range(chunk.ref_start_idx, chunk.ref_end_idx):
                matched[r] = chunk.hyp_start_idx + r - chunk.ref_start_idx
    starts, ends = [], []
    first = 0
    for seg, ref in zip(segments, refs, strict=True):
        if ref:
            if first in matched:
                starts.append(hyp[matched[first]][1].start - seg.speech_start)
            last = first + len(ref) - 1
            if last in matched:
                ends.append(hyp[matched[last]][1].end - seg.speech_end)
        first += len(ref)
    return starts, ends


def timed(decode: DecodeFn, clock: list[float]) -> DecodeFn:
    """``decode``, adding its wall time to ``clock[0]``."""
    def run(log_probs: Any, lengths: Any) -> list[list[int]]:
        t0 = time.perf_counter()
        try:
            return decode(log_probs, lengths)
        finally:
            clock[0] += time.perf_counter() - t0
    return run


def transcribe_timed(t: Transcriber, paths: Sequence[Path | str]) -> tuple[list[Transcript], float, float]:
    """Transcripts of ``paths``, the wall seconds of the call and the seconds spent in the decoder."""
    clock = [0.0]
    plain = t.decode
    t.decode = timed(plain, clock)
    try:
        t0 = time.perf_counter()
        out = t.transcribe_files(list(paths))
        return out, time.perf_counter() - t0, clock[0]
    finally:
        t.decode = plain


def count_srt_cues(path: Path) -> int | None:
    """Cues in ``path`` as the ``srt`` library parses them (None when it is not installed)."""
    try:
        import srt
    except ImportError:
        return None
    return len(list(srt.parse(path.read_text(encoding="utf-8"))))


def measure_long(t: Transcriber, name: str, wav: Path, segments: Sequence[Segment], work: Path) -> Measurement:
    [tr], wall, decode = transcribe_timed(t, [wav])
    srt_path = write_transcripts([tr], "srt", work / f"{name}.srt")[0]
    write_transcripts([tr], "jsonl", work / f"{name}.jsonl")
    starts, ends = boundary_errors(segments, tr.words)
    ref = " ".join(s.text for s in segments)
    return Measurement(name, tr.duration, wall, decode, 100.0 * jiwer.wer(ref, normalize_text(tr.text) or "<none>"),
                       starts, ends, len(segments), count_srt_cues(srt_path))


def measure_per_file(t: Transcriber, name: str, utts: Sequence[Utterance],
                     segments: Sequence[Segment]) -> Measurement:
    trs, wall, decode = transcribe_timed(t, [u.audio for u in utts])
    words = [Word(w.text, w.start + seg.file_start, w.end + seg.file_start, w.score)
             for tr, seg in zip(trs, segments, strict=True) for w in tr.words]
    starts, ends = boundary_errors(segments, words)
    refs = [s.text for s in segments]
    hyps = [normalize_text(tr.text) for tr in trs]
    return Measurement(name, sum(tr.duration for tr in trs), wall, decode, 100.0 * jiwer.wer(refs, hyps),
                       starts, ends, len(segments))


def error_cells(errors: Sequence[float], total: int) -> str:
    """``n/total | median |e| | p90 |e| | share within tolerance | median e`` as table cells."""
    if not errors:
        return f"0/{total} | - | - | - | -"
    e = np.asarray(errors)
    a = np.abs(e)
    return (f"{len(e)}/{total} | {np.median(a):.3f} | {np.percentile(a, 90):.3f} | "
            f"{100.0 * np.mean(a <= TOLERANCE_SECONDS):.0f}% | {np.median(e):+.3f}")


def shorten(path: str) -> str:
    """``path`` relative to the repository when it lies inside it."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return path


def render(rows: Sequence[Measurement], info: dict[str, Any], cmd: str, machine: str) -> str:
    lines = [
        "## Long audio: word times on a concatenated recording", "",
        f"`{cmd}`", "",
        f"{time.strftime('%Y-%m-%d')}. Run `{info['run']}` (decoders: greedy, and the run's tuned "
        f"`{info['tuned']}`). The first {info['utterances']} utterances of `{info['manifest']}` joined into one "
        f"{info['seconds'] / 60:.1f}-minute recording with {info['gaps'][0]:g}-{info['gaps'][1]:g} s of pauses "
        "(room tone at each file's background level) "
        f"between them (seed {info['seed']}); each keeps its whole file, whose own leading / trailing silence "
        f"averages {info['lead']:.2f} / {info['trail']:.2f} s. Boundaries: where each utterance's speech starts "
        f"and ends (10 ms frames within {info['speech_db']:g} dB of its loud frames). Start error: first "
        "hypothesis word's start minus the speech start; end error: last word's end minus the speech end; "
        "counted only where that word is recognised (aligned to the identical reference word; n/total), "
        f"|e| in seconds, \"within\": |e| <= {TOLERANCE_SECONDS:g} s, bias: median signed error (+: late). "
        "xRT: audio seconds / wall seconds of `transcribe_files` (reading, encoder, head, decoder, alignment; "
        "the run loaded beforehand); decode: the decoder's part of the wall time. `per file` rows are the "
        "control: the same utterances transcribed one file at a time (no cutting or stitching), their times "
        "shifted into the long recording.", "",
        "| transcription | WER % | wall s | xRT | decode s | start n | start median | start p90 | start within | "
        "start bias | end n | end median | end p90 | end within | end bias | SRT cues |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cues = "-" if r.srt_cues is None else str(r.srt_cues)
        lines.append(f"| {r.name} | {r.wer:.1f} | {r.wall_seconds:.1f} | {r.audio_seconds / r.wall_seconds:.1f} | "
                     f"{r.decode_seconds:.1f} | {error_cells(r.start_errors, r.utterances)} | "
                     f"{error_cells(r.end_errors, r.utterances)} | {cues} |")
    lines += ["", machine, ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="a trained CTC run (its tuned decoder in RUN/decoder.json)")
    p.add_argument("--manifest", required=True, help="utterances with references, in the order to join them")
    p.add_argument("--minutes", type=float, default=10.0, help="length of the recording (ignored with --utterances)")
    p.add_argument("--utterances", type=int, default=0, help="join the first N utterances (0: enough for --minutes)")
    p.add_argument("--gap-min", type=float, default=0.3, help="shortest silence between utterances, seconds")
    p.add_argument("--gap-max", type=float, default=0.8, help="longest silence between utterances, seconds")
    p.add_argument("--seed", type=int, default=0, help="seeds the silences")
    p.add_argument("--speech-db", type=float, default=30.0,
                   help="speech boundaries: frames within this many dB of an utterance's loud frames")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: the usable CPUs)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-control", action="store_true", help="skip the per-file transcriptions")
    p.add_argument("--work", default=str(ROOT / "runs" / "bench_long_audio"))
    p.add_argument("--doc", default=str(ROOT / "docs" / "results" / "long_audio.md"))
    a = p.parse_args()
    set_threads(a.threads)
    warn_if_loaded()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    gaps = (a.gap_min, a.gap_max)

    utts = pick_utterances(a.manifest, a.minutes, a.utterances, gaps)
    wave, segments = build_recording(utts, gaps, a.seed, a.speech_db)
    wav = work / "long.wav"
    sf.write(wav, wave, RATE, subtype="PCM_16")
    (work / "boundaries.json").write_text(json.dumps([asdict(s) for s in segments], indent=1) + "\n")
    print(f"{wav}: {len(utts)} utterances, {len(wave) / RATE / 60:.2f} minutes", file=sys.stderr, flush=True)

    tuned = Transcriber.load(a.run, device=a.device)  # the run's tuned decoder (greedy when it has none)
    greedy = Transcriber(tuned.loaded, device=tuned.device)  # the same loaded run, greedy CTC
    tuned_kind = tuned.loaded.run.read_decoder() or {}
    tuned_name = "greedy" if tuned.decode is greedy.decode else str(tuned_kind.get("kind", "tuned"))
    tuned_desc = ", ".join(f"{k} {shorten(v) if k == 'lm' else v}" for k, v in tuned_kind.items()
                           if k in ("kind", "beam_size", "lm", "lm_weight", "word_score") and v is not None)
    rows: list[Measurement] = []
    jobs: list[tuple[str, Callable[[], Measurement]]] = [
        ("greedy, long file", lambda: measure_long(greedy, "greedy", wav, segments, work)),
        (f"{tuned_name}, long file", lambda: measure_long(tuned, tuned_name, wav, segments, work)),
    ]
    if not a.no_control:
        jobs += [("greedy, per file", lambda: measure_per_file(greedy, "greedy, per file", utts, segments)),
                 (f"{tuned_name}, per file", lambda: measure_per_file(tuned, f"{tuned_name}, per file", utts,
                                                                      segments))]
    with LoadWatch() as watch:
        for label, job in jobs:
            print(f"--- {label}", file=sys.stderr, flush=True)
            row = job()
            row.name = label
            rows.append(row)
            print(json.dumps({k: v for k, v in asdict(row).items() if not k.endswith("_errors")}), flush=True)

    info = {"run": a.run, "tuned": tuned_desc or tuned_name, "utterances": len(utts), "manifest": a.manifest,
            "seconds": len(wave) / RATE, "gaps": gaps, "seed": a.seed, "speech_db": a.speech_db,
            "lead": float(np.mean([s.speech_start - s.file_start for s in segments])),
            "trail": float(np.mean([s.file_end - s.speech_end for s in segments]))}
    cmd = "python benchmarks/long_audio.py " + " ".join(sys.argv[1:])
    md = render(rows, info, cmd, watch.line())
    Path(a.doc).parent.mkdir(parents=True, exist_ok=True)
    Path(a.doc).write_text(md)
    print(md)


if __name__ == "__main__":
    main()
