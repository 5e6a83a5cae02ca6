"""Amortisation: N downstream tasks from one cache versus N online runs, side by side in one run.

Two set-ups, each the same utterances and the same recipe (hierarchical fusion, epochs, batches of 20 s) for
both modes. Cached: `hff-cache extract` once per split, then one `hff-cache train` per task. Online: one
`hff-cache train --online --method hff-frozen` per task (the same model; the encoder runs every step). Every
stage is a CLI call, timed by wall clock.

``--setup librispeech`` (default): an evenly spaced subset of the LibriSpeech subset's per-speaker split (all
three speakers, so that speaker identification is possible), three tasks: character ASR, phone recognition
(labels from the MFA alignments) and speaker identification.

    python benchmarks/amortisation.py --utts 48 --valid-utts 24 --epochs 3

Writes docs/results/amortisation.md and docs/img/amortisation.png.

``--setup real-speech``: the five tasks of pipelines/real_speech/run.sh (stages 0, 2 and 4) from its
manifests and label files in EXP: ASR, phones, speaker id (speechocean762's training speakers, each split
4:1 inside the training cache), gender and child/adult (speaker-disjoint: train vs valid).

    python benchmarks/amortisation.py --setup real-speech --exp runs/real_speech --utts 480 --valid-utts 120

Writes docs/results/amortisation_real.md and docs/img/amortisation_real.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hff_cache.runtime.threads import LoadWatch, warn_if_loaded

ROOT = Path(__file__).resolve().parents[1]
TASKS = {"asr": [], "phones": ["--task", "phones", "--labels"], "speaker": ["--task", "classify:speaker"]}
SETUPS = {  # setup: (default encoder, work dir, doc, image)
    "librispeech": ("faster-whisper:base", "bench_amortisation", "amortisation.md", "amortisation.png"),
    "real-speech": ("faster-whisper:tiny.en", "bench_amortisation_real", "amortisation_real.md",
                    "amortisation_real.png"),
}


@dataclass
class Task:
    """One downstream task's options: for the cached run (caches, labels) and for the online run (audio)."""

    cached: list[str]
    online: list[str]


@dataclass
class Setup:
    """What a set-up hands to the measurement: manifests to extract, tasks, and the doc's data sentence."""

    splits: dict[str, Path]  # split name -> manifest; each is extracted to WORK/<split>.zarr
    tasks: dict[str, Task]
    about: str


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


def spread_ids(src: Path | list[Any], n: int) -> list[str]:
    """Ids of ``n`` utterances of manifest ``src`` (or of its loaded utterances), evenly spaced in id order
    (as `train --max-train-utts`)."""
    from hff_cache.intake.manifests import load_intake
    from hff_cache.intake.selection import spread_subset

    utts = load_intake(str(src)) if isinstance(src, Path) else src
    return [u.id for u in spread_subset(utts, n)]


def write_rows(src: Path, dst: Path, keep: Iterable[str]) -> list[dict[str, Any]]:
    """The rows of JSONL ``src`` whose id is in ``keep``, in ``src``'s order, written to ``dst``."""
    ids = set(keep)
    rows = [r for r in map(json.loads, src.open()) if r["id"] in ids]
    dst.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def subset(src: Path, dst: Path, n: int) -> None:
    """``n`` utterances of manifest ``src``, evenly spaced in id order (as `train --max-train-utts`)."""
    write_rows(src, dst, spread_ids(src, n))


def score(run_dir: Path) -> str:
    m = json.loads((run_dir / "metrics.json").read_text())
    key = m["metric"]
    return f"{key.upper() if key != 'accuracy' else 'acc'} {m[key]:.1f}"


def librispeech(a: argparse.Namespace, work: Path, cli: list[str], log: Path) -> Setup:
    """Manifests and phone labels from the LibriSpeech subset (untimed), three tasks."""
    for split, take in (("train", "rest"), ("valid", "holdout")):
        run([*cli, "manifest", a.data, "--holdout", "5", "--take", take, "--out", str(work / f"{split}_all.jsonl")],
            log)
        subset(work / f"{split}_all.jsonl", work / f"{split}.jsonl", a.utts if split == "train" else a.valid_utts)
    labels = work / "phones.jsonl"
    run([*cli, "labels", "phones", "--alignments", str(Path(a.data) / "alignment"), "--out", str(labels)], log)
    caches = ["--cache", str(work / "train.zarr"), "--valid-cache", str(work / "valid.zarr")]
    audio = ["--data", str(work / "train.jsonl"), "--valid-data", str(work / "valid.jsonl")]
    tasks = {}
    for task, flags in TASKS.items():
        flags = [*flags, str(labels)] if flags and flags[-1] == "--labels" else flags
        tasks[task] = Task([*caches, *flags], [*audio, *flags])
    about = (f"{a.utts} training and {a.valid_utts} validation utterances (the per-speaker split of all three "
             "speakers)")
    return Setup({"train": work / "train.jsonl", "valid": work / "valid.jsonl"}, tasks, about)


