"""Long recordings: cut into windows the encoder takes, stitch the windows' CTC log-probs, time the words.

Cutting: a recording longer than the window (Whisper: 30 s, its 1500 positions) is cut at quiet points -- the
minimum of the short-time energy in the few seconds before each latest possible cut -- and every window
reaches half the overlap past its cuts on both sides, so the frames next to a cut still see context.
Cuts and window starts are whole encoder frames (320 samples at 50 Hz), so a window's frame j is the
recording's frame ``start / hop + j`` and the stitched matrix has exactly the frames of one pass over the file.

Stitching: each window keeps the frames of its own span (between its cuts, i.e. the overlap is split at its
middle), giving one (T, V) log-prob matrix per recording, decoded as a whole.

Word times: the decoded units are aligned to that matrix by ctc-segmentation (Kürzinger et al. 2020, the
aligner behind ESPnet's ``CTCSegmentation``), which gives the frame where each unit starts; a word runs from
its first unit's start to the end of its last unit's emission (the frames where that unit outscores the
blank). Seconds are frames / the encoder's frame rate. A CTC head emits a word's units as spikes inside the
spoken word, so those edges fall inside it (ends about 0.2 s early on Whisper tiny.en); ``snap_to_speech`` then
moves each end later while the audio is still speech and the next word has not begun, and each start earlier
likewise, by at most ``SNAP_SECONDS``. The alignment runs piece by piece between the pauses
of the best path (0.5 s or more), each piece aligned whole; the decoded words are assigned to pieces by
matching them to the best path's words, so a beam search's output, which differs here and there, lands in the
right piece. ctc-segmentation is the optional ``align`` extra.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["ALIGN_INSTALL", "Transcript", "Window", "Word", "align_words", "encoder_window_seconds", "frame_hop",
           "plan_windows", "require_aligner", "short_time_energy", "snap_to_speech", "speech_frames", "stitch",
           "word_units"]

ALIGN_INSTALL = "pip install 'hff-cache[align]'"
# Encoders without a hard input limit (the wav2vec2 family) still get windows: attention memory grows with the
# square of the length, and they were pre-trained on utterances of at most ~30 s.
DEFAULT_WINDOW_SECONDS = 30.0
DEFAULT_OVERLAP_SECONDS = 2.0
CUT_SEARCH_SECONDS = 5.0  # how far before the latest possible cut a quieter point is looked for
ENERGY_SMOOTH_SECONDS = 0.2  # a cut lands where 0.2 s around it are quiet, not on one quiet frame inside a word
# The whole recording and its log-probs are in memory (16 kHz float32 audio: 230 MB an hour).
MAX_RECORDING_SECONDS = 4 * 3600.0
# Alignment runs piece by piece, between pauses of at least this long (where the best path emits nothing but
# blanks and word separators): ctc-segmentation's table is (frames x units) of a piece, and its sliding window,
# which follows the alignment at the average speaking rate, falls behind across long pauses.
ALIGN_PAUSE_SECONDS = 0.5
_ALIGN_MAX_WINDOW_FRAMES = 6000  # pieces up to 2 min at 50 Hz are aligned whole; longer ones with this window
_WORD_START = "\u2581"  # sentencepiece's mark on a piece that begins a word
# Word edges move towards the speech around them (snap_to_speech): frames within SPEECH_RANGE_DB of the
# recording's loud level (its 95th energy percentile) and more than a quarter of the way (in dB) from its noise
# floor (the 5th percentile) to that level count as speech; an edge moves by at most SNAP_SECONDS.
SPEECH_RANGE_DB = 35.0
SNAP_SECONDS = 0.4


@dataclass
class Word:
    """One word of a transcript, with start and end in seconds from the start of the recording."""

    text: str
    start: float
    end: float
    score: float = math.nan  # mean probability of its units where the aligner put them (0..1)


@dataclass
class Transcript:
    """The transcription of one recording; ``words`` is empty when word times were not asked for."""

    id: str
    text: str
    words: list[Word] = field(default_factory=list)
    duration: float = 0.0  # seconds of audio

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, times in seconds rounded to the millisecond."""
        return {"id": self.id, "text": self.text, "duration": round(self.duration, 3),
                "words": [{"text": w.text, "start": round(w.start, 3), "end": round(w.end, 3),
                           "score": None if math.isnan(w.score) else round(w.score, 4)} for w in self.words]}


@dataclass(frozen=True)
class Window:
    """One piece of a recording, in samples: [start, end) goes through the encoder, [keep_start, keep_end)
    is the span whose frames it contributes."""

    start: int
    end: int
    keep_start: int
    keep_end: int


