"""Long recordings, word times, output formats and the Python API of `hff-cache transcribe`.

Where the truth must be known exactly, the "model" is an oracle: the recordings are words made of letter
tones (A 330 Hz, B 660 Hz, C 1320 Hz, 0.2 s each) between quiet gaps, and the oracle emits, for every encoder
frame of whatever window it is given, the letter whose tone is loudest, the word separator in long quiet runs,
blank elsewhere. Windowing, stitching, decoding and alignment then have to bring every word back at its place
in the recording. A tiny trained Whisper run (30 s window) checks the real path: no error past the window,
the exact frame count, sane word times, the API agreeing with the CLI, and the formats' real parsers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

from hff_cache.cli import app
from hff_cache.evaluation.long_audio import (
    SNAP_SECONDS,
    Transcript,
    Window,
    Word,
    align_words,
    plan_windows,
    snap_to_speech,
    speech_frames,
    stitch,
)
from hff_cache.evaluation.subtitles import group_cues, to_srt, to_vtt
from hff_cache.evaluation.transcribe import Transcriber, transcribe
from hff_cache.tasks.tokenizers import CharTokenizer

RATE = 16000
HOP = 320  # samples per 50 Hz encoder frame
FREQ = {"A": 330.0, "B": 660.0, "C": 1320.0}
LETTER = 0.2  # seconds per letter tone
GAP = 0.6  # seconds of quiet between words
WORDS = ["AB", "C", "BCA", "CAB", "B", "ACB", "BA", "CBA"]  # no doubled letter: the oracle would merge it


def recording(words: list[str], seed: int = 0, gap: float = GAP) -> tuple[np.ndarray, list[tuple[str, float, float]]]:
    """Words as runs of letter tones between quiet gaps (noise at -40 dB); the truth is (word, start, end) s."""
    rng = np.random.default_rng(seed)

    def quiet(seconds: float) -> np.ndarray:
        return 0.01 * rng.standard_normal(round(seconds * RATE))

    def tone(letter: str) -> np.ndarray:
        t = np.arange(round(LETTER * RATE)) / RATE
        return 0.3 * np.sin(2 * np.pi * FREQ[letter] * t) + 0.01 * rng.standard_normal(t.size)

    parts, truth, pos = [quiet(gap)], [], round(gap * RATE)
    for w in words:
        parts += [tone(ch) for ch in w] + [quiet(gap)]
        n = len(w) * round(LETTER * RATE)
        truth.append((w, pos / RATE, (pos + n) / RATE))
        pos += n + round(gap * RATE)
    return np.concatenate(parts).astype(np.float32), truth


def silences(truth: list[tuple[str, float, float]], total: float) -> list[tuple[float, float]]:
    ends = [0.0] + [e for _, _, e in truth]
    starts = [s for _, s, _ in truth] + [total]
    return list(zip(ends, starts, strict=True))


# --- windows and stitching ---------------------------------------------------------------------------------

def test_cuts_fall_in_the_silences_and_windows_fit() -> None:
    wave, truth = recording(WORDS * 2)
    windows = plan_windows(wave, RATE, HOP, max_window_seconds=4.0, overlap_seconds=1.0)
    assert len(windows) >= 5
    assert windows[0].keep_start == 0 and windows[-1].keep_end == len(wave) == windows[-1].end
    quiet = silences(truth, len(wave) / RATE)
    for k, w in enumerate(windows):
        assert w.end - w.start <= 4 * RATE and w.start % HOP == 0 and w.keep_start % HOP == 0
        if k:
            assert w.keep_start == windows[k - 1].keep_end  # the spans tile the recording
            assert w.keep_start - w.start == windows[k - 1].end - w.keep_start == RATE // 2  # half the overlap
            cut = w.keep_start / RATE
            assert any(a < cut < b for a, b in quiet), f"cut at {cut:.2f} s is inside a word"
    # a recording that fits is one window
    assert plan_windows(wave[: 3 * RATE], RATE, HOP, 4.0) == [Window(0, 3 * RATE, 0, 3 * RATE)]
    with pytest.raises(ValueError, match="overlap"):
        plan_windows(wave, RATE, HOP, max_window_seconds=2.0, overlap_seconds=2.0)


@pytest.fixture(scope="module")
def whisper_encoder() -> torch.nn.Module:
    from hff_cache.encoders.tiny import tiny_encoder

    return tiny_encoder("whisper")


@pytest.mark.parametrize("family", ["whisper", "wav2vec2"])
def test_windows_stitch_to_the_frames_of_one_pass(family: str, whisper_encoder: torch.nn.Module) -> None:
    """Each fake window output holds its recording frame indices: the stitched matrix must be 0..T-1 exactly."""
    from hff_cache.encoders.tiny import tiny_encoder

    encoder = whisper_encoder if family == "whisper" else tiny_encoder(family)
    for seconds in (20.0, 20.37, 31.111):
        wave = np.random.default_rng(1).standard_normal(round(seconds * RATE)).astype(np.float32)
        windows = plan_windows(wave, RATE, HOP, max_window_seconds=6.0, overlap_seconds=2.0)
        fake = [(w.start // HOP + np.arange(encoder.num_frames(w.end - w.start)))[:, None].astype(np.float32)
                for w in windows]
        lp = stitch(windows, fake, HOP)
        assert lp.shape == (encoder.num_frames(len(wave)), 1)
        assert (lp[:, 0] == np.arange(len(lp))).all()


# --- word times on constructed log-probs -------------------------------------------------------------------

def _log_probs(tok: CharTokenizer, spans: list[tuple[str, int, int]], frames: int, peaky: bool) -> np.ndarray:
    """Blank everywhere except each symbol's frames [a, b) (peaky: one frame in the middle), mildly noisy."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 0.5, (frames, tok.vocab_size))
    logits[:, 0] += 8.0
    for sym, a, b in spans:
        a, b = ((a + b) // 2, (a + b) // 2 + 1) if peaky else (a, b)
        logits[a:b, tok.symbols.index(sym)] += 12.0
    return torch.log_softmax(torch.tensor(logits), -1).numpy()


@pytest.mark.parametrize("peaky", [False, True])
def test_word_times_come_back_from_a_known_alignment(peaky: bool) -> None:
    tok = CharTokenizer.from_texts(["A B C"])
    words = [("AB", 40), ("C", 120), ("BCA", 200), ("CAB", 600), ("A", 700)]  # word, first frame
    spans, truth = [], []
    for w, start in words:
        for k, ch in enumerate(w):
            spans.append((ch, start + 10 * k, start + 10 * (k + 1)))  # 0.2 s per letter at 50 Hz
        truth.append((w, start / 50, (start + 10 * len(w)) / 50))
        spans.append(("|", start + 10 * len(w) + 5, start + 10 * len(w) + 6))
    lp = _log_probs(tok, spans, 800, peaky)
    ids = tok.encode(" ".join(w for w, _ in words))
    got = align_words(lp, ids, tok, frame_rate=50.0)
    assert [w.text for w in got] == [w for w, _, _ in truth]
    for w, (_, start, end) in zip(got, truth, strict=True):
        assert abs(w.start - start) <= 0.2 and abs(w.end - end) <= 0.2, (w, start, end)
        assert 0.5 < w.score <= 1.0
    if not peaky:  # the emission runs are the words: exact to the frame
        assert [(w.start, w.end) for w in got] == [(s, e) for _, s, e in truth]
    assert align_words(lp, [], tok, 50.0) == []


def test_word_times_survive_long_pauses_and_another_decoders_words() -> None:
    """Ten minutes at 50 Hz with a minute of silence first and 90 s in the middle (the aligner's sliding
    window would fall behind there); then the words of a decoder that dropped one word and added another."""
    tok = CharTokenizer.from_texts(["A B C"])
    rng = np.random.default_rng(3)
    spans, truth, frame = [], [], 3000
    while frame < 29_000:
        word = "".join(rng.choice(list("ABC"), size=int(rng.integers(1, 4))))
        word = "".join(ch for i, ch in enumerate(word) if i == 0 or ch != word[i - 1])  # no doubled letter
        for k, ch in enumerate(word):
            spans.append((ch, frame + 5 * k, frame + 5 * k + 3))
        truth.append((word, frame / 50, (frame + 5 * len(word) - 2) / 50))
        spans.append(("|", frame + 5 * len(word) + 2, frame + 5 * len(word) + 3))
        frame += 5 * len(word) + int(rng.integers(5, 60)) + (4500 if len(truth) == 300 else 0)
    lp = _log_probs(tok, spans, 30_000, peaky=False)
    got = align_words(lp, tok.encode(" ".join(w for w, _, _ in truth)), tok, frame_rate=50.0)
    assert [(w.text, w.start, w.end) for w in got] == truth
    other = [w for w, _, _ in truth]
    other[100:102], other[400:400] = [other[100]], ["CAB"]
    got = {(w.text, w.start) for w in align_words(lp, tok.encode(" ".join(other)), tok, frame_rate=50.0)}
    kept = [(w, s) for w, s, _ in truth[:99] + truth[102:399] + truth[401:]]
    assert sum(k in got for k in kept) >= len(kept) - 4  # only words next to the changes may move


def test_word_times_for_subword_units() -> None:
    pytest.importorskip("sentencepiece")
    from hff_cache.tasks.tokenizers import SentencePieceTokenizer

    tok = SentencePieceTokenizer.train(["ABC CAB", "AB C", "BCA AB", "CAB BCA C"] * 20, vocab_size=12)
    text = "CAB AB BCA"
    ids = tok.encode(text)
    pieces = [tok.symbols[i] for i in ids]
    frames, spans = 50, []
    for p in pieces:
        if p.startswith("\u2581") and spans:
            frames += 30  # a pause before every word but the first
        spans.append((p, frames, frames + 8))
        frames += 8
    logits = np.random.default_rng(0).normal(0, 0.5, (frames + 50, tok.vocab_size))
    logits[:, 0] += 8.0
    for p, a, b in spans:
        logits[a:b, tok.symbols.index(p)] += 12.0
    lp = torch.log_softmax(torch.tensor(logits), -1).numpy()
    got = align_words(lp, ids, tok, frame_rate=50.0)
    assert " ".join(w.text for w in got) == text and len(got) == 3
    starts = [a for p, a, _ in spans if p.startswith("\u2581")]
    assert [round(w.start * 50) for w in got] == starts


# --- an oracle model through the Transcriber: windows, stitching, decoding, alignment ------------------------

class ToneOracle(torch.nn.Module):
    """Per encoder frame of each window: the loudest letter tone, else "|" in quiet runs of 0.3 s or more
    (repeats collapse to one separator), else blank; log-probs of 0.98 for the pick."""

    is_ctc = True

    def __init__(self, encoder: torch.nn.Module, tok: CharTokenizer) -> None:
        super().__init__()
        self.encoder, self.tok = encoder, tok

    def labels(self, wave: np.ndarray, frames: int) -> np.ndarray:
        x = np.pad(wave, (0, max(0, frames * HOP - len(wave))))[: frames * HOP].reshape(frames, HOP)
        spectrum = np.abs(np.fft.rfft(x * np.hanning(HOP), axis=1))
        bins = [round(f * HOP / RATE) for f in FREQ.values()]
        power = spectrum[:, bins]
        loud = power.max(1) > 10 * np.median(spectrum, axis=1) + 1.0
        out = np.where(loud, self.tok.symbols.index("A") + power.argmax(1), 0)  # A, B, C are ids 1, 2, 3
        quiet_run = 0
        for t in range(frames + 1):  # quiet runs of 15+ frames become separators
            if t < frames and not loud[t]:
                quiet_run += 1
                continue
            if quiet_run >= 15:
                out[t - quiet_run: t] = self.tok.symbols.index("|")
            quiet_run = 0
        return out

    def forward(self, batch) -> torch.Tensor:  # noqa: ANN001 - a Batch
        t = int(batch.lengths.max())
        out = torch.full((len(batch), t, self.tok.vocab_size), float(np.log(0.02 / (self.tok.vocab_size - 1))))
        for i, wave in enumerate(batch.waves):
            n = int(batch.lengths[i])
            out[i, torch.arange(n), torch.from_numpy(self.labels(wave, n))] = float(np.log(0.98))
        return out


def _oracle(encoder: torch.nn.Module, **options: float) -> Transcriber:
    tok = CharTokenizer.from_texts(["A B C"])
    assert tok.symbols[1:4] == ["A", "B", "C"]
    loaded = SimpleNamespace(model=ToneOracle(encoder, tok), task=SimpleNamespace(tokenizer=tok))
    return Transcriber(loaded, device="cpu", num_workers=1, **options)  # type: ignore[arg-type]


def test_a_recording_past_whispers_window_comes_back_word_for_word(whisper_encoder: torch.nn.Module) -> None:
    wave, truth = recording(WORDS * 4)  # 33 s, past Whisper's 30 s
    assert len(wave) / RATE > 30
    results = []
    for options in ({}, {"max_window_seconds": 4.0, "overlap_seconds": 1.0}):
        oracle = _oracle(whisper_encoder, **options)
        results.append(oracle.transcribe_array(wave, RATE, id="long"))
    for got in results:
        assert got.text == " ".join(w for w, _, _ in truth) and got.duration == len(wave) / RATE
        for w, (text, start, end) in zip(got.words, truth, strict=True):
            assert w.text == text and abs(w.start - start) <= 0.2 and abs(w.end - end) <= 0.2, (w, start, end)
    assert results[0] == results[1]  # 2 windows or a dozen: the same words at the same times
    assert oracle.log_probs(wave, RATE).shape[0] == whisper_encoder.num_frames(len(wave))


# --- formats -----------------------------------------------------------------------------------------------

def _transcript() -> Transcript:
    words, t = [], 0.4
    for k, text in enumerate("THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG AND THEN IT RESTS FOR A WHILE".split()):
        words.append(Word(text, t, t + 0.3, 0.9))
        t += 0.35 + (1.0 if k == 4 else 0.0)  # a pause after JUMPS
    t += 3600  # one cue past the hour
    words.append(Word("LATE", t, t + 0.5, 0.8))
    return Transcript("rec", " ".join(w.text for w in words), words, t + 1.0)


def _seconds(stamp: str) -> float:
    hours, minutes, seconds = stamp.split(":")  # webvtt-py's start_in_seconds drops the milliseconds
    return 3600 * int(hours) + 60 * int(minutes) + float(seconds)


def test_srt_and_webvtt_parse_back_with_their_words_and_times() -> None:
    import srt
    import webvtt

    tr = _transcript()
    cues = group_cues(tr.words)
    assert all(len(c.text) <= 42 and c.end - c.start <= 6.0 for c in cues)
    assert cues[0].text.endswith("JUMPS") and cues[-1].text == "LATE"  # the pause and the hour end cues
    subs = list(srt.parse(to_srt(tr)))
    vtt = list(webvtt.from_string(to_vtt(tr)))
    assert len(subs) == len(vtt) == len(cues)
    for sub, cap, cue in zip(subs, vtt, cues, strict=True):
        assert sub.content == cap.text == cue.text
        assert sub.start.total_seconds() == pytest.approx(cue.start, abs=1e-3) == _seconds(cap.start)
        assert sub.end.total_seconds() == pytest.approx(cue.end, abs=1e-3) == _seconds(cap.end)
    assert " ".join(s.content for s in subs) == tr.text
    assert subs[0].start.total_seconds() == pytest.approx(tr.words[0].start, abs=1e-3)
    assert subs[-1].end.total_seconds() == pytest.approx(tr.words[-1].end, abs=1e-3)
    json.dumps(tr.to_dict())


# --- a tiny trained Whisper run ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def whisper_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A cached run on tiny-random Whisper, trained briefly on tone words; a 35 s and a 2 s recording."""
    from hff_cache.config import ExtractConfig, TrainConfig
    from hff_cache.encoders.tiny import tiny_encoder
    from hff_cache.extraction.extract import extract
    from hff_cache.model.fusion import FusionConfig
    from hff_cache.training.cached import train

    folder = tmp_path_factory.mktemp("whisper")
    with (folder / "manifest.jsonl").open("w") as f:
        for i, words in enumerate([["AB", "C"], ["BCA"], ["CAB", "B"], ["ACB", "BA"]]):
            sf.write(folder / f"u{i}.wav", recording(words, seed=i, gap=0.3)[0], RATE)
            f.write(json.dumps({"id": f"u{i}", "audio": f"u{i}.wav", "text": " ".join(words)}) + "\n")
    cache = folder / "cache.zarr"
    extract(ExtractConfig(model="tiny-random:whisper", data=str(folder / "manifest.jsonl"), out=str(cache),
                          progress=False), encoder=tiny_encoder("whisper"))
    run = folder / "run"
    train(TrainConfig(cache=str(cache), valid_cache=str(cache), out=str(run), epochs=25, eval_every=100,
                      fusion=FusionConfig(width=32, blocks=1, dropout=0.0), lr=1e-2, lr_schedule="constant",
                      warmup_steps=0, spec_time_masks=0, device="cpu", threads=1, num_workers=1), log=lambda s: None)
    long_wave, _ = recording(WORDS * 5, seed=9)
    sf.write(folder / "long.wav", long_wave[: 35 * RATE], RATE)
    sf.write(folder / "short.wav", recording(["CAB", "B"], seed=3)[0], RATE)
    return run, folder / "long.wav", folder / "short.wav"


def test_a_trained_whisper_run_transcribes_past_its_window(whisper_run: tuple[Path, Path, Path]) -> None:
    run, long, short = whisper_run
    t = Transcriber.load(run, device="cpu", num_workers=1)
    assert t.window_seconds == 30.0
    wave, rate = sf.read(long, dtype="float32")
    assert t.log_probs(wave, rate).shape[0] == t.encoder.num_frames(len(wave))  # 2 windows, stitched
    results = t.transcribe_files([long, short])
    assert [r.id for r in results] == ["long", "short"]
    assert results[0].duration == pytest.approx(35.0)
    for r in results:
        assert " ".join(w.text for w in r.words) == r.text
        for a, b in zip(r.words, r.words[1:], strict=False):
            assert a.end <= b.start
        assert all(0 <= w.start < w.end <= r.duration for w in r.words)
    # the same files as arrays, and through hff_cache.Transcriber
    import hff_cache

    assert hff_cache.Transcriber is Transcriber
    assert t.transcribe_array(wave, rate, id="long") == results[0]
    assert transcribe(run, [long], device="cpu") == [("long", results[0].text)]  # the text-only function
    with pytest.raises(ValueError, match="at most 30 s"):
        Transcriber(t.loaded, max_window_seconds=40)


def test_the_cli_agrees_with_the_api_in_every_format(whisper_run: tuple[Path, Path, Path], tmp_path: Path) -> None:
    import srt
    import webvtt

    run, long, short = whisper_run
    api = Transcriber.load(run, device="cpu", num_workers=1).transcribe_files([long, short])
    base = ["transcribe", str(run), str(long), str(short), "--device", "cpu"]
    result = CliRunner().invoke(app, base)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [f"{r.id}\t{r.text}" for r in api]
    result = CliRunner().invoke(app, [*base, "--format", "jsonl"])
    assert result.exit_code == 0, result.output
    assert [json.loads(line) for line in result.stdout.splitlines()] == [r.to_dict() for r in api]
    for fmt in ("srt", "vtt"):
        result = CliRunner().invoke(app, [*base, "--format", fmt, "--out", str(tmp_path / fmt)])
        assert result.exit_code == 0, result.output
        for r in api:
            text = (tmp_path / fmt / f"{r.id}.{fmt}").read_text()
            cues = list(srt.parse(text)) if fmt == "srt" else list(webvtt.from_string(text))
            assert " ".join(c.content if fmt == "srt" else c.text for c in cues) == r.text
    # several recordings as one SRT would not be one file: a folder is asked for
    result = CliRunner().invoke(app, [*base, "--format", "srt"])
    assert result.exit_code == 2 and "--out DIR" in result.output
    out = tmp_path / "one.srt"
    result = CliRunner().invoke(app, ["transcribe", str(run), str(short), "--device", "cpu", "--format", "srt",
                                      "--out", str(out)])
    assert result.exit_code == 0 and out.read_text() == to_srt(api[1])


def test_a_decoder_plugs_in_for_short_and_long_recordings(whisper_run: tuple[Path, Path, Path]) -> None:
    from hff_cache.model.heads import ctc_greedy_decode

    run, long, short = whisper_run
    greedy = Transcriber.load(run, device="cpu", num_workers=1).transcribe_files([long, short])
    calls: list[tuple[int, ...]] = []

    def decode(log_probs: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
        calls.append(tuple(log_probs.shape[:2]))
        return ctc_greedy_decode(log_probs, lengths)

    assert Transcriber.load(run, device="cpu", decode=decode).transcribe_files([long, short]) == greedy
    assert (1, 35 * 50) in calls and len(calls) == 2  # the long one decoded whole, the short one in its batch
    pytest.importorskip("flashlight.lib.text")
    result = CliRunner().invoke(app, ["transcribe", str(run), str(long), str(short), "--device", "cpu",
                                      "--format", "jsonl", "--decode", "beam", "--beam-size", "1"])
    assert result.exit_code == 0, result.output
    beam = [json.loads(line) for line in result.stdout.splitlines()]
    assert [b["text"] for b in beam] == [g.text for g in greedy]  # beam 1 is greedy
    assert [b["words"] for b in beam] == [g.to_dict()["words"] for g in greedy]


def test_a_missing_aligner_says_how_to_install_it(whisper_run: tuple[Path, Path, Path],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    run, _, short = whisper_run
    monkeypatch.setitem(sys.modules, "ctc_segmentation", None)  # import ctc_segmentation -> ImportError
    result = CliRunner().invoke(app, ["transcribe", str(run), str(short), "--device", "cpu", "--format", "jsonl"])
    assert result.exit_code == 2 and "pip install 'hff-cache[align]'" in result.output
    t = Transcriber.load(run, device="cpu", num_workers=1)
    with pytest.raises(ImportError, match=r"hff-cache\[align\]"):
        t.transcribe_files([short])
    assert t.transcribe_files([short], words=False)[0].words == []  # text needs no aligner
    result = CliRunner().invoke(app, ["transcribe", str(run), str(short), "--device", "cpu"])
    assert result.exit_code == 0, result.output


def test_import_hff_cache_stays_light() -> None:
    import subprocess

    code = "import sys, hff_cache; assert 'torch' not in sys.modules and 'hff_cache.evaluation' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_word_edges_snap_out_to_the_speech_around_them() -> None:
    """CTC spikes sit inside spoken words; edges move to the speech's own edges, never into the next word,
    never across silence, and at most SNAP_SECONDS."""
    wave, truth = recording(["AB", "C", "ABCABCABC"], gap=0.5)
    speech = speech_frames(wave, 320)  # 50 Hz frames
    words = [Word(t, s + 0.1, e - 0.2, 1.0) for t, s, e in truth]  # as a peaky CTC head places them
    words[2].start, words[2].end = truth[2][1] + 0.6, truth[2][2] - 0.6  # edges far inside: moved SNAP_SECONDS
    snapped = snap_to_speech([Word(w.text, w.start, w.end, w.score) for w in words], speech, 50.0)
    for w, (_, start, end) in zip(snapped[:2], truth[:2], strict=True):
        assert abs(w.start - start) <= 0.04 and abs(w.end - end) <= 0.04, (w, start, end)
    assert snapped[2].start == pytest.approx(words[2].start - SNAP_SECONDS, abs=0.021)
    assert snapped[2].end == pytest.approx(words[2].end + SNAP_SECONDS, abs=0.021)
    touching = snap_to_speech([Word("A", 1.0, 1.1, 1.0), Word("B", 1.2, 1.3, 1.0)], np.ones(200, bool), 50.0)
    assert touching[0].end == pytest.approx(1.2) and touching[1].start == pytest.approx(1.2)  # no overlap
    assert touching[0].start == pytest.approx(1.0 - SNAP_SECONDS)