def speaker_share(picked: list[str], held: list[dict[str, Any]], speaker_of: dict[str, str]) -> list[str]:
    """Held-out speaker-id utterances for the speakers in ``picked``: about one per four picked (the recipe's
    4:1), at least one, evenly spaced, so every speaker id trains on is also validated (and vice versa)."""
    counts: dict[str, int] = {}
    for uid in picked:
        if uid in speaker_of:
            counts[speaker_of[uid]] = counts.get(speaker_of[uid], 0) + 1
    out = []
    for spk, k in counts.items():
        ids = sorted(r["id"] for r in held if r["speaker"] == spk)
        m = min(len(ids), max(1, round(k / 4)))
        out += [ids[(i * len(ids)) // m] for i in range(m)]
    return out


def real_train_ids(train: Path, spk_train: Path, spk_valid: Path, n: int) -> list[str]:
    """At most ``n`` training ids: an even spread of the training manifest outside speaker id's held-out
    utterances, plus those speakers' held-out share (an even spread alone would give most of the 110
    speakers one utterance, on one side of the speaker split only)."""
    from hff_cache.intake.manifests import load_intake

    held = list(map(json.loads, spk_valid.open()))
    speaker_of = {r["id"]: r["speaker"] for r in map(json.loads, spk_train.open())}
    drop = {r["id"] for r in held}
    pool = [u for u in load_intake(str(train)) if u.id not in drop]
    for k in range(n, 0, -1):  # the largest spread whose held-out share still fits in n
        picked = spread_ids(pool, k)
        extra = speaker_share(picked, held, speaker_of)
        if len(picked) + len(extra) <= n:
            return picked + extra
    sys.exit(f"--utts {n}: too few for the speaker split (each speaker needs a training and a held-out utterance)")


def check_classes(task: str, field: str, train: list[dict[str, Any]], valid: list[dict[str, Any]]) -> None:
    """Exit with the reason when ``task`` cannot train on the subset: under two classes in training, or a
    validation class training never saw (the classifier refuses it)."""
    seen = {r[field] for r in train if r.get(field)}
    unseen = {r[field] for r in valid if r.get(field)} - seen
    if len(seen) < 2 or unseen or not any(r.get(field) for r in valid):
        sys.exit(f"the subset is too small for {task}: training classes {sorted(seen)}, validation classes not in "
                 f"training {sorted(unseen)}; give more --utts / --valid-utts")


def real_speech(a: argparse.Namespace, work: Path) -> Setup:
    """Subsets of the recipe's manifests and label files (untimed), five tasks as its task_args."""
    exp, m = Path(a.exp), Path(a.exp) / "manifests"
    spk = {s: Path(a.exp) / "labels" / f"speaker_{s}.jsonl" for s in ("train", "valid")}
    keep = real_train_ids(m / "train.jsonl", spk["train"], spk["valid"], a.utts)
    train = write_rows(m / "train.jsonl", work / "train.jsonl", keep)
    valid = write_rows(m / "valid.jsonl", work / "valid.jsonl", spread_ids(m / "valid.jsonl", a.valid_utts))
    speaker = {s: write_rows(spk[s], work / f"speaker_{s}.jsonl", keep) for s in spk}
    phones = work / "phones.jsonl"
    write_rows(exp / "labels" / "phones.jsonl", phones, [r["id"] for r in train + valid])
    check_classes("speaker", "speaker", speaker["train"], speaker["valid"])
    for field in ("gender", "age_group"):
        check_classes(field, field, train, valid)
    t, v = str(work / "train.zarr"), str(work / "valid.zarr")
    caches, audio = ["--cache", t, "--valid-cache", v], ["--data", str(work / "train.jsonl"), "--valid-data",
                                                         str(work / "valid.jsonl")]
    sp = ["--task", "classify:speaker"]
    tasks = {"asr": Task(caches, audio),
             "phones": Task([*caches, "--task", "phones", "--labels", str(phones)],
                            [*audio, "--task", "phones", "--labels", str(phones)]),
             # both sides from the training cache; online, --valid-labels needs a --valid-cache, so the label
             # files (manifest rows with audio) are the online run's --data / --valid-data
             "speaker": Task([*sp, "--cache", t, "--valid-cache", t, "--labels", str(work / "speaker_train.jsonl"),
                              "--valid-labels", str(work / "speaker_valid.jsonl")],
                             [*sp, "--data", str(work / "speaker_train.jsonl"), "--valid-data",
                              str(work / "speaker_valid.jsonl")]),
             **{f: Task([*caches, "--task", f"classify:{f}"], [*audio, "--task", f"classify:{f}"])
                for f in ("gender", "age_group")}}
    n_spk = len({r["speaker"] for r in speaker["train"]})
    about = (f"{len(train)} training and {len(valid)} validation utterances of `{a.exp}` (evenly spaced in id "
             f"order; LibriSpeech and speechocean762); speaker id on the subset's {n_spk} speechocean762 speakers "
             f"({len(speaker['train'])}:{len(speaker['valid'])} utterances, both from the training cache), gender "
             "and child/adult speaker-disjoint (train vs valid)")
    return Setup({"train": work / "train.jsonl", "valid": work / "valid.jsonl"}, tasks, about)


def measure(setup: Setup, a: argparse.Namespace, work: Path, cli: list[str], log: Path
            ) -> tuple[dict[str, Any], dict[str, dict[str, str]], dict[str, Any]]:
    """(times, scores, machine): extraction, then each task cached, then each task online."""
    threads = ["--threads", str(a.threads)] if a.threads is not None else []
    recipe = ["--epochs", str(a.epochs), "--eval-every", str(a.epochs), "--lr", "1e-3", "--seed", "0",
              "--fusion", "hierarchical", "--force", *threads]
    with LoadWatch() as watch:  # every timed CLI call: extraction, then each task cached and online
        times: dict[str, Any] = {"extract": 0.0, "cached": {}, "online": {}}
        for split, manifest in setup.splits.items():
            shutil.rmtree(work / f"{split}.zarr", ignore_errors=True)  # a finished cache would be a no-op
            times["extract"] += run([*cli, "extract", "--model", a.model, "--data", str(manifest), "--out",
                                     str(work / f"{split}.zarr"), "--no-progress", *threads], log)
        scores: dict[str, dict[str, str]] = {"cached": {}, "online": {}}
        for task, t in setup.tasks.items():
            out = work / f"cached-{task}"
            times["cached"][task] = run([*cli, "train", *t.cached, "--out", str(out), "--batch-frames", "1000",
                                         *recipe], log)
            scores["cached"][task] = score(out)
        for task, t in setup.tasks.items():
            out = work / f"online-{task}"
            times["online"][task] = run([*cli, "train", "--online", "--model", a.model, "--method", "hff-frozen",
                                         *t.online, "--out", str(out), "--batch-seconds", "20", *recipe], log)
            scores["online"][task] = score(out)
    return times, scores, {**watch.summary(), "line": watch.line()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options; --model, --work, --doc and --img default per --setup."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--setup", choices=sorted(SETUPS), default="librispeech")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "librispeech-subset"),
                   help="librispeech: the LibriSpeech subset folder")
    p.add_argument("--exp", default=str(ROOT / "runs" / "real_speech"),
                   help="real-speech: the recipe's experiment folder (manifests/, labels/; only read)")
    p.add_argument("--model")
    p.add_argument("--utts", type=int, default=48)
    p.add_argument("--valid-utts", type=int, default=24)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch threads for every extract and train call (default: theirs)")
    p.add_argument("--work")
    p.add_argument("--doc")
    p.add_argument("--img")
    a = p.parse_args(argv)
    model, work, doc, img = SETUPS[a.setup]
    a.model = a.model or model
    a.work = a.work or str(ROOT / "runs" / work)
    a.doc = a.doc or str(ROOT / "docs" / "results" / doc)
    a.img = a.img or str(ROOT / "docs" / "img" / img)
    return a