def encoder_window_seconds(encoder: Any) -> float:
    """The longest input ``encoder`` takes: Whisper's positions / frame rate (30 s), else 30 s by default."""
    max_frames = getattr(encoder, "max_frames", None)
    if max_frames:
        return float(max_frames) / float(encoder.info.frame_rate)
    return DEFAULT_WINDOW_SECONDS


def frame_hop(encoder: Any) -> int:
    """Samples per encoder frame (320 for 50 Hz at 16 kHz)."""
    return round(encoder.info.sample_rate / encoder.info.frame_rate)


def short_time_energy(wave: np.ndarray, hop: int, smooth_frames: int = 1) -> np.ndarray:
    """Log energy (dB) of each ``hop``-sample frame, averaged over ``smooth_frames`` neighbours."""
    n = len(wave) // hop
    frames = np.asarray(wave[: n * hop], dtype=np.float64).reshape(n, hop)
    db = 10.0 * np.log10(np.mean(frames**2, axis=1) + 1e-10)
    k = max(1, min(int(smooth_frames), n))
    if k == 1:
        return db
    # edge padding: zero padding would make the first and last frames look loud (0 dB)
    padded = np.pad(db, (k // 2, k - 1 - k // 2), mode="edge")
    return np.convolve(padded, np.ones(k) / k, mode="valid")


def plan_windows(wave: np.ndarray, sample_rate: int, hop: int, max_window_seconds: float,
                 overlap_seconds: float = DEFAULT_OVERLAP_SECONDS,
                 search_seconds: float = CUT_SEARCH_SECONDS) -> list[Window]:
    """Windows of at most ``max_window_seconds`` covering ``wave``, cut at low-energy points (module docstring).

    A recording that fits is one window. Every boundary is a multiple of ``hop``.
    """
    n = len(wave)
    window = int(max_window_seconds * sample_rate) // hop * hop
    if n <= window:
        return [Window(0, n, 0, n)]
    # half the overlap on each side of a cut; at least two frames, since a convolutional front end's frames next
    # to the cut need samples past it
    half = max(2 * hop, round(overlap_seconds * sample_rate / 2 / hop) * hop)
    if window - 2 * half < 4 * hop:
        raise ValueError(f"the overlap ({overlap_seconds:g} s) leaves no room in a {max_window_seconds:g} s window: "
                         "make it less than half the window")
    search = min(int(search_seconds * sample_rate) // hop, (window - 2 * half) // (2 * hop)) * hop
    energy = short_time_energy(wave, hop, round(ENERGY_SMOOTH_SECONDS * sample_rate / hop))
    cuts: list[int] = []
    while True:
        left = cuts[-1] - half if cuts else 0  # where the current window starts
        if n - left <= window:
            break
        latest = left + window - half  # the window must end half an overlap past its cut
        lo, hi = max((cuts[-1] if cuts else 0) + hop, latest - search) // hop, latest // hop
        cuts.append((lo + int(np.argmin(energy[lo: hi + 1]))) * hop)
    bounds = [0, *cuts, n]
    return [Window(max(0, a - half), min(n, b + half), a, b)
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def stitch(windows: Sequence[Window], log_probs: Sequence[np.ndarray], hop: int) -> np.ndarray:
    """One (T, V) matrix from each window's (T_k, V) log-probs: the frames of its own span."""
    if len(windows) != len(log_probs):
        raise ValueError(f"{len(windows)} windows but {len(log_probs)} log-prob matrices")
    parts = []
    for k, (w, lp) in enumerate(zip(windows, log_probs, strict=True)):
        first = (w.keep_start - w.start) // hop
        # the last window keeps all its frames: the encoder's own count for the end of the recording
        last = len(lp) if k == len(windows) - 1 else (w.keep_end - w.start) // hop
        if last > len(lp):
            raise ValueError(f"window {k} gave {len(lp)} frames, fewer than its span needs ({last})")
        parts.append(lp[first:last])
    return np.concatenate(parts, axis=0)


def require_aligner() -> Any:
    """The ctc_segmentation module, or an ImportError that says how to install it."""
    try:
        import ctc_segmentation
    except ImportError as e:
        raise ImportError(f"word times need the ctc-segmentation aligner: {ALIGN_INSTALL} "
                          "(or ask for text only: --format text, words=False)") from e
    return ctc_segmentation


def _separator(tokenizer: Any) -> str | None:
    """The symbol that only separates words ("|" for characters), if the tokenizer has one."""
    return getattr(tokenizer, "word_separator", "|" if getattr(tokenizer, "kind", "") == "char" else None)


def word_units(tokenizer: Any, ids: Sequence[int]) -> list[tuple[str, list[int]]]:
    """The words of a decoded unit sequence: (text, positions in ``ids`` of its units).

    Characters: words are the runs between word separators ("|"); sentencepiece: a word starts at a piece
    marked "▁"; any other symbol tokenizer (phones): each unit is a word.
    """
    symbols = getattr(tokenizer, "symbols", None)
    kind = getattr(tokenizer, "kind", "")
    sep = _separator(tokenizer)
    groups: list[list[int]] = []
    for pos, i in enumerate(int(i) for i in ids):
        sym = symbols[i] if symbols is not None and 0 <= i < len(symbols) else None
        if sep is not None and sym == sep:
            groups.append([])  # a separator closes the word; empty groups are dropped below
        elif kind == "bpe":
            if not groups or (sym is not None and sym.startswith(_WORD_START)):
                groups.append([])
            groups[-1].append(pos)
        elif sep is not None:
            if not groups:
                groups.append([])
            groups[-1].append(pos)
        else:
            groups.append([pos])
    words = [(tokenizer.decode([ids[p] for p in g]), g) for g in groups if g]
    return [(text, g) for text, g in words if text]


def _best_path(log_probs: np.ndarray) -> tuple[list[int], list[int]]:
    """Greedy units (repeats collapsed, blanks dropped) and the frame where each starts."""
    best = log_probs.argmax(1)
    starts = np.flatnonzero(np.concatenate([[True], best[1:] != best[:-1]]) & (best != 0))
    return best[starts].tolist(), starts.tolist()


def _pause_splits(log_probs: np.ndarray, quiet: Sequence[int], min_frames: int) -> list[int]:
    """The middle frame of every run of at least ``min_frames`` frames whose best symbol is in ``quiet``."""
    still = np.isin(log_probs.argmax(1), list(quiet)).astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], still, [0]])))
    runs = zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True)
    return [(a + b) // 2 for a, b in runs if b - a >= min_frames]


def _split_units(tokenizer: Any, ids: Sequence[int], greedy: list[int], greedy_frames: list[int],
                 splits: list[int]) -> list[int]:
    """For each split frame, the number of ``ids`` before it: the words the best path has before the split,
    carried over to the decoded words by matching the two word sequences (they differ after a beam search)."""
    import bisect
    from difflib import SequenceMatcher

    g_words, d_words = word_units(tokenizer, greedy), word_units(tokenizer, ids)
    g_first = [greedy_frames[pos[0]] for _, pos in g_words]
    blocks = [(0, 0, len(g_words))]
    if list(ids) != greedy:
        blocks = SequenceMatcher(None, [w for w, _ in g_words], [w for w, _ in d_words],
                                 autojunk=False).get_matching_blocks()
    out = []
    for s in splits:
        k = bisect.bisect_left(g_first, s)  # k best-path words start before the split
        prev = (0, 0, 0)
        for a, b, size in (*blocks, (len(g_words), len(d_words), 0)):  # best-path words a.. are decoded words b..
            if a + size >= k:
                if a <= k:  # the split falls inside (or at an end of) this matched run
                    j = b + (k - a)
                else:  # between two matched runs: share the unmatched decoded words out in proportion
                    ga, da = prev[0] + prev[2], prev[1] + prev[2]
                    j = da + round((b - da) * (k - ga) / (a - ga))
                break
            prev = (a, b, size)
        out.append(d_words[j][1][0] if j < len(d_words) else len(ids))
    return np.maximum.accumulate(out).tolist() if out else []


def _align_piece(cs: Any, log_probs: np.ndarray, ids: Sequence[int], frame_rate: float) -> np.ndarray:
    """ctc-segmentation of one piece: the frame where each unit starts."""
    t = log_probs.shape[0]
    if len(ids) + 3 > t:  # more units than frames: only a decoder that disagrees with the frames gives that
        return np.linspace(0, t - 1, len(ids)).round().astype(np.int64)
    config = cs.CtcSegmentationParameters()
    config.blank = 0
    config.index_duration = 1.0 / frame_rate
    config.char_list = [str(k) for k in range(log_probs.shape[1])]  # names only label its debug state list
    config.min_window_size = min(t, _ALIGN_MAX_WINDOW_FRAMES)  # the whole piece: an exact Viterbi alignment
    ground_truth, _ = cs.prepare_token_list(config, [np.asarray(ids, dtype=np.int64)])
    timings, _, _ = cs.ctc_segmentation(config, np.ascontiguousarray(log_probs, dtype=np.float32), ground_truth)
    # ground_truth is [start, blank, *ids, blank]: unit k is row k + 2
    return np.rint(np.asarray(timings[2: 2 + len(ids)]) * frame_rate).astype(np.int64)


def _unit_frames(log_probs: np.ndarray, ids: Sequence[int], tokenizer: Any, frame_rate: float) -> np.ndarray:
    """The frame where each unit of ``ids`` starts: aligned piece by piece between long pauses."""
    cs = require_aligner()
    symbols, sep = list(getattr(tokenizer, "symbols", [])), _separator(tokenizer)
    quiet = [0] + ([symbols.index(sep)] if sep in symbols else [])  # what the best path emits in a pause
    splits = _pause_splits(log_probs, quiet, max(1, round(ALIGN_PAUSE_SECONDS * frame_rate)))
    greedy, greedy_frames = _best_path(log_probs)
    bounds = _split_units(tokenizer, ids, greedy, greedy_frames, splits)
    frames = np.zeros(len(ids), dtype=np.int64)
    f_edges, u_edges = [0, *splits, log_probs.shape[0]], [0, *bounds, len(ids)]
    for f0, f1, u0, u1 in zip(f_edges[:-1], f_edges[1:], u_edges[:-1], u_edges[1:], strict=True):
        if u1 > u0:
            frames[u0:u1] = f0 + _align_piece(cs, log_probs[f0:f1], ids[u0:u1], frame_rate)
    return frames


def align_words(log_probs: np.ndarray, ids: Sequence[int], tokenizer: Any, frame_rate: float) -> list[Word]:
    """Start and end (seconds) of each decoded word on a (T, V) CTC log-prob matrix (module docstring).

    ``ids`` are the decoded units (blanks dropped, repeats collapsed), as a decoder returns them.
    """
    ids = [int(i) for i in ids]
    units = word_units(tokenizer, ids)
    if not units:
        return []
    lp = np.asarray(log_probs, dtype=np.float32)
    t = lp.shape[0]
    frames = _unit_frames(lp, ids, tokenizer, frame_rate)
    firsts = [int(frames[g[0]]) for _, g in units]
    words: list[Word] = []
    prev_end = 0
    for k, (text, g) in enumerate(units):
        first, last = int(frames[g[0]]), int(frames[g[-1]])
        start, unit = max(first, prev_end), ids[g[0]]
        # an emission often spans a few frames; the aligner gives where it starts, widen to the whole run
        while start > prev_end and lp[start - 1, unit] > lp[start - 1, 0]:
            start -= 1
        limit = firsts[k + 1] if k + 1 < len(units) else t
        end, unit = max(last + 1, start + 1), ids[g[-1]]
        while end < limit and lp[end, unit] > lp[end, 0]:
            end += 1
        end = min(end, t)
        score = float(np.exp(np.mean([lp[min(int(frames[p]), t - 1), ids[p]] for p in g])))
        words.append(Word(text, start / frame_rate, end / frame_rate, score))
        prev_end = end
    return words


def speech_frames(wave: np.ndarray, hop: int) -> np.ndarray:
    """(frames,) bool: the ``hop``-sample frames that count as speech (see ``SPEECH_RANGE_DB``)."""
    energy = short_time_energy(wave, hop)
    if not len(energy):
        return np.zeros(0, dtype=bool)
    loud, floor = np.percentile(energy, 95), np.percentile(energy, 5)
    return energy > max(loud - SPEECH_RANGE_DB, floor + (loud - floor) / 4)


def snap_to_speech(words: list[Word], speech: np.ndarray, frame_rate: float) -> list[Word]:
    """Move word edges out to the speech around them (module docstring); words never overlap."""
    n, reach = len(speech), int(round(SNAP_SECONDS * frame_rate))
    for k, w in enumerate(words):  # ends first, against the aligned starts of the next words
        end = min(int(round(w.end * frame_rate)), n)
        stop = min(n, end + reach, int(round(words[k + 1].start * frame_rate)) if k + 1 < len(words) else n)
        while end < stop and speech[end]:
            end += 1
        w.end = max(w.end, end / frame_rate)
    for k, w in enumerate(words):
        start = min(int(round(w.start * frame_rate)), n)
        stop = max(0, start - reach, int(math.ceil(words[k - 1].end * frame_rate)) if k else 0)
        while start > stop and speech[start - 1]:
            start -= 1
        w.start = min(w.start, start / frame_rate)
    return words
