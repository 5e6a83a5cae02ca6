"""Cached mode: open the caches, build the task and the model, then run the one loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from hff_cache.config import TrainConfig, to_dict
from hff_cache.model.augment import SpecAugment
from hff_cache.model.fusion import layers_to_read
from hff_cache.model.hff import HFFModel, ModelSpec
from hff_cache.runs.document import CacheRecord, RunDocument, RunError, TaskRecord, check_cache, storage_options_for
from hff_cache.runtime import distributed
from hff_cache.runtime.environment import environment
from hff_cache.tasks.task import Task
from hff_cache.training.loop import Setup, _log, fit


def prepare(cfg: TrainConfig, log: Callable[[str], None] = _log) -> Setup:
    from hff_cache.batches.from_cache import CacheBatches
    from hff_cache.cache import CacheReader
    from hff_cache.tasks.task import load_labels, report_label_ids

    if not cfg.cache:
        raise RunError("no training cache given (--cache)")
    reader = CacheReader(cfg.cache, storage_options=storage_options_for(cfg.cache, cfg))
    valid_reader = (CacheReader(cfg.valid_cache, storage_options=storage_options_for(cfg.valid_cache, cfg))
                    if cfg.valid_cache else None)
    if valid_reader is not None:
        check_cache(valid_reader, CacheRecord.of(reader, len(reader)), what=f"validation cache {cfg.valid_cache}")
    labels = load_labels(cfg.labels) if cfg.labels else None
    valid_labels = load_labels(cfg.valid_labels) if cfg.valid_labels else labels
    if cfg.valid_labels:  # one file per cache (a split kept in label files): each is checked against its own
        for rows, r in ((labels, reader), (valid_labels, valid_reader)):
            if rows is not None:
                report_label_ids(rows, [r])
    elif labels is not None:
        report_label_ids(labels, [r for r in (reader, valid_reader) if r is not None])
    layers = list(cfg.layers) if cfg.layers is not None else list(reader.meta.layers)
    missing = [k for k in layers if k not in reader.meta.layers]
    if missing or not layers:
        raise RunError(f"layers {missing or layers} are not stored in {cfg.cache} "
                       f"(stored: {reader.meta.layers})")
    try:
        layers, fusion = layers_to_read(cfg.fusion, layers)
    except ValueError as exc:
        raise RunError(str(exc)) from None
    task = Task.from_labels(cfg.task, reader, labels)
    train_data = task.prepare(reader, labels, "train")
    ctc = task.kind == "ctc"
    d = distributed.current()  # under torchrun each rank reads only its share of both caches
    common = dict(ctc=ctc, layers=layers, batch_frames=cfg.batch_frames, max_batch_utts=cfg.max_batch_utts,
                  in_memory=cfg.in_memory, num_workers=cfg.num_workers, prefetch=cfg.prefetch, rank=d.rank,
                  world_size=d.world_size, local_world_size=d.local_world_size)
    train_src = CacheBatches(reader, train_data, shuffle=True, seed=cfg.seed,
                             shuffle_frames=cfg.shuffle_frames, **common)
    valid_src, valid_refs, valid_n = None, {}, 0
    if valid_reader is not None:
        valid_data = task.prepare(valid_reader, valid_labels, "valid")
        valid_src = CacheBatches(valid_reader, valid_data, shuffle=False, **common)
        valid_refs, valid_n = dict(zip(valid_data.ids, valid_data.refs, strict=True)), len(valid_data)
    torch.manual_seed(cfg.seed)
    spec = ModelSpec(fusion=to_dict(fusion), num_layers=len(layers),
                     hidden_size=int(reader.meta.encoder.hidden_size), head="ctc" if ctc else "classify",
                     vocab_size=task.tokenizer.vocab_size, layers=layers, pooling=cfg.pooling,
                     normalize=cfg.normalize)
    augment = SpecAugment(cfg.spec_time_masks, cfg.spec_time_width, cfg.spec_feat_masks, cfg.spec_feat_width)
    model = HFFModel(spec, encoder=None, augment=augment)
    if cfg.normalize == "stats":
        stats = reader.layer_stats(layers)
        if stats is None:
            raise RunError(f"{cfg.cache} has no layer statistics; use --normalize none")
        model.set_stats(*stats)
    caches = {"train": CacheRecord.of(reader, len(train_data))}
    if valid_reader is not None:
        caches["valid"] = CacheRecord.of(valid_reader, valid_n)
    doc = RunDocument(mode="cached", config=cfg, model=spec, task=TaskRecord.of(task), caches=caches,
                      environment=environment(), world_size=d.world_size)
    log(f"task {task.name}: {len(train_data)} train / {valid_n} valid utterances, vocabulary "
        f"{task.tokenizer.vocab_size}; {len(train_src)} batches/epoch; in_memory={train_src.in_memory}")
    return Setup(model, task, train_src, valid_src, valid_refs, doc)


def train(cfg: TrainConfig, on_epoch_end: Callable[[int, dict], None] | None = None,
          log: Callable[[str], None] = _log) -> dict[str, Any]:
    """Cached-mode training: returns the metrics written to ``metrics.json``."""
    setup = prepare(cfg, log)
    return fit(setup, cfg, on_epoch_end=on_epoch_end, log=log)