def main() -> None:
    a = parse_args()
    warn_if_loaded()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    log.write_text("")
    cli = [sys.executable, "-m", "hff_cache"]
    setup = real_speech(a, work) if a.setup == "real-speech" else librispeech(a, work, cli, log)
    times, scores, machine = measure(setup, a, work, cli, log)
    (work / "times.json").write_text(json.dumps({"times": times, "scores": scores, "machine": machine}, indent=2))
    md = render(times, scores, a, "python benchmarks/amortisation.py " + " ".join(sys.argv[1:]), machine["line"],
                setup.about)
    Path(a.doc).parent.mkdir(parents=True, exist_ok=True)
    Path(a.doc).write_text(md)
    plot(times, a.img)
    print(md)


def render(times: dict[str, Any], scores: dict[str, dict[str, str]], a: argparse.Namespace, cmd: str,
           machine: str, about: str) -> str:
    """The results page: per-task wall seconds and results of both modes, extraction, totals, the ratio."""
    ext, cached, online = times["extract"], times["cached"], times["online"]
    total_c, total_o = ext + sum(cached.values()), sum(online.values())
    n = len(cached)
    per_c, per_o = sum(cached.values()) / n, total_o / n
    # the machine line reports this process's torch threads; the timed CLI calls ran with --threads
    threads = f", --threads {a.threads} per call" if a.threads is not None else ""
    lines = ["## Amortisation: N tasks from one cache versus N online runs", "", f"`{cmd}`", "",
             f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, no GPU. Encoder `{a.model}`; {about}; "
             f"hierarchical fusion, {a.epochs} epochs, batches of 20 s{threads}, the same recipe for both modes. Wall "
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
              f"![cumulative time per task](../img/{Path(a.img).name})", ""]
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
