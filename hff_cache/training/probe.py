"""Layer probe: the same small head trained on each stored hidden state alone.

Each probe is an ordinary run (``DIR/layer_KK/``) whose model reads one hidden state -- the loader asks the
cache for that layer only (``read_many(layers=[k])``), so a probe decodes 1/L of the cache. Rows go to
``DIR/probe.csv`` (layer, metrics, trainable params, epoch seconds) and ``DIR/probe.png``.
"""

from __future__ import annotations

import csv
import dataclasses
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hff_cache.config import TrainConfig
from hff_cache.runs.directory import RunDir

__all__ = ["probe"]

_METRICS = ("wer", "cer", "per", "accuracy")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def probe(base: TrainConfig, out: str | Path, layers: Sequence[int] | None = None,
          log: Callable[[str], None] = _log) -> list[dict[str, Any]]:
    """Train ``base`` (its fusion becomes ``last`` over one layer) once per hidden state in ``layers``
    (default: every stored one). A layer whose run already finished is reused and an interrupted one resumed,
    unless ``base.force``."""
    from hff_cache.cache import CacheReader
    from hff_cache.runs.plots import plot_probe
    from hff_cache.training.cached import train

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stored = CacheReader(base.cache).meta.layers
    layers = list(layers) if layers is not None else list(stored)
    rows: list[dict[str, Any]] = []
    for k in layers:
        run = out / f"layer_{k:02d}"
        fusion = dataclasses.replace(base.fusion, kind="last")
        cfg = dataclasses.replace(base, layers=[k], fusion=fusion, out=str(run))
        metrics = None if base.force else RunDir(run).read_metrics()  # a finished layer's run is reused
        if metrics is not None:
            log(f"probe layer {k}: reusing {run}")
        else:
            # an interrupted layer continues from its checkpoint; --force starts every layer over
            resume = not base.force and RunDir(run).state_path().exists()
            log(f"probe layer {k}: {'resuming' if resume else 'training'} {run}")
            metrics = train(dataclasses.replace(cfg, force=not resume, resume=resume), log=log)
        row = {"layer": k, **{m: metrics[m] for m in _METRICS if m in metrics},
               "trainable_params": metrics["trainable_params"], "epoch_seconds": metrics["epoch_seconds"]}
        rows.append(row)
    with (out / "probe.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    keys = [m for m in _METRICS if m in rows[0]]
    plot_probe(rows, out / "probe.png", metrics=keys)
    return rows
