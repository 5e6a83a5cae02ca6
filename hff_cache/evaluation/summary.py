"""One table of the metrics of several runs and probes (``hff-cache summary``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hff_cache.runs.directory import RunDir, RunError


def summarize_runs(runs: Sequence[str | Path], evaluation: str | None = None) -> list[dict[str, Any]]:
    """One row per run directory (or probe folder) from its metrics.json / probe.csv, for tables.

    ``evaluation`` names an evaluation folder (``RUN/eval/<name>/metrics.json``, e.g. ``valid``): its metrics per
    group (``evaluate --group-by``) become columns such as ``wer[librispeech]``."""
    rows: list[dict[str, Any]] = []
    extraction: dict[str, float | None] = {}  # per training cache: runs of one cache open it once
    for run in map(Path, runs):
        if (run / "probe.csv").exists():
            rows += _probe_rows(run)
            continue
        try:
            m = RunDir(run).read_metrics()
        except RunError:  # a damaged metrics.json: one row says so, the others still print
            m = {"task": "damaged"}
        if m is None:
            rows.append({"run": run.name, "task": "missing"})
            continue
        row = {"run": run.name, "task": m.get("task"), "fusion": m.get("fusion"), "method": m.get("method"),
               **{k: m[k] for k in ("wer", "cer", "per", "accuracy", "best_epoch", "trainable_params",
                                    "trainable_encoder_params", "epoch_seconds", "step_time_ms", "peak_rss_mb")
                  if m.get(k) is not None}}
        row.update(_train_seconds(run, extraction))
        if evaluation:
            row.update(_group_columns(run, evaluation))
        rows.append(row)
    return rows


def _probe_rows(run: Path) -> list[dict[str, Any]]:
    import csv

    with (run / "probe.csv").open() as f:
        return [{"run": f"{run.name}/layer_{int(r['layer']):02d}", "task": "probe", "fusion": f"single:{r['layer']}",
                 **{k: float(v) for k, v in r.items() if k != "layer" and v != ""}} for r in csv.DictReader(f)]


def _train_seconds(run: Path, extraction: dict[str, float | None]) -> dict[str, float]:
    """Wall seconds of every epoch in log.csv (validation included), plus the training cache's extraction time
    where its shard records hold it: what the run cost from audio to model. ``extraction`` remembers each
    cache's time across the runs of one summary."""
    rd = RunDir(run)
    try:
        seconds = sum(float(r["seconds"]) for r in rd.read_log() if r.get("seconds"))
    except (OSError, ValueError, KeyError):
        return {}
    out = {"train_seconds": seconds}
    extract = _extraction_seconds(rd, extraction)
    if extract is not None:
        out["extract_seconds"] = extract
        out["total_seconds"] = seconds + extract
    return out


def _extraction_seconds(rd: RunDir, known: dict[str, float | None]) -> float | None:
    """The training cache's extraction wall time: the sum over its shards' completion records (each shard's
    completing run); 0 for an online run; None when the cache cannot be opened or a record lacks it (caches of
    older versions)."""
    from hff_cache.cache import CacheFormatError, CacheReader

    try:
        doc = rd.read_document()
    except RunError:
        return None
    train = doc.caches.get("train")
    if train is None:  # an online run reads audio: nothing was extracted for it
        return 0.0 if doc.mode == "online" else None
    if train.url not in known:
        try:
            records = CacheReader(train.url).shard_records()
        except (CacheFormatError, OSError, ValueError):  # a moved cache only leaves the column empty
            records = []
        times = [r.get("seconds") for r in records]
        known[train.url] = float(sum(times)) if times and all(t is not None for t in times) else None
    return known[train.url]


_METRICS = ("wer", "cer", "per", "accuracy")


def _group_columns(run: Path, evaluation: str) -> dict[str, Any]:
    path = RunDir(run).eval_dir(evaluation) / "metrics.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    # the evaluation's own decoder (a tuned beam search, say) may differ from training's greedy validation
    groups = {"all": doc, **(doc.get("groups") or {})}
    out: dict[str, Any] = {"decoder": (doc.get("decoder") or {}).get("kind", "greedy")}
    out.update({f"{k}[{group}]": metrics[k] for k in _METRICS for group, metrics in groups.items() if k in metrics})
    return out


def plot_time_against_error(rows: Sequence[dict[str, Any]], path: str | Path, metric: str = "wer") -> None:
    """One point per run: ``metric`` against its training time (log axis), extraction included where known."""
    from hff_cache.runs.plots import plt, save_figure

    points = [(r.get("total_seconds", r.get("train_seconds")), r[metric], r["run"]) for r in rows
              if r.get(metric) is not None and r.get("train_seconds")]
    if not points:
        raise RunError(f"no run has both {metric} and a training time to plot")
    # a number beside each point and its run's name in a legend outside the axes: runs of similar time and
    # error (seeds of one method) sit on top of each other, and their names would overlap
    fig, ax = plt.subplots(figsize=(6 + 0.05 * max(len(p[2]) for p in points), 4))
    for i, (seconds, value, name) in enumerate(sorted(points), start=1):
        ax.scatter(seconds, value, label=f"{i}  {name}")
        ax.annotate(str(i), (seconds, value), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, frameon=False)
    ax.set(xscale="log", xlabel="training time, s (extraction included where recorded)", ylabel=metric.upper())
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    # 1-2-5 ticks in plain seconds: a log axis spanning less than a decade would show one label, or overlap
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.08)  # room for the right-most point's number
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def layer_error(row: dict[str, Any]) -> float | None:
    """A row's error in % whatever its task: WER (ASR), PER (phones) or 100 - accuracy (classification)."""
    for key in ("wer", "per"):
        if row.get(key) is not None:
            return float(row[key])
    return 100.0 - float(row["accuracy"]) if row.get("accuracy") is not None else None


def plot_layer_profiles(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Which layer serves which task: one curve per probe folder, its error against the hidden state, scaled
    to 0 at its best layer and 1 at its worst so that tasks with different error scales share the axes."""
    from hff_cache.runs.plots import plt, save_figure

    curves: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        error = layer_error(r)
        if r.get("task") == "probe" and error is not None:
            folder = r["run"].rsplit("/", 1)[0]
            curves.setdefault(folder.removeprefix("probe_"), []).append((int(r["fusion"].split(":")[1]), error))
    if not curves:
        raise RunError("no probe folder (probe.csv) among the runs: give the folders `hff-cache probe` wrote")
    fig, ax = plt.subplots(figsize=(6, 4))
    for task, points in curves.items():
        layers, errors = zip(*sorted(points), strict=True)
        low, high = min(errors), max(errors)
        scaled = [(e - low) / (high - low) if high > low else 0.0 for e in errors]
        line, = ax.plot(layers, scaled, marker="o", label=f"{task} (best {low:.1f}%)")
        ax.scatter([layers[errors.index(low)]], [0.0], s=120, facecolors="none", edgecolors=line.get_color())
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="hidden state (0 = embedding)", ylabel="error, scaled: 0 best layer, 1 worst",
           title=title or "per-layer probe of each task (validation)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def format_table(rows: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    groups = list(dict.fromkeys(k for r in rows for k in r if "[" in k))  # each metric's groups, in order
    cols = ["run", "task", "fusion", "method", "wer", "cer", "per", "accuracy", "decoder", *groups, "best_epoch",
            "trainable_params", "trainable_encoder_params", "epoch_seconds", "step_time_ms", "peak_rss_mb",
            "train_seconds", "total_seconds"]
    cols = [c for c in cols if any(r.get(c) is not None for r in rows)]

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
