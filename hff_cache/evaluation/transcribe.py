"""``hff-cache transcribe`` and the Python API: a trained run (cached or online) applied to new audio.

    from hff_cache import Transcriber
    t = Transcriber.load("runs/asr")
    t.transcribe_files(["a.wav"])[0].words      # [Word(text, start, end, score), ...]
    t.transcribe_array(samples, sample_rate)    # a Transcript

The run is loaded with its encoder (``hff_cache.runs.loading.load_run``: the encoder the run names, checked
against the file hash recorded at training time, its method set up again, the checkpoint's weights), then
fusion, head and CTC decoding (greedy, the run's tuned beam search, or any ``decode`` callable) run on
length-sorted batches of audio. A recording longer than the encoder's window (30 s for Whisper) is cut at
quiet points into overlapping windows whose log-probs are stitched back into one matrix before decoding
(``hff_cache.evaluation.long_audio``); word times come from aligning the decoded units to that matrix.

A cached run sees features computed at full precision here, while it trained on the cache's codec
(fp16 by default): the difference is the codec's rounding, far below what changes a greedy decode.
Per-layer statistics normalisation (``--normalize stats``) lives in the weights (``norm_mean``/``norm_std``
buffers), so it is applied here exactly as in training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hff_cache.config import TRANSCRIBE_BATCH_SECONDS
from hff_cache.evaluation.long_audio import (
    DEFAULT_OVERLAP_SECONDS,
    MAX_RECORDING_SECONDS,
    Transcript,
    Window,
    Word,
    align_words,
    encoder_window_seconds,
    frame_hop,
    plan_windows,
    require_aligner,
    snap_to_speech,
    speech_frames,
    stitch,
)
from hff_cache.intake.manifests import Utterance, load_intake
from hff_cache.model.heads import ctc_greedy_decode
from hff_cache.runs.loading import LoadedRun, load_run

__all__ = ["DecodeFn", "Transcriber", "Transcript", "Word", "audio_utterances", "transcribe"]

# (log_probs (B, T, V), lengths (B,)) -> decoded unit ids per utterance (blanks dropped, repeats collapsed)
DecodeFn = Callable[[torch.Tensor, torch.Tensor], list[list[int]]]
# header durations can be a few samples off the decoded audio: files this close to the window take the long path
_WINDOW_MARGIN_SECONDS = 0.05


def audio_utterances(paths: Sequence[str | Path]) -> list[Utterance]:
    """One utterance per audio file; id = file stem (the path where two stems collide)."""
    from hff_cache.intake.audio import audio_duration

    stems = [Path(p).stem for p in paths]
    dup = {s for s in stems if stems.count(s) > 1}
    return [Utterance(id=str(p) if s in dup else s, audio=str(p), duration=audio_duration(p))
            for p, s in zip(paths, stems, strict=True)]


class Transcriber:
    """A run loaded once for inference: ``transcribe_files``, ``transcribe_array``, ``transcribe_utterances``.

    ``decode`` replaces greedy CTC (e.g. a beam search with an LM); ``max_window_seconds`` (default: the
    encoder's limit, 30 s for Whisper; 0: never cut) and ``overlap_seconds`` set how long recordings are cut.
    """

    def __init__(self, loaded: LoadedRun, *, device: str | torch.device = "cpu", decode: DecodeFn | None = None,
                 max_window_seconds: float | None = None, overlap_seconds: float = DEFAULT_OVERLAP_SECONDS,
                 batch_seconds: float = TRANSCRIBE_BATCH_SECONDS, num_workers: int = 2) -> None:
        if loaded.model.encoder is None:
            raise ValueError("the run was loaded without its encoder: load_run(..., with_encoder=True)")
        self.loaded, self.model, self.tokenizer = loaded, loaded.model, loaded.task.tokenizer
        self.encoder = loaded.model.encoder
        self.device = torch.device(device)
        self.decode: DecodeFn = decode or ctc_greedy_decode
        limit = encoder_window_seconds(self.encoder)
        window = limit if max_window_seconds is None else float(max_window_seconds)
        if getattr(self.encoder, "max_frames", None) and not 0 < window <= limit:
            raise ValueError(f"{self.encoder.info.name} takes at most {limit:g} s: --max-window-seconds must be "
                             f"in (0, {limit:g}]")
        self.window_seconds = window  # 0 or less: never cut (encoders without a hard limit)
        if overlap_seconds < 0 or (window > 0 and overlap_seconds >= window / 2):
            raise ValueError(f"--overlap-seconds must be at least 0 and under half the window ({window:g} s), "
                             f"not {overlap_seconds:g}")
        self.overlap_seconds = float(overlap_seconds)
        self.batch_seconds, self.num_workers = batch_seconds, num_workers

    @classmethod
    def load(cls, run: str | Path, checkpoint: str = "best", *, device: str = "auto",
             encoder_name: str | None = None, decoder: dict[str, Any] | None = None,
             **options: Any) -> Transcriber:
        """Load ``run`` (its encoder included) on ``device`` (auto | cpu | cuda); ``options`` go to __init__.

        ``decoder``: ``DecoderConfig`` settings (``{"kind": "beam", "lm": "lm/"}``) over the run's tuned ones
        (``tune-decoder``); by default the run's tuned decoder, else greedy. A ``decode`` option overrides it.
        """
        from hff_cache.evaluation.decoding import CTCDecoder
        from hff_cache.evaluation.evaluate import run_decoder
        from hff_cache.runtime.distributed import resolve_device

        dev = resolve_device(device)
        loaded = load_run(run, checkpoint, with_encoder=True, encoder_name=encoder_name, device=dev)
        if options.get("decode") is None and loaded.model.is_ctc:
            config = run_decoder(loaded, decoder or {})
            if config.kind != "greedy":
                beam = CTCDecoder(config, loaded.task.tokenizer)
                options["decode"] = lambda lp, lengths: [h.tokens for h in beam.hypotheses(lp, lengths)]
        return cls(loaded, device=dev, **options)

    @property
    def frame_rate(self) -> float:
        return float(self.encoder.info.frame_rate)

    def transcribe_files(self, paths: Sequence[str | Path], *, words: bool = True) -> list[Transcript]:
        """One Transcript per audio file (id = file stem), in order; ``words`` times each word."""
        return self.transcribe_utterances(audio_utterances(list(paths)), words=words)

    def transcribe_array(self, samples: np.ndarray, sample_rate: int, *, id: str = "array",
                         words: bool = True) -> Transcript:
        """The Transcript of in-memory audio (mono, or (samples, channels)) at ``sample_rate``."""
        utt = Utterance(id=id, audio="<array>", samples=np.asarray(samples), sample_rate=int(sample_rate))
        return self.transcribe_utterances([utt], words=words)[0]

    @torch.no_grad()
    def transcribe_utterances(self, utts: Sequence[Utterance], *, words: bool = True) -> list[Transcript]:
        """One Transcript per utterance, in order. Classification runs give the label as text and no words."""
        from hff_cache.batches.from_audio import utterance_seconds

        utts = list(utts)
        words = words and self.model.is_ctc
        if words:
            require_aligner()  # before any audio is read: a missing extra fails at once
        cut = self.model.is_ctc and self.window_seconds > 0
        long = [i for i, u in enumerate(utts)
                if cut and utterance_seconds(u) > self.window_seconds - _WINDOW_MARGIN_SECONDS]
        taken = set(long)
        short = [i for i in range(len(utts)) if i not in taken]
        out: dict[int, Transcript] = dict(zip(short, self._transcribe_short([utts[i] for i in short], words),
                                              strict=True))
        for i in long:
            out[i] = self._transcribe_long(utts[i], words)
        return [out[i] for i in range(len(utts))]

    def _forward(self, utts: Sequence[Utterance]) -> Iterator[tuple[list[int], Any, torch.Tensor]]:
        """(positions in ``utts``, batch, model output) per length-sorted batch."""
        from hff_cache.batches.from_audio import AudioBatches

        source = AudioBatches(utts, self.encoder, batch_seconds=self.batch_seconds, shuffle=False,
                              num_workers=self.num_workers, max_batch_utts=64)
        for positions, batch in zip(source.plan(0), source.epoch(0), strict=True):
            batch = batch.to(self.device)
            yield positions, batch, self.model(batch)

    def _transcribe_short(self, utts: Sequence[Utterance], words: bool) -> list[Transcript]:
        """Recordings that fit the window: batched, decoded batch by batch."""
        if not utts:
            return []
        rate = int(self.encoder.info.sample_rate)
        found: dict[int, Transcript] = {}
        for positions, batch, out in self._forward(utts):
            preds = self.decode(out, batch.lengths) if self.model.is_ctc else self.model.predict(out, batch)
            for j, (p, pred) in enumerate(zip(positions, preds, strict=True)):
                seconds = len(batch.waves[j]) / rate
                if not self.model.is_ctc:
                    found[p] = Transcript(utts[p].id, self.tokenizer.decode(pred), [], seconds)
                    continue
                lp = out[j, : int(batch.lengths[j])].float().cpu().numpy() if words else None
                found[p] = self._transcript(utts[p].id, pred, lp, batch.waves[j])
        return [found[p] for p in range(len(utts))]

    @torch.no_grad()
    def log_probs(self, samples: np.ndarray, sample_rate: int) -> np.ndarray:
        """(T, V) CTC log-probs of a whole recording at the encoder's frame rate: windows at quiet points when
        it is longer than the window, stitched; T is the frame count of one pass over the recording."""
        from hff_cache.intake.audio import load_audio

        rate = int(self.encoder.info.sample_rate)
        return self._stitched(load_audio(samples, rate, source_rate=sample_rate, max_seconds=MAX_RECORDING_SECONDS))

    def _stitched(self, wave: np.ndarray) -> np.ndarray:
        rate, hop = int(self.encoder.info.sample_rate), frame_hop(self.encoder)
        windows = (plan_windows(wave, rate, hop, self.window_seconds, self.overlap_seconds)
                   if self.window_seconds > 0 else [Window(0, len(wave), 0, len(wave))])
        pieces = [Utterance(id=f"window@{w.start / rate:.2f}s", audio="<window>", samples=wave[w.start: w.end],
                            sample_rate=rate) for w in windows]
        log_probs: list[Any] = [None] * len(pieces)
        for positions, batch, out in self._forward(pieces):
            for j, p in enumerate(positions):
                log_probs[p] = out[j, : int(batch.lengths[j])].float().cpu().numpy()
        return stitch(windows, log_probs, hop)

    def _transcribe_long(self, utt: Utterance, words: bool) -> Transcript:
        """One long recording: windows batched, stitched into one matrix, decoded as a whole."""
        rate = int(self.encoder.info.sample_rate)
        wave = utt.load_wave(rate, MAX_RECORDING_SECONDS)
        lp = self._stitched(wave)
        ids = self.decode(torch.from_numpy(lp)[None], torch.tensor([len(lp)]))  # on the CPU, where it was stitched
        return self._transcript(utt.id, ids[0], lp if words else None, wave)

    def _transcript(self, uid: str, ids: Sequence[int], log_probs: np.ndarray | None, wave: np.ndarray) -> Transcript:
        ids = [int(i) for i in ids]
        seconds = len(wave) / int(self.encoder.info.sample_rate)
        timed = [] if log_probs is None else align_words(log_probs, ids, self.tokenizer, self.frame_rate)
        if timed:
            timed = snap_to_speech(timed, speech_frames(wave, frame_hop(self.encoder)), self.frame_rate)
        for w in timed:  # the last frame can reach a few ms past the audio (frames are whole hops)
            w.end = min(w.end, seconds)
            w.start = min(w.start, w.end)
        return Transcript(uid, self.tokenizer.decode(ids), timed, seconds)


def transcribe(run: str | Path, audio: Sequence[str | Path] = (), data: str | None = None,
               checkpoint: str = "best", device: str = "auto", batch_seconds: float = TRANSCRIBE_BATCH_SECONDS,
               num_workers: int = 2, encoder_name: str | None = None, max_window_seconds: float | None = None,
               decoder: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """[(id, text)] for ``audio`` files and/or a ``data`` manifest, in input order.

    For a classification run the "text" is the predicted class label.
    """
    utts = audio_utterances(list(audio)) + (load_intake(data) if data else [])
    if not utts:
        raise ValueError("nothing to transcribe: give audio files or --data")
    t = Transcriber.load(run, checkpoint, device=device, encoder_name=encoder_name, decoder=decoder,
                         batch_seconds=batch_seconds, num_workers=num_workers, max_window_seconds=max_window_seconds)
    return [(r.id, r.text) for r in t.transcribe_utterances(utts, words=False)]
