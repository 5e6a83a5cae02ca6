"""Metrics (WER/CER via jiwer, PER, accuracy), greedy decoding, and ``hff-cache evaluate``."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jiwer
import torch

__all__ = ["EvalResult", "accuracy", "cache_name", "error_rates", "evaluate_model", "evaluate_run", "format_table",
           "summarize_runs", "task_metrics"]


def error_rates(refs: Sequence[str], hyps: Sequence[str]) -> dict[str, float]:
    """Corpus WER and CER in percent (jiwer: edit operations summed over all utterances)."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    if not refs:
        return {"wer": math.nan, "cer": math.nan}
    refs, hyps = list(refs), list(hyps)
    return {"wer": 100.0 * jiwer.wer(refs, hyps), "cer": 100.0 * jiwer.cer(refs, hyps)}


def accuracy(refs: Sequence[Any], hyps: Sequence[Any]) -> float:
    """Percent of exact matches."""
    if not refs:
        return math.nan
    return 100.0 * sum(r == h for r, h in zip(refs, hyps, strict=True)) / len(refs)


def task_metrics(task_name: str, refs: Sequence[str], hyps: Sequence[str]) -> dict[str, float]:
    """asr: wer + cer; phones: per (WER over phone tokens); classify: accuracy."""
    if task_name == "asr":
        return error_rates(refs, hyps)
    if task_name == "phones":
        return {"per": error_rates(refs, hyps)["wer"]}
    return {"accuracy": accuracy(refs, hyps)}


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
    from hff_cache.cache import CacheReader
    from hff_cache.distributed import resolve_device
    from hff_cache.loader import CacheBatches
    from hff_cache.tasks import load_labels
    from hff_cache.train import RunError, check_cache, load_run

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


def summarize_runs(runs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """One row per run directory (or probe folder) from its metrics.json / probe.csv, for tables."""
    import csv

    rows: list[dict[str, Any]] = []
    for run in map(Path, runs):
        if (run / "probe.csv").exists():
            with (run / "probe.csv").open() as f:
                for r in csv.DictReader(f):
                    rows.append({"run": f"{run.name}/layer_{int(r['layer']):02d}", "task": "probe",
                                 "fusion": f"single:{r['layer']}",
                                 **{k: float(v) for k, v in r.items() if k != "layer" and v != ""}})
            continue
        path = run / "metrics.json"
        if not path.exists():
            rows.append({"run": run.name, "task": "missing"})
            continue
        m = json.loads(path.read_text())
        rows.append({"run": run.name, "task": m.get("task"), "fusion": m.get("fusion"),
                     **{k: m[k] for k in ("wer", "cer", "per", "accuracy", "best_epoch", "trainable_params",
                                          "epoch_seconds", "step_time_ms") if m.get(k) is not None}})
    return rows


def format_table(rows: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    cols = ["run", "task", "fusion", "wer", "cer", "per", "accuracy", "best_epoch", "trainable_params",
            "epoch_seconds"]
    cols = [c for c in cols if any(c in r for r in rows)]

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.0f}" if v >= 1000 else f"{v:.2f}"
        return "" if v is None else str(v)

    table = [cols] + [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    if markdown:
        lines = ["| " + " | ".join(row[i].ljust(widths[i]) for i in range(len(cols))) + " |" for row in table]
        lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
        return "\n".join(lines)
    return "\n".join("  ".join(row[i].rjust(widths[i]) if i else row[i].ljust(widths[i])
                               for i in range(len(cols))) for row in table)
