"""Batches from audio for the online mode and transcription: the ``BatchSource`` that replaces the cache reader."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from hff_cache.batches.common import collate_targets
from hff_cache.intake.audio import audio_duration
from hff_cache.intake.manifests import Utterance
from hff_cache.model.batch import Batch
from hff_cache.runtime import distributed
from hff_cache.runtime.planning import plan_batches


class IntakeIndex:
    """A list of utterances that looks like a ``CacheReader`` to ``tasks`` (ids, texts, metas, index_of)."""

    def __init__(self, utts: Sequence[Utterance], url: str) -> None:
        self.utts = list(utts)
        self.url = url
        self.ids = [u.id for u in self.utts]
        self.texts = [u.text for u in self.utts]
        self.metas = [u.meta for u in self.utts]
        self._index = {uid: i for i, uid in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.utts)

    def index_of(self, uid: str) -> int:
        return self._index[uid]


def utterance_seconds(u: Utterance) -> float:
    """Duration for batching: the intake's header duration, else in-memory samples, else the file header."""
    if u.duration > 0:
        return u.duration
    if u.samples is not None and u.sample_rate:
        return len(u.samples) / u.sample_rate
    return audio_duration(u.audio)




class AudioBatches:
    """A ``BatchSource`` over audio: length-sorted batches of at most ``batch_seconds`` padded seconds.

    ``targets`` (per utterance, as ``TaskData.targets``) may be None for transcription. The plan of an
    epoch is a pure function of (seed, epoch): shuffled windows of about ``shuffle_seconds`` of audio,
    each sorted by length and cut into batches, then the batch order shuffled -- as ``CacheBatches``.
    Audio is decoded and ``encoder.prepare``d in ``num_workers`` threads, ``prefetch`` batches ahead
    (soundfile, soxr and torch release the GIL).
    """

    def __init__(self, utts: Sequence[Utterance], encoder: Any, *, targets: Sequence[Any] | None = None,
                 ctc: bool = True, batch_seconds: float = 60.0, max_batch_utts: int = 64, shuffle: bool = False,
                 seed: int = 0, shuffle_seconds: float = 2000.0, num_workers: int = 2, prefetch: int = 2,
                 max_seconds: float = 600.0, rank: int = 0, world_size: int = 1) -> None:
        if targets is not None and len(targets) != len(utts):
            raise ValueError(f"{len(utts)} utterances but {len(targets)} targets")
        self.utts = list(utts)
        self.encoder = encoder
        self.targets = list(targets) if targets is not None else None
        self.ctc = ctc
        self.ids = [u.id for u in self.utts]
        # integer milliseconds, so plan_batches (integer lengths) does the cutting
        self.lengths = np.asarray([max(1, round(1000 * utterance_seconds(u))) for u in self.utts], dtype=np.int64)
        self.budget = max(1, int(1000 * batch_seconds))
        self.max_batch_utts = int(max_batch_utts)
        self.shuffle, self.seed, self.shuffle_ms = shuffle, int(seed), 1000 * shuffle_seconds
        self.num_workers, self.prefetch = max(1, int(num_workers)), max(1, int(prefetch))
        self.max_seconds = max_seconds
        # under torchrun: this rank's fixed, duration-balanced share (hff_cache.distributed)
        self.positions = list(range(len(self.utts)))
        if world_size > 1:
            owner = distributed.balanced_assignment(self.lengths.tolist(), world_size, keys=self.ids)
            self.positions = [p for p in self.positions if owner[p] == rank]

    def __len__(self) -> int:
        return len(self.plan(0))

    @property
    def seconds(self) -> float:
        return float(self.lengths[self.positions].sum()) / 1000

    @property
    def num_utterances(self) -> int:
        return len(self.positions)

    def plan(self, epoch: int) -> list[list[int]]:
        positions = self.positions
        if not self.shuffle:
            return plan_batches(positions, self.lengths, self.budget, self.max_batch_utts)
        rng = np.random.default_rng([self.seed, epoch])
        order = [positions[i] for i in rng.permutation(len(positions))]
        batches: list[list[int]] = []
        window: list[int] = []
        total = 0
        for p in order + [None]:  # None flushes the last window
            if p is None or (window and total >= self.shuffle_ms):
                batches += plan_batches(window, self.lengths, self.budget, self.max_batch_utts)
                window, total = [], 0
            if p is not None:
                window.append(p)
                total += int(self.lengths[p])
        return [batches[i] for i in rng.permutation(len(batches))]

    def make_batch(self, positions: Sequence[int]) -> Batch:
        """Decode, resample and ``prepare`` one batch (runs in a worker thread)."""
        rate = int(self.encoder.info.sample_rate)
        waves = [self.utts[p].load_wave(rate, self.max_seconds) for p in positions]
        inputs = self.encoder.prepare(waves)
        if self.targets is not None:
            targets, target_lengths = collate_targets([self.targets[p] for p in positions], self.ctc)
        else:
            targets, target_lengths = torch.zeros(len(positions), 0, dtype=torch.long), None
        # the encoder's own frame count is the truth (header durations can be off by a few samples)
        return Batch(ids=[self.ids[p] for p in positions], lengths=inputs.frame_lengths.clone(), targets=targets,
                     target_lengths=target_lengths, waves=waves, inputs=inputs)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        batches = iter(self.plan(epoch))
        with ThreadPoolExecutor(self.num_workers, thread_name_prefix="hff-audio") as pool:
            pending = deque(pool.submit(self.make_batch, b) for b in itertools.islice(batches, self.prefetch))
            try:
                while pending:
                    batch = pending.popleft().result()
                    nxt = next(batches, None)
                    if nxt is not None:
                        pending.append(pool.submit(self.make_batch, nxt))
                    yield batch
            finally:  # the consumer stopped early: drop what has not started
                for fut in pending:
                    fut.cancel()
