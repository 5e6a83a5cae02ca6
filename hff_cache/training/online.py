"""Online mode: the encoder runs inside the training step (adapters, BitFit, full fine-tuning, frozen HFF).

The batch source replaces the cache reader and nothing else: ``batches.from_audio.AudioBatches`` loads audio
in threads, cuts length-sorted batches of at most ``batch_seconds`` padded audio, runs ``encoder.prepare`` on
the CPU and yields the same ``Batch`` as the cached path, with ``inputs`` where the cached path has ``feats``.
``HFFModel.features`` runs the encoder on it; the loop (``training.loop.fit``), run directory, checkpoints,
metrics and plots are the cached path's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from hff_cache.batches.from_audio import AudioBatches, IntakeIndex, utterance_seconds
from hff_cache.config import TrainConfig
from hff_cache.encoders import SpeechEncoder, load_encoder
from hff_cache.intake.manifests import Utterance, intake_fingerprint, load_intake
from hff_cache.intake.selection import spread_subset
from hff_cache.model.adapters import METHODS, enable_grad_checkpointing, setup_method
from hff_cache.runs.document import EncoderRecord, RunDocument, RunError, TaskRecord
from hff_cache.runtime import distributed
from hff_cache.runtime.environment import environment
from hff_cache.tasks.task import Task, TaskData
from hff_cache.training.loop import Setup, _log, fit
from hff_cache.training.setup import build_model, load_run_labels, read_layers

__all__ = ["OnlineEncoder", "default_encoder_lr", "online_encoder", "prepare_online", "train_online"]


def default_encoder_lr(method: str, lr: float) -> float:
    """The LR of the encoder's own weights when --encoder-lr is not given: the method's, else the head's."""
    return METHODS[method].encoder_lr or lr


def _intake(source: str, limit: int | None, what: str) -> IntakeIndex:
    utts = spread_subset(load_intake(source), limit)
    if not utts:
        raise ValueError(f"{what} {source}: no utterances")
    return IntakeIndex(utts, str(source))


@dataclass
class OnlineEncoder:
    """The encoder with the method set up, and what it implies for the model and the resolved config."""

    encoder: SpeechEncoder
    layers: list[int]
    cfg: TrainConfig  # resolved: fusion kind, layers and encoder LR as the method pins them


def online_encoder(cfg: TrainConfig) -> OnlineEncoder:
    encoder = load_encoder(cfg.model, "cpu")  # may consume random numbers (module init before loading)
    torch.manual_seed(cfg.seed)
    ms = setup_method(encoder, cfg.method, cfg.bottleneck, cfg.from_layer)
    if cfg.grad_checkpointing:
        enable_grad_checkpointing(encoder)
    available = list(range(encoder.num_hidden_states))
    if cfg.layers is not None and ms.fusion_kind is None:  # a method that reads one layer reads the last
        bad = [k for k in cfg.layers if k not in available]
        if bad:
            raise RunError(f"layers {bad} out of range: {cfg.model} has hidden states 0..{available[-1]}")
        available = list(cfg.layers)
    fusion = replace(cfg.fusion, kind=ms.fusion_kind) if ms.fusion_kind else cfg.fusion
    layers, fusion = read_layers(fusion, available)
    encoder_lr = cfg.encoder_lr if cfg.encoder_lr is not None else default_encoder_lr(cfg.method, cfg.lr)
    return OnlineEncoder(encoder, layers, replace(cfg, fusion=fusion, layers=layers, encoder_lr=encoder_lr))


