"""One table of the metrics of several runs and probes (``hff-cache summary``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hff_cache.runs.directory import RunDir, RunError


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
        try:
            m = RunDir(run).read_metrics()
        except RunError:  # a damaged metrics.json: one row says so, the others still print
            m = {"task": "damaged"}
        if m is None:
            rows.append({"run": run.name, "task": "missing"})
            continue
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
