"""``hff-cache evaluate``: a run's checkpoint decoded on a cache (same encoder, layers, codec) or, for any run,
on audio through the run's encoder; metrics overall and per group of a metadata field."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hff_cache.evaluation.decoding import CTCDecoder, DecoderConfig, resolve_decoder
from hff_cache.evaluation.metrics import task_metrics
from hff_cache.runs.document import RunError, check_cache
from hff_cache.runs.loading import load_run

__all__ = ["EvalResult", "cache_name", "evaluate_model", "evaluate_run", "group_metrics", "task_metrics"]


@dataclass
class EvalResult:
    metrics: dict[str, float]
    rows: list[dict[str, str]] = field(default_factory=list)  # {"id", "ref", "hyp"}


Decode = Callable[[torch.Tensor, torch.Tensor], list[str]]  # (log-probs (B, T, V), lengths) -> texts


@torch.no_grad()
def model_outputs(model: Any, source: Any, device: torch.device | str = "cpu") -> Iterator[tuple[Any, torch.Tensor]]:
    """(batch, model output) over every batch of ``source`` (epoch 0 plan, unshuffled), in eval mode."""
    was_training = model.training
    model.eval()
    try:
        for batch in source.epoch(0):
            batch = batch.to(device)
            yield batch, model(batch)
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate_model(model: Any, source: Any, task: Any, refs: dict[str, str],
                   device: torch.device | str = "cpu",
                   gather: Callable[[Any], list[Any]] | None = None, decode: Decode | None = None) -> EvalResult:
    """Loss + decoding (greedy, or ``decode``: a beam decoder's) over every batch of ``source``.

    Under torchrun each rank decodes its share and ``gather`` (``Dist.gather``) pools every rank's rows, so
    every rank returns the metrics of the whole validation set."""
    total_loss, total_utts = 0.0, 0
    rows: list[dict[str, str]] = []
    start = time.perf_counter()
    for batch, out in model_outputs(model, source, device):
        total_loss += float(model.loss(out, batch)) * len(batch)
        total_utts += len(batch)
        hyps = decode(out, batch.lengths) if decode is not None else \
            [task.tokenizer.decode(pred) for pred in model.predict(out, batch)]
        rows += [{"id": uid, "ref": refs[uid], "hyp": hyp} for uid, hyp in zip(batch.ids, hyps, strict=True)]
    if gather is not None:
        shares = gather((rows, total_loss, total_utts))
        rows = [r for share in shares for r in share[0]]
        total_loss, total_utts = sum(s[1] for s in shares), sum(s[2] for s in shares)
    rows.sort(key=lambda r: r["id"])
    metrics = task_metrics(task.name, [r["ref"] for r in rows], [r["hyp"] for r in rows])
    metrics["loss"] = total_loss / max(total_utts, 1)
    metrics["utterances"] = total_utts
    metrics["seconds"] = time.perf_counter() - start
    return EvalResult(metrics, rows)


def cache_name(url: str) -> str:
    """Folder name for a cache's evaluation output: the last path element without ``.zarr``."""
    name = str(url).rstrip("/").rsplit("/", 1)[-1]
    return name[: -len(".zarr")] if name.endswith(".zarr") else name


def evaluate_run(run: str | Path, cache: str | None = None, checkpoint: str = "best", labels: str | None = None,
                 device: str = "auto", storage_options: dict | None = None, batch_frames: int | None = None,
                 group_by: str | None = None, data: str | None = None,
                 decoder: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate a run's checkpoint on ``cache`` or on the audio of ``data``; write
    ``RUN/eval/<name>/{hyps.jsonl,metrics.json}`` (name: the cache's or the manifest's).

    A cache must come from the same encoder/layers/codec as the run's training cache; ``data`` (a manifest,
    LibriSpeech folder, ...) runs the run's encoder, so it serves online runs too. The checkpoint's tokenizer
    must be the run's. ``group_by`` names a per-utterance metadata field (e.g. ``corpus``): the metrics of each
    of its values go under "groups". ``decoder`` holds decoder settings given for this call (``--decode``,
    ``--lm``, ...): over the run's tuned ones (``tune-decoder``), over greedy.
    """
    from hff_cache.runtime.distributed import resolve_device

    if (cache is None) == (data is None):
        raise ValueError("evaluate needs --cache or --data (one of them)")
    loaded = load_run(run, checkpoint, with_encoder=data is not None)
    label_rows = evaluation_labels(loaded, labels)
    dev = resolve_device(device)
    if cache is not None:
        index, source, data_ = cache_source(loaded, cache, label_rows, storage_options, batch_frames)
        name, where = cache_name(cache), {"cache": str(cache), "cache_id": index.cache_id}
    else:
        index, source, data_ = audio_source(loaded, str(data), label_rows)
        name, where = f"{Path(str(data)).stem}", {"data": str(data)}
    groups_of = _groups_of(index, group_by) if group_by else None
    loaded.model.to(dev)
    dec = run_decoder(loaded, decoder or {})
    decode = None if dec.kind == "greedy" else CTCDecoder(dec, loaded.task.tokenizer).decode
    refs = dict(zip(data_.ids, data_.refs, strict=True))
    result = evaluate_model(loaded.model, source, loaded.task, refs, dev, decode=decode)
    summary = {"run": str(run), **where, "checkpoint": checkpoint, "task": loaded.task.name, **result.metrics,
               "decoder": dec.to_dict(), "hyps": str(loaded.run.eval_dir(name) / "hyps.jsonl")}
    if groups_of is not None:
        summary["group_by"] = group_by
        summary["groups"] = group_metrics(loaded.task.name, result.rows, groups_of)
    loaded.run.write_evaluation(name, result.rows, summary)
    return summary


def evaluation_labels(loaded: Any, labels: str | None = None) -> dict[str, dict[str, Any]] | None:
    """The label rows to score a run on: ``labels`` if given, else the run's validation labels, else its labels
    (None: the cache's own texts and metadata)."""
    from hff_cache.tasks.task import load_labels

    path = labels if labels is not None else (loaded.config.valid_labels or loaded.config.labels)
    return load_labels(path) if path else None


def run_decoder(loaded: Any, given: dict[str, Any]) -> DecoderConfig:
    """The decoder settings for ``loaded``: ``given`` over the run's tuned ones; beam search needs a CTC head."""
    dec = resolve_decoder(given, loaded.run.read_decoder())
    if dec.kind != "greedy" and loaded.task.kind != "ctc":
        raise RunError(f"--decode {dec.kind} needs a CTC run; {loaded.run} is a {loaded.task.name} classifier")
    return dec


def cache_source(loaded: Any, cache: str, labels: Any, storage_options: dict | None,
                  batch_frames: int | None) -> tuple[Any, Any, Any]:
    from hff_cache.batches.from_cache import CacheBatches
    from hff_cache.cache import CacheReader

    cfg, doc, task = loaded.config, loaded.doc, loaded.task
    if "train" not in doc.caches:
        raise RunError(f"{loaded.run} was trained online, not from a cache; it has no cache to compare {cache} "
                       "with (evaluate it on audio: --data MANIFEST)")
    reader = CacheReader(cache, storage_options=storage_options)
    check_cache(reader, doc.caches["train"], what=f"evaluation cache {cache}")
    data = task.prepare(reader, labels, split="evaluation")
    source = CacheBatches(reader, data, ctc=task.kind == "ctc", layers=loaded.model.spec.cached_layers,
                          batch_frames=batch_frames or cfg.batch_frames, max_batch_utts=cfg.max_batch_utts,
                          shuffle=False, in_memory=False, num_workers=cfg.num_workers, prefetch=cfg.prefetch)
    return reader, source, data


def audio_source(loaded: Any, manifest: str, labels: Any) -> tuple[Any, Any, Any]:
    from hff_cache.batches.from_audio import AudioBatches, IntakeIndex
    from hff_cache.intake.manifests import load_intake

    cfg, task = loaded.config, loaded.task
    index = IntakeIndex(load_intake(manifest), manifest)
    data = task.prepare(index, labels, split="evaluation")
    source = AudioBatches([index.utts[i] for i in data.indices], loaded.model.encoder, targets=data.targets,
                          ctc=task.kind == "ctc", batch_seconds=cfg.batch_seconds, max_batch_utts=cfg.max_batch_utts,
                          shuffle=False, num_workers=cfg.num_workers, prefetch=cfg.prefetch)
    return index, source, data


MISSING_GROUP = "(none)"  # the group of utterances whose metadata lacks the field


def _groups_of(reader: Any, group_by: str) -> dict[str, str]:
    """{utterance id: its value of the metadata field ``group_by``}; refused when no utterance has it."""
    values = {uid: meta.get(group_by) for uid, meta in zip(reader.ids, reader.metas, strict=True)}
    if all(v is None for v in values.values()):
        fields = sorted({k for meta in reader.metas for k in meta})
        raise RunError(f"--group-by {group_by}: no utterance of {reader.url} has that metadata field "
                       f"(fields: {', '.join(fields) or 'none'})")
    return {uid: MISSING_GROUP if v is None else str(v) for uid, v in values.items()}


def group_metrics(task_name: str, rows: list[dict[str, str]], groups_of: dict[str, str]) -> dict[str, Any]:
    """The task's metrics over the rows of each group (sorted by value), with each group's utterance count."""
    by_group: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_group.setdefault(groups_of[row["id"]], []).append(row)
    return {value: {**task_metrics(task_name, [r["ref"] for r in members], [r["hyp"] for r in members]),
                    "utterances": len(members)}
            for value, members in sorted(by_group.items())}