def _sources(cfg: TrainConfig, encoder: SpeechEncoder, task: Task, train: tuple[IntakeIndex, TaskData],
             valid: tuple[IntakeIndex, TaskData] | None) -> tuple[AudioBatches, AudioBatches | None, dict]:
    d = distributed.current()  # under torchrun each rank loads only its share of the audio
    common = dict(ctc=task.kind == "ctc", batch_seconds=cfg.batch_seconds, max_batch_utts=cfg.max_batch_utts,
                  num_workers=cfg.num_workers, prefetch=cfg.prefetch, rank=d.rank, world_size=d.world_size)
    index, data = train
    utts = [index.utts[i] for i in data.indices]
    train_src = AudioBatches(utts, encoder, targets=data.targets, shuffle=True, seed=cfg.seed,
                             shuffle_seconds=cfg.shuffle_frames / encoder.info.frame_rate, **common)
    data_doc = {"train": _data_doc(cfg.data, utts)}
    if valid is None:
        return train_src, None, data_doc
    index, data = valid
    utts = [index.utts[i] for i in data.indices]
    data_doc["valid"] = _data_doc(str(cfg.valid_data), utts)
    return train_src, AudioBatches(utts, encoder, targets=data.targets, shuffle=False, **common), data_doc


def prepare_online(cfg: TrainConfig, log: Callable[[str], None] = _log) -> tuple[Setup, TrainConfig]:
    """Build (``Setup``, resolved ``TrainConfig``) for ``cfg.online``: encoder, method, task, sources.

    The resolved config pins what the method implies (fusion ``last`` and the last hidden state for
    adapters/bitfit/full, the encoder LR), so config.json says what ran and --resume compares it.
    """
    if not cfg.model or not cfg.data:
        raise RunError("online training needs --model and --data")
    if cfg.normalize != "none":
        raise RunError("--normalize stats needs a cache's layer statistics; online mode has none "
                       "(use --normalize none)")
    train_index = _intake(cfg.data, cfg.max_train_utts, "training data")
    valid_index = _intake(cfg.valid_data, cfg.max_valid_utts, "validation data") if cfg.valid_data else None
    labels, valid_labels = load_run_labels(cfg, train_index, valid_index)
    task = Task.from_labels(cfg.task, train_index, labels, cfg.units)
    train = (train_index, task.prepare(train_index, labels, "train"))
    valid = (valid_index, task.prepare(valid_index, valid_labels, "valid")) if valid_index is not None else None
    enc = online_encoder(cfg)
    cfg = enc.cfg
    spec, model = build_model(cfg, task, cfg.fusion, enc.layers, enc.encoder.info.hidden_size, enc.encoder)
    train_src, valid_src, data_doc = _sources(cfg, enc.encoder, task, train, valid)
    valid_refs = dict(zip(valid[1].ids, valid[1].refs, strict=True)) if valid is not None else {}
    record = EncoderRecord.of(cfg, enc.encoder)
    counts = record.counts
    doc = RunDocument(mode="online", config=cfg, model=spec, task=TaskRecord.of(task), encoder=record,
                      data=data_doc, environment=environment(), world_size=distributed.current().world_size)
    log(f"online {cfg.method} on {cfg.model}: {len(train[1])} train / {len(valid_refs)} valid utterances "
        f"({train_src.seconds / 60:.1f} min), {len(train_src)} batches/epoch; trainable encoder params "
        f"{counts['trainable_encoder_params']:,} of {counts['encoder_params']:,}; fusion {cfg.fusion.kind} over "
        f"hidden states {enc.layers}")
    return Setup(model, task, train_src, valid_src, valid_refs, doc), cfg


def _data_doc(source: str, utts: Sequence[Utterance]) -> dict[str, Any]:
    return {"source": str(Path(source)), "utterances": len(utts), "fingerprint": intake_fingerprint(utts),
            "seconds": round(sum(utterance_seconds(u) for u in utts), 2)}


def train_online(cfg: TrainConfig, on_epoch_end: Callable[[int, dict], None] | None = None,
                 log: Callable[[str], None] = _log) -> dict[str, Any]:
    """Online-mode training with the one loop (``training.loop.fit``); returns the metrics of ``metrics.json``."""
    setup, resolved = prepare_online(cfg, log)
    return fit(setup, resolved, on_epoch_end=on_epoch_end, log=log)
