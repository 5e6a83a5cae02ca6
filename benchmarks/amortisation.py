"""Amortisation: N downstream tasks from one cache versus N online runs, side by side in one run.

The same utterances (an evenly spaced subset of the LibriSpeech subset's per-speaker split, all three
speakers, so that speaker identification is possible) and the same recipe (hierarchical fusion, epochs,
batches of 20 s) for three tasks: character ASR, phone recognition (labels from the MFA alignments) and
speaker identification. Cached: `hff-cache extract` once (train + valid), then one `hff-cache train` per
task. Online: one `hff-cache train --online --method hff-frozen` per task (the same model; the encoder
runs every step). Every stage is a CLI call, timed by wall clock.

    python benchmarks/amortisation.py --utts 48 --valid-utts 24 --epochs 3

Writes docs/results/amortisation.md and docs/img/amortisation.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hff_cache.runtime.threads import LoadWatch, warn_if_loaded

ROOT = Path(__file__).resolve().parents[1]
TASKS = {"asr": [], "phones": ["--task", "phones", "--labels"], "speaker": ["--task", "classify:speaker"]}


def run(cmd: list[str], log: Path) -> float:
    """Run a CLI call, its output appended to ``log``; wall seconds."""
    t0 = time.perf_counter()
    with log.open("a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")
    return time.perf_counter() - t0


def subset(src: Path, dst: Path, n: int) -> None:
    """``n`` utterances of manifest ``src``, evenly spaced in id order (as `train --max-train-utts`)."""
    from hff_cache.intake.manifests import load_intake
    from hff_cache.intake.selection import spread_subset

    keep = {u.id for u in spread_subset(load_intake(str(src)), n)}
    rows = [json.loads(line) for line in src.open()]
    dst.write_text("".join(json.dumps(r) + "\n" for r in rows if r["id"] in keep))


def score(run_dir: Path) -> str:
    m = json.loads((run_dir / "metrics.json").read_text())
    key = m["metric"]
    return f"{key.upper() if key != 'accuracy' else 'acc'} {m[key]:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "librispeech-subset"))
    p.add_argument("--model", default="faster-whisper:base")
    p.add_argument("--utts", type=int, default=48)
    p.add_argument("--valid-utts", type=int, default=24)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--work", default=str(ROOT / "runs" / "bench_amortisation"))
    p.add_argument("--doc", default=str(ROOT / "docs" / "results" / "amortisation.md"))
    p.add_argument("--img", default=str(ROOT / "docs" / "img" / "amortisation.png"))
    a = p.parse_args()
    warn_if_loaded()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    log.write_text("")
    cli = [sys.executable, "-m", "hff_cache"]
    for split, take in (("train", "rest"), ("valid", "holdout")):
        run([*cli, "manifest", a.data, "--holdout", "5", "--take", take, "--out", str(work / f"{split}_all.jsonl")],
            log)
        subset(work / f"{split}_all.jsonl", work / f"{split}.jsonl", a.utts if split == "train" else a.valid_utts)
    labels = work / "phones.jsonl"
    run([*cli, "labels", "phones", "--alignments", str(Path(a.data) / "alignment"), "--out", str(labels)], log)
    recipe = ["--epochs", str(a.epochs), "--eval-every", str(a.epochs), "--lr", "1e-3", "--seed", "0",
              "--fusion", "hierarchical", "--force"]
    tasks = {t: [*f, str(labels)] if f and f[-1] == "--labels" else f for t, f in TASKS.items()}

    with LoadWatch() as watch:  # every timed CLI call: extraction, then each task cached and online
        times: dict[str, Any] = {"extract": 0.0, "cached": {}, "online": {}}
        for split in ("train", "valid"):
            shutil.rmtree(work / f"{split}.zarr", ignore_errors=True)  # a finished cache would be a no-op
            times["extract"] += run([*cli, "extract", "--model", a.model, "--data", str(work / f"{split}.jsonl"),
                                     "--out", str(work / f"{split}.zarr"), "--no-progress"], log)
        scores: dict[str, dict[str, str]] = {"cached": {}, "online": {}}
        for task, flags in tasks.items():
            out = work / f"cached-{task}"
            times["cached"][task] = run([*cli, "train", "--cache", str(work / "train.zarr"), "--valid-cache",
                                         str(work / "valid.zarr"), "--out", str(out), "--batch-frames", "1000",
                                         *flags, *recipe], log)
            scores["cached"][task] = score(out)
        for task, flags in tasks.items():
            out = work / f"online-{task}"
            times["online"][task] = run([*cli, "train", "--online", "--model", a.model, "--method", "hff-frozen",
                                         "--data", str(work / "train.jsonl"), "--valid-data", str(work / "valid.jsonl"),
                                         "--out", str(out), "--batch-seconds", "20", *flags, *recipe], log)
            scores["online"][task] = score(out)
    machine = {**watch.summary(), "line": watch.line()}
    (work / "times.json").write_text(json.dumps({"times": times, "scores": scores, "machine": machine}, indent=2))
    md = render(times, scores, a, "python benchmarks/amortisation.py " + " ".join(sys.argv[1:]), machine["line"])
    Path(a.doc).parent.mkdir(parents=True, exist_ok=True)
    Path(a.doc).write_text(md)
    plot(times, a.img)
    print(md)


def render(times: dict[str, Any], scores: dict[str, dict[str, str]], a: argparse.Namespace, cmd: str,
           machine: str) -> str:
    ext, cached, online = times["extract"], times["cached"], times["online"]
    total_c, total_o = ext + sum(cached.values()), sum(online.values())
    n = len(cached)
    per_c, per_o = sum(cached.values()) / n, total_o / n
    lines = ["## Amortisation: N tasks from one cache versus N online runs", "", f"`{cmd}`", "",
             f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, no GPU. Encoder `{a.model}`; {a.utts} "
             f"training and {a.valid_utts} validation utterances (the per-speaker split of all three speakers); "
             f"hierarchical fusion, {a.epochs} epochs, batches of 20 s, the same recipe for both modes. Wall "
             "seconds of each CLI call (process start, model loading and validation included).", "",
             "| task | cached train s | online (hff-frozen) s | cached result | online result |",
             "|---|---:|---:|---|---|"]
    for task in cached:
        lines.append(f"| {task} | {cached[task]:.0f} | {online[task]:.0f} | {scores['cached'][task]} | "
                     f"{scores['online'][task]} |")
    lines += [f"| extraction (once, train + valid) | {ext:.0f} | - | | |",
              f"| **total, {n} tasks** | **{total_c:.0f}** | **{total_o:.0f}** | | |", "", machine, "",
              f"{n} tasks online take **{total_o / total_c:.2f}x** the time of {n} tasks from one cache. Per task: "
              f"{per_c:.0f} s cached vs {per_o:.0f} s online ({per_o / per_c:.1f}x); the extraction "
              f"({ext:.0f} s) is paid back after {ext / max(per_o - per_c, 1e-9):.1f} tasks at these epochs, and "
              "sooner with more epochs (each online epoch repeats the encoder pass).", "",
              "![cumulative time per task](../img/amortisation.png)", ""]
    return "\n".join(lines)


def plot(times: dict[str, Any], path: str) -> None:
    from hff_cache.runs.plots import plt, save_figure

    tasks = list(times["cached"])
    cum_c, cum_o = [times["extract"]], [0.0]
    for t in tasks:
        cum_c.append(cum_c[-1] + times["cached"][t])
        cum_o.append(cum_o[-1] + times["online"][t])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(range(len(cum_c)), cum_c, "o-", label="one cache (extraction, then each task)")
    ax.plot(range(len(cum_o)), cum_o, "s-", label="online hff-frozen per task")
    ax.set_xticks(range(len(cum_c)), ["0", *tasks])
    ax.set(xlabel="tasks trained", ylabel="cumulative wall seconds", title="amortisation over tasks")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
