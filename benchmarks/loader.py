"""Is the loader fast enough? Frames/second delivered by the cache loader vs frames/second consumed by a
``hierarchical`` training step, measured side by side in one process.

    python benchmarks/loader.py --cache runs/librispeech_subset/caches/train.zarr
    python benchmarks/loader.py            # no cache given: builds a tiny random-encoder cache first

Loader modes: ``stream`` (decode from Zarr in background threads every epoch) and ``memory`` (decode once
into float16 RAM, then only gather). The goal is loader >= 5x the training step's consumption, so the
model never waits for data.

For a codec whose decoder holds the GIL (tpcae, tpcape), the one-off ``--in-memory`` load runs in
``--workers`` processes, and so do streamed epochs; both are then timed a second way, in threads, side by
side (``--load-rounds`` interleaved rounds, median ratio).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from hff_cache.batches.from_cache import CacheBatches
from hff_cache.cache import CacheReader
from hff_cache.cache.block_reads import uses_processes
from hff_cache.model.augment import SpecAugment
from hff_cache.model.hff import HFFModel, ModelSpec
from hff_cache.runtime.threads import LoadWatch, warn_if_loaded
from hff_cache.tasks.task import Task, load_labels
from hff_cache.testing import read_by_threads


def loader_rate(src: CacheBatches, epochs: int) -> tuple[float, float]:
    """(frames/s over ``epochs`` full epochs, seconds of one-off set-up such as the in-memory load)."""
    t0 = time.perf_counter()
    if src.in_memory:
        src.load()
    setup = time.perf_counter() - t0
    frames, t0 = 0, time.perf_counter()
    for e in range(epochs):
        for batch in src.epoch(e):
            frames += batch.num_frames
    return frames / (time.perf_counter() - t0), setup


def gil_ways(reader: CacheReader, data: object, common: dict, rounds: int) -> dict[str, float]:
    """For a codec whose decoder holds the GIL: median seconds of the one-off in-memory load and of one streamed
    epoch, by worker processes and by threads, and the medians of the per-round ratios (rounds interleaved, so
    drift in the machine's speed hits both ways alike)."""
    readers = {"processes": reader, "threads": read_by_threads(reader)}  # the same decoder, read two ways
    times: dict[str, list[float]] = {f"{job}_{way}": [] for job in ("load", "stream") for way in readers}
    for _ in range(rounds):
        for way, r in readers.items():
            src = CacheBatches(r, data, in_memory=True, **common)
            t0 = time.perf_counter()
            src.load()
            times[f"load_{way}"].append(time.perf_counter() - t0)
            src = CacheBatches(r, data, in_memory=False, **common)
            t0 = time.perf_counter()
            for _batch in src.epoch(0):
                pass
            times[f"stream_{way}"].append(time.perf_counter() - t0)
    out = {f"{k}_s": statistics.median(v) for k, v in times.items()}
    for job in ("load", "stream"):
        pairs = zip(times[f"{job}_processes"], times[f"{job}_threads"], strict=True)
        out[f"{job}_speedup"] = statistics.median(t / p for p, t in pairs)
    return out


def step_rate(src: CacheBatches, task: Task, steps: int) -> tuple[float, float, int]:
    """(frames/s, ms/step, trainable params) of forward + backward + AdamW on the first batches."""
    torch.manual_seed(0)
    spec = ModelSpec(fusion={"kind": "hierarchical"}, num_layers=src.num_layers, hidden_size=src.hidden_size,
                     head="ctc", vocab_size=task.tokenizer.vocab_size, layers=src.layers or [])
    model = HFFModel(spec, augment=SpecAugment(2, 20)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    batches: list = []
    epoch = 0
    while len(batches) < steps + 1:  # a small cache may hold fewer batches than steps: take more epochs
        for batch in src.epoch(epoch):
            batches.append(batch)
            if len(batches) == steps + 1:
                break
        epoch += 1
    frames, elapsed = 0, 0.0
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        loss = model.loss(model(batch, generator=gen), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i > 0:  # the first step pays one-off allocation costs
            elapsed += time.perf_counter() - t0
            frames += batch.num_frames
    n = max(len(batches) - 1, 1)
    return frames / max(elapsed, 1e-9), 1000 * elapsed / n, sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", help="feature cache (default: a tiny cache built in a temp folder)")
    ap.add_argument("--batch-frames", type=int, default=20_000)
    ap.add_argument("--workers", type=int, default=2, help="decode threads, or processes for a GIL-holding codec")
    ap.add_argument("--epochs", type=int, default=1, help="loader epochs to time")
    ap.add_argument("--steps", type=int, default=4, help="training steps to time")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--labels", help="labels manifest: only its utterances (default: the cache's own texts)")
    ap.add_argument("--load-rounds", type=int, default=2,
                    help="rounds of the load and a streamed epoch timed both ways (GIL codecs)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warn_if_loaded()
    tmp = None
    cache = args.cache
    if cache is None or not Path(cache).exists():
        from hff_cache.testing import tiny_cache

        tmp = tempfile.TemporaryDirectory()
        print("no --cache: building a tiny random-encoder cache (40 utterances x 2-6 s)", file=sys.stderr)
        cache = str(tiny_cache(tmp.name, [2.0 + (i % 5) for i in range(40)], ["AB BA"] * 40))
    reader = CacheReader(cache)
    labels = load_labels(args.labels) if args.labels else None
    task = Task.from_labels("asr", reader, labels)
    data = task.prepare(reader, labels)
    info = reader.info()
    common = dict(ctc=True, batch_frames=args.batch_frames, num_workers=args.workers, prefetch=4, seed=0)
    results: dict = {"cache": cache, "frames": int(sum(reader.lengths[data.indices])),
                     "layers": len(reader.meta.layers), "hidden_size": reader.meta.encoder.hidden_size,
                     "codec": info["codec"]["name"], "torch_threads": torch.get_num_threads()}
    with LoadWatch() as watch:
        stream = CacheBatches(reader, data, in_memory=False, **common)
        results["stream_fps"], _ = loader_rate(stream, args.epochs)
        memory = CacheBatches(reader, data, in_memory=True, **common)
        results["memory_fps"], results["memory_load_s"] = loader_rate(memory, args.epochs)
        results["step_fps"], results["step_ms"], results["params"] = step_rate(memory, task, args.steps)
        if uses_processes(reader, args.workers, len(memory.blocks)):
            results.update(gil_ways(reader, data, common, args.load_rounds))
    results["machine"], results["machine_line"] = watch.summary(), watch.line()
    results["stream_ratio"] = results["stream_fps"] / results["step_fps"]
    results["memory_ratio"] = results["memory_fps"] / results["step_fps"]
    print(f"cache {cache}: {results['frames']} frames x {results['layers']} layers x {results['hidden_size']} "
          f"({results['codec']}), batch_frames {args.batch_frames}, torch threads {results['torch_threads']}")
    workers = "processes" if "load_speedup" in results else "threads"
    print(f"  loader, streaming ({args.workers} decode {workers}): {results['stream_fps']:12,.0f} frames/s")
    print(f"  loader, in memory (load {results['memory_load_s']:.1f} s once): {results['memory_fps']:12,.0f} frames/s")
    print(f"  hierarchical train step ({results['params']:,} params, {results['step_ms']:.0f} ms/step): "
          f"{results['step_fps']:12,.0f} frames/s")
    print(f"  ratio loader/step: streaming {results['stream_ratio']:.1f}x, in memory {results['memory_ratio']:.1f}x "
          "(goal >= 5x)")
    if "load_speedup" in results:
        for job, what in (("load", "in-memory load"), ("stream", "streamed epoch")):
            print(f"  {what} of a GIL-holding codec: {args.workers} processes {results[f'{job}_processes_s']:.1f} s, "
                  f"{args.workers} threads {results[f'{job}_threads_s']:.1f} s (median of {args.load_rounds} "
                  f"rounds): {results[f'{job}_speedup']:.2f}x")
    print(f"  {results['machine_line']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
