"""Cached mode: open the caches, build the task and the model, then run the one loop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hff_cache.batches.from_cache import CacheBatches
from hff_cache.cache import CacheReader
from hff_cache.config import TrainConfig
from hff_cache.runs.document import CacheRecord, RunDocument, RunError, TaskRecord, check_cache, storage_options_for
from hff_cache.runtime import distributed
from hff_cache.runtime.environment import environment
from hff_cache.tasks.task import Task
from hff_cache.training.loop import Setup, _log, fit
from hff_cache.training.setup import Labels, build_model, load_run_labels, read_layers

__all__ = ["CacheSources", "cache_sources", "open_caches", "prepare", "train"]


def open_caches(cfg: TrainConfig) -> tuple[CacheReader, CacheReader | None]:
    """The training cache and the validation cache, which must come from the same encoder, layers and codec."""
    if not cfg.cache:
        raise RunError("no training cache given (--cache)")
    reader = CacheReader(cfg.cache, storage_options=storage_options_for(cfg.cache, cfg))
    if not cfg.valid_cache:
        return reader, None
    valid = CacheReader(cfg.valid_cache, storage_options=storage_options_for(cfg.valid_cache, cfg))
    check_cache(valid, CacheRecord.of(reader, len(reader)), what=f"validation cache {cfg.valid_cache}")
    return reader, valid


def _stored_layers(cfg: TrainConfig, reader: CacheReader) -> list[int]:
    layers = list(cfg.layers) if cfg.layers is not None else list(reader.meta.layers)
    missing = [k for k in layers if k not in reader.meta.layers]
    if missing or not layers:
        raise RunError(f"layers {missing or layers} are not stored in {cfg.cache} (stored: {reader.meta.layers})")
    return layers


@dataclass
class CacheSources:
    """The batch sources over the training (and validation) cache, and what the run document records."""

    train: CacheBatches
    valid: CacheBatches | None
    valid_refs: dict[str, str]
    records: dict[str, CacheRecord]


def cache_sources(cfg: TrainConfig, task: Task, layers: list[int], readers: tuple[CacheReader, CacheReader | None],
                  labels: tuple[Labels | None, Labels | None]) -> CacheSources:
    """Batches of the hidden states ``layers`` over the labelled utterances of both caches."""
    (reader, valid_reader), (train_labels, valid_labels) = readers, labels
    train_data = task.prepare(reader, train_labels, "train")
    d = distributed.current()  # under torchrun each rank reads only its share of both caches
    # compressed residency decodes each batch where the model runs (the GPU when training there)
    common = dict(ctc=task.kind == "ctc", layers=layers, batch_frames=cfg.batch_frames,
                  max_batch_utts=cfg.max_batch_utts, in_memory=cfg.in_memory, num_workers=cfg.num_workers,
                  prefetch=cfg.prefetch, loader_thread=cfg.loader_thread, rank=d.rank, world_size=d.world_size,
                  local_world_size=d.local_world_size,
                  device=distributed.resolve_device(cfg.device))
    train_src = CacheBatches(reader, train_data, shuffle=True, seed=cfg.seed, shuffle_frames=cfg.shuffle_frames,
                             **common)
    sources = CacheSources(train_src, None, {}, {"train": CacheRecord.of(reader, len(train_data))})
    if valid_reader is not None:
        valid_data = task.prepare(valid_reader, valid_labels, "valid")
        sources.valid = CacheBatches(valid_reader, valid_data, shuffle=False, **common)
        sources.valid_refs = dict(zip(valid_data.ids, valid_data.refs, strict=True))
        sources.records["valid"] = CacheRecord.of(valid_reader, len(valid_data))
    return sources


def prepare(cfg: TrainConfig, log: Callable[[str], None] = _log) -> Setup:
    """Everything ``fit`` needs for a run from the cache; the encoder is never loaded."""
    readers = open_caches(cfg)
    reader = readers[0]
    labels = load_run_labels(cfg, *readers)
    layers, fusion = read_layers(cfg.fusion, _stored_layers(cfg, reader))
    task = Task.from_labels(cfg.task, reader, labels[0], cfg.units)
    src = cache_sources(cfg, task, layers, readers, labels)
    spec, model = build_model(cfg, task, fusion, layers, reader.meta.encoder.hidden_size)
    if cfg.normalize == "stats":
        stats = reader.layer_stats(layers)
        if stats is None:
            raise RunError(f"{cfg.cache} has no layer statistics; use --normalize none")
        model.set_stats(*stats)
    doc = RunDocument(mode="cached", config=cfg, model=spec, task=TaskRecord.of(task), caches=src.records,
                      environment=environment(), world_size=distributed.current().world_size)
    log(f"task {task.name}: {len(src.train.data)} train / {len(src.valid_refs)} valid utterances, vocabulary "
        f"{task.tokenizer.vocab_size}; {len(src.train)} batches/epoch; in_memory={src.train.in_memory}")
    return Setup(model, task, src.train, src.valid, src.valid_refs, doc)


def train(cfg: TrainConfig, on_epoch_end: Callable[[int, dict], None] | None = None,
          log: Callable[[str], None] = _log) -> dict[str, Any]:
    """Cached-mode training: returns the metrics written to ``metrics.json``."""
    setup = prepare(cfg, log)
    return fit(setup, cfg, on_epoch_end=on_epoch_end, log=log)
