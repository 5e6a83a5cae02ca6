"""Metrics (WER/CER via jiwer, PER, accuracy), greedy decoding, and ``hff-cache evaluate``."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hff_cache.evaluation.metrics import task_metrics

__all__ = ["EvalResult", "cache_name", "evaluate_model", "evaluate_run", "task_metrics"]








@dataclass
class EvalResult:
    metrics: dict[str, float]
    rows: list[dict[str, str]] = field(default_factory=list)  # {"id", "ref", "hyp"}


@torch.no_grad()
def evaluate_model(model: Any, source: Any, task: Any, refs: dict[str, str],
                   device: torch.device | str = "cpu",
                   gather: Callable[[Any], list[Any]] | None = None) -> EvalResult:
    """Loss + greedy decoding over every batch of ``source`` (epoch 0 plan, unshuffled).

    Under torchrun each rank decodes its share and ``gather`` (``Dist.gather``) pools every rank's rows, so
    every rank returns the metrics of the whole validation set."""
    was_training = model.training
    model.eval()
    total_loss, total_utts = 0.0, 0
    rows: list[dict[str, str]] = []
    start = time.perf_counter()
    try:
        for batch in source.epoch(0):
            batch = batch.to(device)
            out = model(batch)
            loss = float(model.loss(out, batch))
            total_loss += loss * len(batch)
            total_utts += len(batch)
            for uid, pred in zip(batch.ids, model.predict(out, batch), strict=True):
                hyp = task.tokenizer.decode(pred)
                rows.append({"id": uid, "ref": refs[uid], "hyp": hyp})
    finally:
        model.train(was_training)
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


def evaluate_run(run: str | Path, cache: str, checkpoint: str = "best", labels: str | None = None,
                 device: str = "auto", storage_options: dict | None = None,
                 batch_frames: int | None = None) -> dict[str, Any]:
    """Evaluate a run's checkpoint on ``cache``; write ``RUN/eval/<cache-name>/{hyps.jsonl,metrics.json}``.

    The cache must come from the same encoder/layers/codec as the run's training cache, and the
    checkpoint's tokenizer must be the run's (both refused otherwise).
    """
    from hff_cache.batches.from_cache import CacheBatches
    from hff_cache.cache import CacheReader
    from hff_cache.runs.directory import RunError, check_cache, load_run
    from hff_cache.runtime.distributed import resolve_device
    from hff_cache.tasks.task import load_labels

    run = Path(run)
    cfg, task, model, doc = load_run(run, checkpoint)
    if "train" not in doc.get("caches", {}):
        raise RunError(f"{run} was trained online, not from a cache; it has no cache to compare {cache} "
                       "with (use `hff-cache transcribe`)")
    reader = CacheReader(cache, storage_options=storage_options)
    check_cache(reader, doc["caches"]["train"], what=f"evaluation cache {cache}")
    labels_path = labels if labels is not None else cfg.labels
    label_rows = load_labels(labels_path) if labels_path else None
    data = task.prepare(reader, label_rows, split="evaluation")
    dev = resolve_device(device)
    source = CacheBatches(reader, data, ctc=task.kind == "ctc", layers=model.spec.layers,
                          batch_frames=batch_frames or cfg.batch_frames, max_batch_utts=cfg.max_batch_utts,
                          shuffle=False, in_memory=False, num_workers=cfg.num_workers, prefetch=cfg.prefetch)
    model.to(dev)
    result = evaluate_model(model, source, task, dict(zip(data.ids, data.refs, strict=True)), dev)
    out = run / "eval" / cache_name(cache)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "hyps.jsonl").open("w", encoding="utf-8") as f:
        for row in result.rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    summary = {"run": str(run), "cache": str(cache), "checkpoint": checkpoint, "task": task.name,
               "cache_id": reader.cache_id, **result.metrics, "hyps": str(out / "hyps.jsonl")}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    return summary




