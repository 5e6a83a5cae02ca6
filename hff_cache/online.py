"""Online mode: the encoder runs inside the training step (adapters, BitFit, full fine-tuning, frozen HFF).

The batch source here replaces the cache reader and nothing else: it loads audio in threads, cuts
length-sorted batches of at most ``batch_seconds`` padded audio, runs ``encoder.prepare`` on the CPU and
yields the same ``Batch`` as the cached path, with ``inputs`` (an ``EncoderBatch``) where the cached
path has ``feats``. ``HFFModel.features`` runs the encoder on it; the training loop (``train.fit``), run
directory, checkpoints, metrics and plots are the cached path's.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hff_cache import distributed
from hff_cache.audio import audio_duration, load_audio
from hff_cache.data import Utterance, intake_fingerprint, load_intake
from hff_cache.loader import Batch, collate_targets, plan_batches

__all__ = ["AudioBatches", "IntakeIndex", "default_encoder_lr", "prepare_online", "spread_subset",
           "train_online", "utterance_seconds"]

# Learning rate of the encoder's own weights when --encoder-lr is not given: full fine-tuning needs a
# far smaller step than a freshly initialised head; BitFit's few biases tolerate a larger one.
ENCODER_LR = {"full": 5e-5, "bitfit": 5e-4}


def default_encoder_lr(method: str, lr: float) -> float:
    return ENCODER_LR.get(method, lr)


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


def spread_subset(utts: Sequence[Utterance], n: int | None) -> list[Utterance]:
    """``n`` utterances evenly spaced in id order (every speaker and chapter keeps its share); all if None."""
    ordered = sorted(utts, key=lambda u: u.id)
    if n is None or n >= len(ordered):
        return ordered
    if n < 1:
        raise ValueError(f"need at least one utterance, got {n}")
    return [ordered[(i * len(ordered)) // n] for i in range(n)]


def _load_wave(u: Utterance, rate: int, max_seconds: float) -> np.ndarray:
    if u.samples is not None:
        return load_audio(u.samples, rate, source_rate=u.sample_rate, max_seconds=max_seconds, name=u.id)
    return load_audio(u.audio, rate, max_seconds=max_seconds, name=f"{u.id} ({u.audio})")


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
        # integer milliseconds, so loader.plan_batches (integer lengths) does the cutting
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
        waves = [_load_wave(self.utts[p], rate, self.max_seconds) for p in positions]
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


# --- training setup --------------------------------------------------------------------------------------


def _intake(source: str, limit: int | None, what: str) -> list[Utterance]:
    utts = spread_subset(load_intake(source), limit)
    if not utts:
        raise ValueError(f"{what} {source}: no utterances")
    return utts


def prepare_online(cfg: Any, log: Callable[[str], None] = print) -> tuple[Any, Any]:
    """Build (``train.Setup``, resolved ``TrainConfig``) for ``cfg.online``: encoder, method, task, sources.

    The resolved config pins what the method implies (fusion ``last`` and the last hidden state for
    adapters/bitfit/full, the encoder LR), so config.json says what ran and --resume compares it.
    """
    from hff_cache.adapters import enable_grad_checkpointing, encoder_parameter_counts, setup_method
    from hff_cache.config import environment, to_dict
    from hff_cache.encoders import load_encoder
    from hff_cache.model import HFFModel, ModelSpec, SpecAugment
    from hff_cache.tasks import Task, load_labels, report_label_ids
    from hff_cache.train import RunError, Setup

    if not cfg.model or not cfg.data:
        raise RunError("online training needs --model and --data")
    if cfg.normalize != "none":
        raise RunError("--normalize stats needs a cache's layer statistics; online mode has none "
                       "(use --normalize none)")
    train_utts = _intake(cfg.data, cfg.max_train_utts, "training data")
    valid_utts = _intake(cfg.valid_data, cfg.max_valid_utts, "validation data") if cfg.valid_data else None
    train_index = IntakeIndex(train_utts, str(cfg.data))
    valid_index = IntakeIndex(valid_utts, str(cfg.valid_data)) if valid_utts is not None else None
    labels = load_labels(cfg.labels) if cfg.labels else None
    if labels is not None:
        report_label_ids(labels, [r for r in (train_index, valid_index) if r is not None])
    task = Task.from_labels(cfg.task, train_index, labels)
    train_data = task.prepare(train_index, labels, "train")

    encoder = load_encoder(cfg.model, "cpu")  # may consume random numbers (module init before loading)
    torch.manual_seed(cfg.seed)
    ms = setup_method(encoder, cfg.method, cfg.bottleneck)
    if cfg.grad_checkpointing:
        enable_grad_checkpointing(encoder)
    layers = ms.layers
    if cfg.layers is not None and ms.fusion_kind is None:
        bad = [k for k in cfg.layers if not 0 <= k < encoder.num_hidden_states]
        if bad:
            raise RunError(f"layers {bad} out of range: {cfg.model} has hidden states "
                           f"0..{encoder.num_hidden_states - 1}")
        layers = list(cfg.layers)
    fusion = replace(cfg.fusion, kind=ms.fusion_kind) if ms.fusion_kind else cfg.fusion
    encoder_lr = cfg.encoder_lr if cfg.encoder_lr is not None else default_encoder_lr(cfg.method, cfg.lr)
    cfg = replace(cfg, fusion=fusion, layers=layers, encoder_lr=encoder_lr)

    ctc = task.kind == "ctc"
    spec = ModelSpec(fusion=to_dict(fusion), num_layers=len(layers), hidden_size=int(encoder.info.hidden_size),
                     head="ctc" if ctc else "classify", vocab_size=task.tokenizer.vocab_size, layers=layers,
                     pooling=cfg.pooling, normalize="none")
    augment = SpecAugment(cfg.spec_time_masks, cfg.spec_time_width, cfg.spec_feat_masks, cfg.spec_feat_width)
    # Seeded right before the model, as train.prepare does: for one seed, every method's fusion and head
    # start from the cached run's weights (hff-frozen is then the cached model exactly; a CTC head's
    # escape from the all-blank plateau depends strongly on its initial weights at this data size).
    torch.manual_seed(cfg.seed)
    model = HFFModel(spec, encoder=encoder, augment=augment)

    d = distributed.current()  # under torchrun each rank loads only its share of the audio
    common = dict(ctc=ctc, batch_seconds=cfg.batch_seconds, max_batch_utts=cfg.max_batch_utts,
                  num_workers=cfg.num_workers, prefetch=cfg.prefetch, rank=d.rank, world_size=d.world_size)
    by_index = [train_utts[i] for i in train_data.indices]
    train_src = AudioBatches(by_index, encoder, targets=train_data.targets, shuffle=True, seed=cfg.seed,
                             shuffle_seconds=cfg.shuffle_frames / encoder.info.frame_rate, **common)
    valid_src, valid_refs, data_doc = None, {}, {"train": _data_doc(cfg.data, by_index)}
    if valid_index is not None:
        valid_data = task.prepare(valid_index, labels, "valid")
        v_utts = [valid_index.utts[i] for i in valid_data.indices]
        valid_src = AudioBatches(v_utts, encoder, targets=valid_data.targets, shuffle=False, **common)
        valid_refs = dict(zip(valid_data.ids, valid_data.refs, strict=True))
        data_doc["valid"] = _data_doc(cfg.valid_data, v_utts)
    counts = encoder_parameter_counts(encoder)
    doc = {"mode": "online", "config": to_dict(cfg), "model": spec.to_dict(),
           "task": {**task.to_dict(), "fingerprint": task.tokenizer.fingerprint()},
           "encoder": {"name": cfg.model, "info": encoder.info.to_dict(), "method": cfg.method,
                       "bottleneck": cfg.bottleneck if cfg.method in ("hff-adapters", "adapters") else None,
                       "grad_checkpointing": cfg.grad_checkpointing, "eval_mode": True, **counts},
           "data": data_doc, "caches": {}, "environment": environment()}
    log(f"online {cfg.method} on {cfg.model}: {len(by_index)} train / {len(valid_refs)} valid utterances "
        f"({train_src.seconds / 60:.1f} min), {len(train_src)} batches/epoch; trainable encoder params "
        f"{counts['trainable_encoder_params']:,} of {counts['encoder_params']:,}; fusion {fusion.kind} over "
        f"hidden states {layers}")
    return Setup(model, task, train_src, valid_src, valid_refs, doc), cfg


def _data_doc(source: str, utts: Sequence[Utterance]) -> dict[str, Any]:
    return {"source": str(Path(source)), "utterances": len(utts), "fingerprint": intake_fingerprint(utts),
            "seconds": round(sum(utterance_seconds(u) for u in utts), 2)}


def train_online(cfg: Any, on_epoch_end: Callable[[int, dict], None] | None = None,
                 log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Online-mode training with the one loop (``train.fit``); returns the metrics of ``metrics.json``."""
    from hff_cache.train import _log, fit

    log = log or _log
    setup, resolved = prepare_online(cfg, log)
    return fit(setup, resolved, on_epoch_end=on_epoch_end, log=log)
