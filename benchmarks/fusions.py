"""Fusions side by side on one cache, several seeds: does a fusion beat its best input, at equal size?

Trains ``last``, ``weighted``, ``hierarchical`` and a size-matched control (``last`` with a downstream
wide enough to have as many trainable parameters as ``hierarchical``) with the same recipe on the same
caches, for each seed; each run's metrics land in WORK/<name>-s<seed>/metrics.json, so several processes
can share the seeds and ``--report`` pools whatever has finished.

    python benchmarks/fusions.py --train-cache C/train.zarr --valid-cache C/valid.zarr --seeds 0,1,2
    python benchmarks/fusions.py --report --probe-csv runs/librispeech_subset/probe/probe.csv

Writes docs/results/fusions.md and docs/img/fusions.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from hff_cache.config import TrainConfig
from hff_cache.model.fusion import FusionConfig
from hff_cache.runtime.threads import LoadWatch, warn_if_loaded
from hff_cache.training.cached import train

ROOT = Path(__file__).resolve().parents[1]
# name -> FusionConfig overrides; last-wide: width chosen so its parameters match hierarchical's (Whisper base)
FUSIONS: dict[str, dict[str, Any]] = {
    "last": {"kind": "last"},
    "weighted": {"kind": "weighted"},
    "hierarchical": {"kind": "hierarchical"},
    "last-wide": {"kind": "last", "width": 560},
    # not in the default set: the same wide downstream behind the hierarchical fusion (pairs with last-wide)
    "hierarchical-wide": {"kind": "hierarchical", "width": 560},
}
DEFAULT = ("last", "weighted", "hierarchical", "last-wide")


def run_one(name: str, seed: int, a: argparse.Namespace) -> None:
    out = Path(a.work) / f"{name}-s{seed}"
    if (out / "metrics.json").exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    try:  # claim the run, so that processes sharing the seeds never train the same one twice
        (out / ".claimed").open("x").close()
    except FileExistsError:
        print(f"--- {name} seed {seed}: claimed by another process (delete {out}/.claimed after a crash)",
              file=sys.stderr)
        return
    cfg = TrainConfig(cache=a.train_cache, valid_cache=a.valid_cache, out=str(out), task="asr",
                      fusion=FusionConfig(**FUSIONS[name]), epochs=a.epochs, lr=a.lr, batch_frames=a.batch_frames,
                      max_batch_utts=32, warmup_steps=10, seed=seed, force=True)
    print(f"--- {name} seed {seed}: {out}", file=sys.stderr, flush=True)
    with LoadWatch() as watch:
        train(cfg)
    # stored beside metrics.json, so that --report shows the machine each run was measured on
    (out / "machine.json").write_text(json.dumps({**watch.summary(), "line": watch.line()}, indent=2))
    print(f"--- {name} seed {seed}: {watch.line()}", file=sys.stderr, flush=True)


def collect(work: Path) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {}
    for name in FUSIONS:
        for path in sorted(work.glob(f"{name}-s*/metrics.json")):
            m = json.loads(path.read_text())
            m["seed"] = int(path.parent.name.rsplit("-s", 1)[1])
            runs.setdefault(name, []).append(m)
        runs.get(name, []).sort(key=lambda m: m["seed"])
    return runs


def machine_note(work: Path, runs: dict[str, list[dict[str, Any]]]) -> str:
    """The machine records stored with the pooled runs (machine.json): the load range, and which runs were
    LOADED or have no record."""
    names = [f"{name}-s{m['seed']}" for name, ms in runs.items() for m in ms]
    stored = {n: json.loads((work / n / "machine.json").read_text()) for n in names
              if (work / n / "machine.json").exists()}
    if not stored:
        return "machine: not recorded with these runs (no machine.json beside their metrics.json)"
    s = list(stored.values())
    loaded = [n for n, x in stored.items() if x["loaded"]]
    missing = [n for n in names if n not in stored]

    def each(key: str) -> str:
        return "/".join(str(v) for v in sorted({x[key] for x in s}))

    note = (f"machine, as stored with each run: load average {min(x['load_min'] for x in s)}-"
            f"{max(x['load_max'] for x in s)} on {each('usable_cpus')} usable CPUs, torch threads "
            f"{each('torch_threads')}: {len(s) - len(loaded)} of {len(s)} recorded runs quiet")
    if loaded:
        note += f"; LOADED (their epoch times are not comparable): {', '.join(loaded)}"
    if missing:
        note += f"; not recorded: {', '.join(missing)}"
    return note


def _ms(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.2f}"
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}"


def report(a: argparse.Namespace) -> str:
    runs = collect(Path(a.work))
    lines = ["## Fusions on one cache, several seeds", "",
             "`python benchmarks/fusions.py --train-cache ... --valid-cache ... --seeds ...` then `--report`", "",
             f"{time.strftime('%Y-%m-%d')}. Same recipe for every fusion ({a.epochs} epochs, lr {a.lr}, batches of "
             f"{a.batch_frames} frames, CTC over characters, greedy decoding); WER/CER of the best validation "
             "epoch, mean ± standard deviation over seeds. `last-wide` is `last` with a downstream of width 560: "
             "as many trainable parameters as `hierarchical`, to separate fusion from size.", "",
             "The seed fixes the initial weights, batch order and masks alike for every fusion, so a seed's runs "
             "form a pair: the paired difference to `last` (same seeds) is the sharper comparison.", "",
             "| fusion | seeds | WER % | CER % | per-seed WER | WER - last, paired | trainable params | epoch s |",
             "|---|---:|---:|---:|---|---:|---:|---:|"]
    last = {m["seed"]: m["wer"] for m in runs.get("last", [])}
    for name, ms in runs.items():
        wers = [m["wer"] for m in ms]
        diffs = [m["wer"] - last[m["seed"]] for m in ms if m["seed"] in last]
        paired = _ms(diffs) if diffs and name != "last" else ""
        lines.append(f"| {name} | {len(ms)} | {_ms(wers)} | {_ms([m['cer'] for m in ms])} | "
                     + " ".join(f"{w:.1f}" for w in wers)
                     + f" | {paired} | {ms[0]['trainable_params']:,} | "
                     f"{statistics.mean(m['epoch_seconds'] for m in ms):.0f} |")
    lines += ["", machine_note(Path(a.work), runs)]
    if a.probe_csv and Path(a.probe_csv).exists():
        rows = list(csv.DictReader(open(a.probe_csv)))
        best = min(rows, key=lambda r: float(r["wer"]))
        lines += ["", f"Best single layer in the probe (`{a.probe_csv}`, its own shorter recipe): hidden state "
                  f"{best['layer']} at {float(best['wer']):.1f} WER; `last` here is that same layer."]
    lines += ["", "![WER per fusion and seed](../img/fusions.png)", ""]
    return "\n".join(lines)


def plot(work: Path, path: str) -> None:
    from hff_cache.runs.plots import plt, save_figure

    runs = collect(work)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for i, ms in enumerate(runs.values()):
        wers = [m["wer"] for m in ms]
        ax.scatter([i] * len(wers), wers, alpha=0.7)
        ax.hlines(statistics.mean(wers), i - 0.25, i + 0.25, color="k")
    ax.set_xticks(range(len(runs)), list(runs))
    ax.set(ylabel="validation WER %", title="fusion, one dot per seed (line: mean)")
    ax.grid(alpha=0.3, axis="y")
    save_figure(fig, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train-cache")
    p.add_argument("--valid-cache")
    p.add_argument("--work", default=str(ROOT / "runs" / "bench_fusions"))
    p.add_argument("--fusions", default=",".join(DEFAULT), help=f"of {', '.join(FUSIONS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-frames", type=int, default=5000)
    p.add_argument("--report", action="store_true", help="only pool the finished runs into the report")
    p.add_argument("--probe-csv", default=str(ROOT / "runs" / "librispeech_subset" / "probe" / "probe.csv"))
    p.add_argument("--doc", default=str(ROOT / "docs" / "results" / "fusions.md"))
    p.add_argument("--img", default=str(ROOT / "docs" / "img" / "fusions.png"))
    a = p.parse_args()
    if not a.report:
        if not (a.train_cache and a.valid_cache):
            p.error("--train-cache and --valid-cache are needed to train (or use --report)")
        warn_if_loaded()
        for seed in (int(s) for s in a.seeds.split(",")):
            for name in a.fusions.split(","):
                run_one(name, seed, a)
    md = report(a)
    Path(a.doc).parent.mkdir(parents=True, exist_ok=True)
    Path(a.doc).write_text(md)
    plot(Path(a.work), a.img)
    print(md)


if __name__ == "__main__":
    main()
