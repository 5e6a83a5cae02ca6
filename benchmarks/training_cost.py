"""Training cost, cached versus online, side by side in one run: epoch time and peak memory.

For each encoder (faster-whisper:base; a random-weight wav2vec2-large-shaped model) and each method, a fresh
subprocess works on the same evenly spaced subset of utterances:
- online ``hff-frozen``, ``hff-adapters``, ``adapters``, ``bitfit``, ``full``: ``training.online.prepare_online``,
  the first ``--steps`` + 1 batches of epoch 0, full training steps (forward, CTC loss, backward, AdamW)
  timed after one warm-up; epoch seconds = mean step x batches per epoch (extrapolated);
- cached ``hierarchical``: the subset extracted once with the same encoder (timed), then, in a process
  without the encoder, the same epoch of batches read six ways, in ``--reps`` rounds that time every way once
  in turn: pre-collated (the fusion and head alone: the floor), streamed from the cache through the loader
  (zstd and raw chunks, the loader between the steps and beside them), and from RAM (``--in-memory``).
Memory: the process's resident set sampled every 5 ms during the timed steps, minus the resident set just
before them, plus the absolute peak.
Bound: (encoder pass + fusion-and-head epoch) / fusion-and-head epoch, the most a cache can save over
hff-frozen.

    python benchmarks/training_cost.py --data runs/online/train.jsonl --utts 48

Writes docs/results/training_cost.md and docs/img/training_cost.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from hff_cache.runtime.threads import LoadWatch, warn_if_loaded

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("cached-hierarchical", "hff-frozen", "hff-adapters", "adapters", "bitfit", "full")
ENCODERS = ("faster-whisper:base", "random:wav2vec2-large")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS:
    """Samples the resident set in a thread (CPU torch allocations are invisible to tracemalloc)."""

    def __enter__(self) -> PeakRSS:
        self.base, self.peak, self._stop = _rss_mb(), _rss_mb(), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()


def child(encoder_name: str, method: str, data: str, steps: int, batch_seconds: float, utts: int,
          work: str, reps: int) -> dict:
    import torch

    from hff_cache.config import TrainConfig
    from hff_cache.training.online import prepare_online

    torch.manual_seed(0)
    cache = Path(work) / encoder_name.replace(":", "_") / "cache.zarr"
    if method == "cached-hierarchical":  # a process without the encoder, as a user's training run
        return cached_child(encoder_name, cache, batch_seconds, reps)
    extracting = method == "cached-extract"
    cfg = TrainConfig(online=True, model=encoder_name, data=data, method="hff-frozen" if extracting else method,
                      batch_seconds=batch_seconds, max_train_utts=utts, num_workers=1, prefetch=1)
    setup, _ = prepare_online(cfg, log=lambda m: print(m, file=sys.stderr))
    if extracting:
        return extract_subset(encoder_name, setup, cache, batch_seconds)
    per_epoch = len(setup.train)
    batches = list(itertools.islice(setup.train.epoch(0), steps + 1))
    model = setup.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    step = training_step(model, opt)
    step(batches[0])  # warm-up: allocator, optimizer state
    times = []
    with PeakRSS() as mem:
        for b in batches[1:]:
            t0 = time.perf_counter()
            step(b)
            times.append(time.perf_counter() - t0)
    step_s = sum(times) / len(times)
    return {"encoder": encoder_name, "method": method, "step_s": step_s, "epoch_s": step_s * per_epoch,
            "epoch_measured": False, "batches_per_epoch": per_epoch, "trainable_params": sum(p.numel() for p in params),
            "mem_step_mb": mem.peak - mem.base, "peak_rss_mb": mem.peak}


def training_step(model: Any, opt: Any) -> Any:
    """One full training step on a batch (forward, loss, backward, optimizer): what every cost benchmark times."""

    def step(b: Any) -> None:
        loss = model.loss(model(b), b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def extract_subset(encoder_name: str, online_setup: Any, cache: Path, batch_seconds: float) -> dict:
    """Extract the subset once with the same encoder: what one encoder pass over an epoch costs."""
    import shutil

    from hff_cache.config import ExtractConfig
    from hff_cache.extraction.extract import extract

    shutil.rmtree(cache.parent, ignore_errors=True)
    cache.parent.mkdir(parents=True)
    manifest = cache.parent / "subset.jsonl"
    with manifest.open("w") as f:
        for u in online_setup.train.utts:
            f.write(json.dumps({"id": u.id, "audio": str(u.audio), "text": u.text}) + "\n")
    t0 = time.perf_counter()
    extract(ExtractConfig(model=encoder_name, data=str(manifest), out=str(cache), progress=False,
                          batch_seconds=batch_seconds), encoder=online_setup.model.encoder)
    return {"encoder": encoder_name, "method": "cached-extract", "extract_s": time.perf_counter() - t0}


def cached_child(encoder_name: str, cache: Path, batch_seconds: float, reps: int) -> dict:
    """``hierarchical`` from the cache, no encoder in the process: the same epoch of batches (epoch 1's plan)
    streamed through the loader (zstd and raw chunks; the loader between the steps, as ``--loader-thread auto``
    picks where the step's threads fill the cores, and in a thread beside them), from RAM, and pre-collated
    (the fusion and head alone). ``reps`` rounds, each timing every way once in turn, so a ratio is taken
    within one round (the machine drifts by 10-20% between rounds) and its median reported."""
    import statistics

    import torch

    from hff_cache.cache import transcode_cache
    from hff_cache.config import TrainConfig
    from hff_cache.model.fusion import FusionConfig
    from hff_cache.training.cached import prepare

    frames = int(batch_seconds * 50)  # both encoders give 50 frames per second
    cfg = TrainConfig(cache=str(cache), out=str(cache.parent / "run"), fusion=FusionConfig(kind="hierarchical"),
                      batch_frames=frames, in_memory="false", num_workers=2, seed=0)
    setup = prepare(cfg, log=lambda m: print(m, file=sys.stderr))
    model = setup.model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    step = training_step(model, opt)
    step(next(iter(setup.train.epoch(0))))  # warm-up: allocator, optimizer state

    def timed(batches: Any) -> float:
        t0 = time.perf_counter()
        for b in batches:
            step(b)
        return time.perf_counter() - t0

    # the same cache stored raw (no zstd): streaming without decompression on the cores that train
    raw = cache.parent / f"{cache.stem}-raw.zarr"
    transcode_cache(str(cache), str(raw), "fp16", codec_params={"level": 0})
    ways = {"zstd": cfg, "zstd_thread": dataclasses.replace(cfg, loader_thread=True),
            "raw": dataclasses.replace(cfg, cache=str(raw)),
            "raw_thread": dataclasses.replace(cfg, cache=str(raw), loader_thread=True),
            "in_memory": dataclasses.replace(cfg, in_memory="true")}
    sources = {k: prepare(c, log=lambda m: None).train for k, c in ways.items()}
    peaks = {}  # a streamed run's memory, before this process holds the cache in RAM twice (below)
    for k in ("zstd", "raw"):
        with PeakRSS() as mem:
            timed(sources[k].epoch(1))
        peaks[k], peaks[f"{k}_step"] = mem.peak, mem.peak - mem.base
    t0 = time.perf_counter()
    sources["in_memory"].load()
    load_s = time.perf_counter() - t0
    batches = list(setup.train.epoch(1))
    seconds: dict[str, list[float]] = {"compute": [], **{k: [] for k in sources}}
    for _ in range(reps):
        seconds["compute"].append(timed(batches))
        for k, src in sources.items():
            seconds[k].append(timed(src.epoch(1)))
    ratio = {k: statistics.median(a / c for a, c in zip(v, seconds["compute"], strict=True))
             for k, v in seconds.items() if k != "compute"}
    compute_s = statistics.median(seconds["compute"])
    return {"encoder": encoder_name, "method": "cached-hierarchical", "step_s": compute_s / len(batches),
            "epoch_s": ratio["zstd"] * compute_s, "epoch_measured": True, "epoch_compute_s": compute_s,
            "ratios": ratio, "seconds": seconds, "reps": reps, "load_s": load_s,
            "loader_thread": bool(sources["zstd"]._in_thread()), "batches_per_epoch": len(batches),
            "trainable_params": sum(p.numel() for p in params), "mem_step_mb": peaks["zstd_step"],
            "peak_rss_mb": peaks["zstd"], "peak_rss_raw_mb": peaks["raw"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="training manifest (the demo corpus)")
    p.add_argument("--encoders", default=",".join(ENCODERS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--reps", type=int, default=5, help="rounds of the cached epoch's ways, timed in turn")
    p.add_argument("--online-rounds", type=int, default=1,
                   help="rounds of the online methods, each running every one in turn (ratios per round)")
    p.add_argument("--batch-seconds", type=float, default=20.0)
    p.add_argument("--utts", type=int, default=64, help="utterances in the (evenly spaced) training subset")
    p.add_argument("--work", default=str(ROOT / "runs" / "bench_training_cost"), help="subset caches")
    p.add_argument("--render-from", help="a log of an earlier run: only write the table and plot")
    p.add_argument("--child", nargs=2, metavar=("ENCODER", "METHOD"), help=argparse.SUPPRESS)
    p.add_argument("--doc", default=str(ROOT / "docs" / "results" / "training_cost.md"))
    p.add_argument("--img", default=str(ROOT / "docs" / "img" / "training_cost.png"))
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(*a.child, a.data, a.steps, a.batch_seconds, a.utts, a.work, a.reps)))
        return
    if a.render_from:  # re-render the table from the JSON lines a run printed, its machine line included
        printed = [json.loads(x) for x in Path(a.render_from).read_text().splitlines() if x.startswith("{")]
        machine = next((r["machine"]["line"] for r in printed if "machine" in r),
                       "machine: not recorded in this log (no `machine` line)")
        return finish(with_extraction([r for r in printed if "method" in r]), a, machine)
    warn_if_loaded()
    printed = []
    with LoadWatch() as watch:  # every child process, one after another
        for enc in a.encoders.split(","):
            for m in run_order(a.methods.split(","), a.online_rounds):
                for sub in (["cached-extract", m] if m.startswith("cached") else [m]):
                    cmd = [sys.executable, __file__, "--data", a.data, "--steps", str(a.steps), "--reps", str(a.reps),
                           "--batch-seconds",
                           str(a.batch_seconds), "--utts", str(a.utts), "--work", a.work, "--child", enc, sub]
                    out = subprocess.run(cmd, capture_output=True, text=True)
                    if out.returncode != 0:
                        print(f"{enc} {sub} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
                        break
                    printed.append(json.loads(out.stdout.strip().splitlines()[-1]))
                    print(json.dumps(printed[-1]), flush=True)
    machine = {**watch.summary(), "line": watch.line()}
    print(json.dumps({"machine": machine}), flush=True)  # in the log too, for --render-from
    finish(with_extraction(printed), a, machine["line"])


def run_order(methods: list[str], rounds: int) -> list[str]:
    """The children to run for one encoder: the cached methods once, the online ones ``rounds`` times in turn
    (interleaved, so the machine's drift between minutes hits every method alike)."""
    online = [m for m in methods if not m.startswith("cached")]
    return [m for m in methods if m.startswith("cached")] + online * max(1, rounds)


def with_extraction(printed: list[dict]) -> list[dict]:
    """The table's rows: each cached row gets its encoder's extraction time (the rows before it); an online
    method run in several rounds becomes one row of medians (``merge_rounds``)."""
    extract_s: dict[str, float] = {}
    rows = []
    for row in printed:
        if row["method"] == "cached-extract":
            extract_s[row["encoder"]] = row["extract_s"]
        else:
            rows.append({**row, "extract_s": extract_s.get(row["encoder"])} if row["method"].startswith("cached")
                        else row)
    return merge_rounds(rows)


def merge_rounds(rows: list[dict]) -> list[dict]:
    """One row per (encoder, method): step and epoch seconds are medians over the rounds, memory the largest,
    and ``x_full`` the median of each round's step time over ``full``'s in the same round."""
    import statistics

    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["encoder"], r["method"]), []).append(r)
    merged = []
    for (enc, method), rs in groups.items():
        row = dict(rs[0])
        if len(rs) > 1:
            row.update(step_s=statistics.median(r["step_s"] for r in rs),
                       epoch_s=statistics.median(r["epoch_s"] for r in rs), rounds=len(rs),
                       mem_step_mb=max(r["mem_step_mb"] for r in rs), peak_rss_mb=max(r["peak_rss_mb"] for r in rs))
        full = groups.get((enc, "full"), [])
        if len(full) == len(rs) > 1 and not method.startswith("cached"):
            row["x_full"] = statistics.median(r["step_s"] / f["step_s"] for r, f in zip(rs, full, strict=True))
        merged.append(row)
    return merged


def finish(rows: list[dict], a: argparse.Namespace, machine: str) -> None:
    # the command that reproduces the numbers: without --render-from and its value
    argv = [x for i, x in enumerate(sys.argv[1:]) if "--render-from" not in (x, sys.argv[i])]
    md = render(rows, "python benchmarks/training_cost.py " + " ".join(argv), a, machine)
    Path(a.doc).parent.mkdir(parents=True, exist_ok=True)
    Path(a.doc).write_text(md)
    plot(rows, a.img)
    print(md)


def render(rows: list[dict], cmd: str, a: argparse.Namespace, machine: str) -> str:
    lines = ["## Training cost: cached versus online", "", f"`{cmd}`", "",
             f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, no GPU. The same {a.utts} utterances "
             f"for every method, batches of <= {a.batch_seconds:.0f} s of padded audio. Online methods: "
             f"{a.steps} timed training steps after one warm-up, epoch = mean step x batches per epoch. Cached: "
             "the utterances extracted once, then the same epoch of `hierarchical` streamed from the cache through "
             "the loader, from RAM, and on batches already collated (the fusion and head alone), each measured. "
             "Ratio = online epoch / cached epoch. Bound = (encoder forward + fusion and "
             "head) / (fusion and head): the most a cache can save over `hff-frozen`, with the extraction time "
             "standing for one encoder pass over the epoch. Memory: resident-set growth during the timed "
             "steps, and the process peak.", ""]
    for enc in dict.fromkeys(r["encoder"] for r in rows):
        rs = [r for r in rows if r["encoder"] == enc]
        base = next((r for r in rs if r["method"].startswith("cached")), None)
        bound = (base["extract_s"] + base["epoch_compute_s"]) / base["epoch_compute_s"] if base else float("nan")
        lines += [f"### {enc}", "", "| method | trainable params | step s | epoch s | ratio vs cached | "
                  "step memory MiB | peak RSS MiB |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in rs:
            ratio = f"{r['epoch_s'] / base['epoch_s']:.1f}x" if base else "(no cached row)"
            lines.append(f"| {r['method']} | {r['trainable_params']:,} | {r['step_s']:.2f} | "
                         f"{r['epoch_s']:.1f}{'' if r['epoch_measured'] else ' (extrap.)'} | {ratio} | "
                         f"{r['mem_step_mb']:.0f} | {r['peak_rss_mb']:.0f} |")
        paired = [r for r in rs if "x_full" in r]
        if paired:
            lines += ["", f"Step time over `full`'s, the median of {paired[0]['rounds']} rounds' ratios (each round "
                      "ran every online method once, in turn): " + ", ".join(
                          f"`{r['method']}` **{r['x_full']:.2f}**" for r in paired) + "."]
        if base:
            lines += ["", *cached_ways(base, rs_frozen(rs)),
                      f"One encoder pass over the epoch (extraction) {base['extract_s']:.1f} s, so the bound for "
                      f"`hff-frozen` is **{bound:.1f}x**.", ""]
    lines += [machine, "", f"![epoch time per method](../img/{Path(a.img).name})", ""]
    return "\n".join(lines)


WAYS = {  # the cached epoch's ways of reading (cached_child), as the table names them
    "zstd": "streamed, fp16 + zstd (the default), the loader between the steps",
    "zstd_thread": "streamed, fp16 + zstd, the loader in a thread beside the step (`--loader-thread true`)",
    "raw": "streamed, fp16 raw (`transcode --codec fp16 --codec-param level=0`), the loader between the steps",
    "raw_thread": "streamed, fp16 raw, the loader in a thread beside the step",
    "in_memory": "from RAM (`--in-memory`, the default when the cache fits)",
}


def cached_ways(base: dict, frozen_s: float) -> list[str]:
    """The cached epoch's ways of reading against the fusion and head alone, medians of per-round ratios."""
    floor = base["epoch_compute_s"]
    if "ratios" not in base:  # a log from before the rounds: the default way only
        return [f"Cached epoch streamed {base['epoch_s']:.1f} s vs the fusion and head alone {floor:.1f} s: "
                f"**{base['epoch_s'] / floor:.2f}x**.", ""]
    auto = "in a thread beside the step" if base["loader_thread"] else "between the steps"
    out = [f"The cached epoch, {base['reps']} rounds each timing every way once in turn; x the floor = the median "
           f"of the rounds' ratios. `--loader-thread auto` put the loader {auto} on this machine. Loading the "
           f"cache into RAM once took {base['load_s']:.1f} s.", "",
           "| way of reading | x the fusion and head alone | epoch s | `hff-frozen` epoch / this |",
           "|---|---:|---:|---:|",
           f"| batches already collated (the floor) | 1.00 | {floor:.1f} | {frozen_s / floor:.1f}x |"]
    for key, label in WAYS.items():
        x = base["ratios"][key]
        out.append(f"| {label} | **{x:.2f}** | {x * floor:.1f} | {frozen_s / (x * floor):.1f}x |")
    return [*out, "", f"Peak RSS of a streamed epoch (measured before the rounds, which hold the cache in RAM): "
                      f"{base['peak_rss_mb']:.0f} MiB (zstd), {base['peak_rss_raw_mb']:.0f} MiB (raw).", ""]


def rs_frozen(rows: list[dict]) -> float:
    """``hff-frozen``'s epoch seconds among one encoder's rows (nan when it was not measured)."""
    return next((r["epoch_s"] for r in rows if r["method"] == "hff-frozen"), float("nan"))


def plot(rows: list[dict], path: str) -> None:
    from hff_cache.runs.plots import panels, save_figure

    fig, grid = panels(rows, "encoder")
    for ax, enc, rs in grid:
        ax.bar([r["method"] for r in rs], [r["epoch_s"] for r in rs])
        ax.set(title=enc, ylabel="seconds per epoch (CPU)", yscale="log")
        ax.tick_params(axis="x", rotation=35)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
