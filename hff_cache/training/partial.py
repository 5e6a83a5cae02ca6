"""Partial caching (``train --online --from-layer K``): h_0..h_K from a cache, encoder layers K+1..L in the loop.

Everything below the lowest adapter is frozen and the same every epoch, so it is read like any cached hidden
state instead of recomputed. The batches are the cached path's (``CacheBatches`` over the hidden states
``ModelSpec.cached_layers``), the model is the online path's (the encoder with the method's adapters in layers
K+1..L only), and ``HFFModel`` runs the top layers on the cached h_K. The loop, checkpoints, resume and DDP are
the one loop's; ``transcribe`` runs the whole encoder (no adapter below K, so the same features).

K = L trains no encoder weight (the cached ``hierarchical`` model, with the top of the encoder loaded); K = 0
puts adapters in every layer and skips only the front end (CNN or convolutions). Training frees the weights
below K (``SpeechEncoder.release_below``); evaluation and transcription load the whole encoder.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hff_cache.cache import CacheReader
from hff_cache.config import TrainConfig
from hff_cache.encoders import SpeechEncoder
from hff_cache.runs.document import EncoderRecord, RunDocument, RunError, TaskRecord
from hff_cache.runtime import distributed
from hff_cache.runtime.environment import environment
from hff_cache.tasks.task import Task
from hff_cache.training.cached import cache_sources, open_caches
from hff_cache.training.loop import Setup, _log, fit
from hff_cache.training.online import online_encoder
from hff_cache.training.setup import build_model, load_run_labels

__all__ = ["check_partial_cache", "prepare_partial", "train_partial"]

# EncoderInfo fields that must agree for cached hidden states to be the loaded encoder's own
IDENTITY = ("model_class", "file_hash", "hidden_size", "num_hidden_states", "sample_rate", "frame_rate")


def check_partial_cache(reader: CacheReader, encoder: SpeechEncoder, needed: list[int], what: str) -> None:
    """Refuse a cache that is not this encoder's hidden states ``needed``, naming every difference."""
    cached, loaded = reader.meta.encoder.to_dict(), encoder.info.to_dict()
    diffs = [f"{key} {cached.get(key)!r} (the encoder: {loaded.get(key)!r})" for key in IDENTITY
             if cached.get(key) != loaded.get(key)]
    if cached.get("input_window"):
        diffs.append(f"it was extracted on a {cached['input_window']} window (partial caching needs the real length)")
    missing = [k for k in needed if k not in reader.meta.layers]
    if missing:
        diffs.append(f"hidden states {missing} are not stored (stored: {list(reader.meta.layers)}; extract "
                     f"--layers 0-{max(needed)})")
    if diffs:
        raise RunError(f"{what} {reader.url} does not fit {encoder.info.name} from layer {max(needed)}: "
                       + "; ".join(diffs))


def prepare_partial(cfg: TrainConfig, log: Callable[[str], None] = _log) -> tuple[Setup, TrainConfig]:
    """(``Setup``, resolved ``TrainConfig``) for ``--from-layer``: the caches, the encoder's top, the model."""
    if cfg.normalize != "none":
        raise RunError("--normalize stats standardises cached features only; with --from-layer the top "
                       "layers' states come from the encoder (use --normalize none)")
    readers = open_caches(cfg)
    labels = load_run_labels(cfg, *readers)
    task = Task.from_labels(cfg.task, readers[0], labels[0], cfg.units)
    enc = online_encoder(cfg)
    cfg, encoder = enc.cfg, enc.encoder
    if encoder.partial_support:
        raise RunError(f"--from-layer: {cfg.model} cannot run from a cached hidden state ({encoder.partial_support})")
    top = encoder.num_hidden_states - 1
    if not 0 <= cfg.from_layer <= top:
        raise RunError(f"--from-layer {cfg.from_layer}: {cfg.model} has hidden states 0..{top}")
    spec, model = build_model(cfg, task, cfg.fusion, enc.layers, encoder.info.hidden_size, encoder)
    for reader, what in zip(readers, ("training cache", "validation cache"), strict=True):
        if reader is not None:
            check_partial_cache(reader, encoder, spec.cached_layers, what)
    src = cache_sources(cfg, task, spec.cached_layers, readers, labels)
    encoder.release_below(cfg.from_layer)  # the front end and layers 1..K never run here: free their weights
    record = EncoderRecord.of(cfg, encoder)
    counts = record.counts
    doc = RunDocument(mode="online", config=cfg, model=spec, task=TaskRecord.of(task), caches=src.records,
                      encoder=record, environment=environment(), world_size=distributed.current().world_size)
    log(f"partial caching, {cfg.method} on {cfg.model}: hidden states {spec.cached_layers} from {cfg.cache}, "
        f"layers {cfg.from_layer + 1}..{top} in the loop; {len(src.train.data)} train / {len(src.valid_refs)} "
        f"valid utterances, {len(src.train)} batches/epoch; trainable encoder params "
        f"{counts['trainable_encoder_params']:,} of {counts['encoder_params']:,}")
    return Setup(model, task, src.train, src.valid, src.valid_refs, doc), cfg


def train_partial(cfg: TrainConfig, on_epoch_end: Callable[[int, dict], None] | None = None,
                  log: Callable[[str], None] = _log) -> dict[str, Any]:
    """Partial-caching training with the one loop; returns the metrics of ``metrics.json``."""
    setup, resolved = prepare_partial(cfg, log)
    return fit(setup, resolved, on_epoch_end=on_epoch_end, log=log)
