"""Online mode: the encoder runs inside the training step (adapters, BitFit, full fine-tuning, frozen HFF).

The batch source here replaces the cache reader and nothing else: it loads audio in threads, cuts
length-sorted batches of at most ``batch_seconds`` padded audio, runs ``encoder.prepare`` on the CPU and
yields the same ``Batch`` as the cached path, with ``inputs`` (an ``EncoderBatch``) where the cached
path has ``feats``. ``HFFModel.features`` runs the encoder on it; the training loop (``train.fit``), run
directory, checkpoints, metrics and plots are the cached path's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from hff_cache.batches.from_audio import AudioBatches, IntakeIndex, spread_subset, utterance_seconds
from hff_cache.intake.manifests import Utterance, intake_fingerprint, load_intake
from hff_cache.runtime import distributed

__all__ = ["AudioBatches", "IntakeIndex", "default_encoder_lr", "prepare_online", "spread_subset",
           "train_online", "utterance_seconds"]

# Learning rate of the encoder's own weights when --encoder-lr is not given: full fine-tuning needs a
# far smaller step than a freshly initialised head; BitFit's few biases tolerate a larger one.
ENCODER_LR = {"full": 5e-5, "bitfit": 5e-4}


def default_encoder_lr(method: str, lr: float) -> float:
    return ENCODER_LR.get(method, lr)












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
    from hff_cache.config import to_dict
    from hff_cache.encoders import load_encoder
    from hff_cache.model.adapters import enable_grad_checkpointing, encoder_parameter_counts, setup_method
    from hff_cache.model.augment import SpecAugment
    from hff_cache.model.fusion import layers_to_read
    from hff_cache.model.hff import HFFModel, ModelSpec
    from hff_cache.runs.document import EncoderRecord, RunDocument, RunError, TaskRecord
    from hff_cache.runtime.environment import environment
    from hff_cache.tasks.task import Task, load_labels, report_label_ids
    from hff_cache.training.loop import Setup

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
    available = list(range(encoder.num_hidden_states))
    if cfg.layers is not None and ms.fusion_kind is None:  # a method that reads one layer reads the last
        bad = [k for k in cfg.layers if k not in available]
        if bad:
            raise RunError(f"layers {bad} out of range: {cfg.model} has hidden states 0..{available[-1]}")
        available = list(cfg.layers)
    fusion = replace(cfg.fusion, kind=ms.fusion_kind) if ms.fusion_kind else cfg.fusion
    try:
        layers, fusion = layers_to_read(fusion, available)
    except ValueError as exc:
        raise RunError(str(exc)) from None
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
    record = EncoderRecord(name=cfg.model, info=encoder.info.to_dict(), method=cfg.method,
                           bottleneck=cfg.bottleneck if cfg.method in ("hff-adapters", "adapters") else None,
                           grad_checkpointing=cfg.grad_checkpointing, eval_mode=True, counts=counts)
    doc = RunDocument(mode="online", config=cfg, model=spec, task=TaskRecord.of(task), encoder=record,
                      data=data_doc, environment=environment(), world_size=d.world_size)
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
    from hff_cache.training.loop import _log, fit

    log = log or _log
    setup, resolved = prepare_online(cfg, log)
    return fit(setup, resolved, on_epoch_end=on_epoch_end, log=log)
