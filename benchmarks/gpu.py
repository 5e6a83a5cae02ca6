"""The GPU check: one short script for a lent H100/H200 (8 minutes or less), and a CPU dry run for CI.

It measures, through the package's own code paths:
1. extraction throughput (``hff_cache.extraction.extract``, bf16 autocast on CUDA) for Whisper base and the
   wav2vec2-large shape (random weights): seconds of audio per wall second, into a real cache;
2. a cached epoch against online steps: ``hierarchical`` from that cache (in RAM) and ``hff-adapters`` with the
   encoder in the loop, the same utterances, training steps timed after a warm-up: utterances per second;
3. the cached epoch streamed through the loader against the same batches already on the device (the
   compute floor);
4. on-device decoding of the stored codes (``hff_cache.batches.device_decode``): each codec's codes resident on
   the device, an epoch of batches decoded there: values per second (the entropy-coded tpcae/tpcape only in the
   dry run: their CPU encoder does not fit the 8 minutes on the large cache).

    bash benchmarks/gpu.sh            # on the GPU machine: writes $OUT/gpu.md and $OUT/gpu.jsonl
    bash benchmarks/gpu.sh --dry-run  # CPU, tiny random models, seconds: what CI runs

Every measurement is printed as one JSON line as soon as it is taken, so a run cut short keeps what it got.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from training_cost import training_step  # noqa: E402

from hff_cache.config import ExtractConfig, TrainConfig  # noqa: E402
from hff_cache.extraction.extract import extract  # noqa: E402
from hff_cache.model.fusion import FusionConfig  # noqa: E402
from hff_cache.testing import write_corpus  # noqa: E402

# random weights of the real shapes: the lent machine reaches no model hub, and cost does not depend on weights
FULL = {"encoders": ["random:whisper-base", "random:wav2vec2-large"], "utts": 120, "seconds": 12.0, "steps": 10}
DRY = {"encoders": ["tiny-random:whisper", "tiny-random:wav2vec2"], "utts": 6, "seconds": 1.0, "steps": 2}


def emit(out: Path, row: dict[str, Any]) -> dict[str, Any]:
    line = json.dumps(row)
    print(line, flush=True)
    with (out / "gpu.jsonl").open("a") as f:
        f.write(line + "\n")
    return row


def encoder_for(name: str) -> Any:
    from hff_cache.encoders import load_encoder

    return load_encoder(name)


def measure_extraction(name: str, manifest: Path, work: Path, device: str, audio_s: float) -> tuple[dict, Path]:
    cache = work / f"{name.replace(':', '_')}.zarr"
    encoder = encoder_for(name)
    cfg = ExtractConfig(model=name, data=str(manifest), out=str(cache), device=device, progress=False,
                        precision="bf16" if device == "cuda" else "fp32", batch_seconds=120.0)
    _sync(device)
    t0 = time.perf_counter()
    extract(cfg, encoder=encoder)
    _sync(device)
    wall = time.perf_counter() - t0
    row = {"check": "extract", "encoder": name, "precision": cfg.precision, "audio_s": audio_s, "wall_s": wall,
           "x_real_time": audio_s / wall}
    return row, cache


def time_steps(setup: Any, device: str, steps: int) -> float:
    """Seconds per utterance over ``steps`` training steps after one warm-up (forward, loss, backward, AdamW)."""
    model = setup.model.to(device).train()
    step = training_step(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4))
    batches = []
    for b in setup.train.epoch(0):
        batches.append(b)
        if len(batches) > steps:
            break
    utts, elapsed = 0, 0.0
    for i in range(steps + 1):  # a small corpus repeats its batches
        b = batches[i % len(batches)].to(device)
        _sync(device)
        t0 = time.perf_counter()
        step(b)
        _sync(device)
        if i:  # the first is the warm-up (allocator, kernels, optimizer state)
            elapsed += time.perf_counter() - t0
            utts += len(b)
    return elapsed / max(utts, 1)


def measure_training(name: str, cache: Path, manifest: Path, device: str, steps: int) -> dict:
    from hff_cache.training.cached import prepare
    from hff_cache.training.online import prepare_online

    quiet = lambda _m: None  # noqa: E731
    cached = prepare(TrainConfig(cache=str(cache), out=str(cache.parent / "run"), device=device, in_memory="true",
                                 fusion=FusionConfig(kind="hierarchical"), batch_frames=12_000), log=quiet)
    cached_s = time_steps(cached, device, steps)
    online, _ = prepare_online(TrainConfig(online=True, model=name, data=str(manifest), method="hff-adapters",
                                           device=device, batch_seconds=240.0), log=quiet)
    online_s = time_steps(online, device, steps)
    return {"check": "train", "encoder": name, "cached_s_per_utt": cached_s, "online_s_per_utt": online_s,
            "online_over_cached": online_s / cached_s}


def measure_streaming(name: str, cache: Path, device: str) -> dict:
    """A cached ``hierarchical`` epoch streamed from the cache through the loader (decode threads on the host,
    each batch moved to the device) against the same batches already on the device -- the fusion and head
    alone, the compute floor (issue 14's goal: streamed within 1.2x of it)."""
    from hff_cache.training.cached import prepare

    cfg = TrainConfig(cache=str(cache), out=str(cache.parent / "run-stream"), device=device, in_memory="false",
                      fusion=FusionConfig(kind="hierarchical"), batch_frames=12_000, num_workers=4, seed=0)
    setup = prepare(cfg, log=lambda _m: None)
    model = setup.model.to(device).train()
    step = training_step(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4))
    step(next(iter(setup.train.epoch(0))).to(device))  # warm-up: kernels, allocator, optimizer state

    def timed(batches: Any) -> float:
        _sync(device)
        t0 = time.perf_counter()
        for b in batches:
            step(b.to(device))
        _sync(device)
        return time.perf_counter() - t0

    streamed = timed(setup.train.epoch(1))
    on_device = [b.to(device) for b in setup.train.epoch(1)]
    floor = timed(on_device)
    return {"check": "stream", "encoder": name, "streamed_s": streamed, "floor_s": floor,
            "streamed_over_floor": streamed / floor, "batches": len(on_device)}


def measure_device_decode(cache: Path, device: str, small: bool) -> list[dict]:
    """Each codec with a torch decoder: the cache transcoded to it, its codes resident on ``device``, one epoch of
    batches decoded there (``CacheBatches`` with ``resident="codes"``): values decoded per second."""
    from hff_cache.batches.device_decode import DECODERS
    from hff_cache.batches.from_cache import CacheBatches
    from hff_cache.cache import CacheReader, transcode_cache
    from hff_cache.cache.codecs import CODECS
    from hff_cache.tasks.task import Task

    rows = []
    for codec in DECODERS:
        if not small and CODECS[codec].packed_residency:
            # the entropy-coded codecs' CPU encoder (rate control, ANS) would take most of the 8 minutes on the
            # large cache; their torch decoder is tpca's operations plus exact products, timed in the dry run
            continue
        params = {"block": 16} if small and codec in ("int4b", "nf4b") else None  # tiny models are 32 wide
        dst = cache.parent / f"{cache.stem}-{codec}.zarr"
        transcode_cache(str(cache), str(dst), codec, codec_params=params)
        reader = CacheReader(str(dst))
        task = Task.from_labels("asr", reader, None, "char")
        src = CacheBatches(reader, task.prepare(reader, None, "train"), ctc=True, shuffle=False, in_memory=True,
                           resident="codes", device=device)
        src.load()
        for _ in src.epoch(0):  # warm-up: kernels, allocator
            break
        _sync(device)
        t0 = time.perf_counter()
        frames = sum(b.num_frames for b in src.epoch(1))
        _sync(device)
        seconds = time.perf_counter() - t0
        values = frames * len(reader.meta.layers) * reader.meta.encoder.hidden_size
        rows.append({"check": "device_decode", "codec": codec, "values_per_s": values / seconds,
                     "resident_mib": src.resident_nbytes / 2**20, "frames": frames})
    return rows


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def render(rows: list[dict], device: str) -> str:
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (dry run)"
    lines = [f"## GPU check: `bash benchmarks/gpu.sh` on {name}", "", "| check | encoder | result |", "|---|---|---|"]
    for r in rows:
        if r["check"] == "extract":
            lines.append(f"| extraction ({r['precision']}) | {r['encoder']} | {r['x_real_time']:.0f}x real time "
                         f"({r['audio_s']:.0f} s of audio in {r['wall_s']:.1f} s) |")
        elif r["check"] == "train":
            lines.append(f"| training step | {r['encoder']} | cached hierarchical {1 / r['cached_s_per_utt']:.0f} "
                         f"utt/s, online hff-adapters {1 / r['online_s_per_utt']:.1f} utt/s: "
                         f"{r['online_over_cached']:.1f}x |")
        elif r["check"] == "stream":
            lines.append(f"| cached epoch streamed | {r['encoder']} | {r['streamed_s']:.2f} s vs "
                         f"{r['floor_s']:.2f} s with the batches on the device: {r['streamed_over_floor']:.2f}x |")
        elif "skipped" in r:
            lines.append(f"| {r['check']} | | not measured: {r['skipped']} |")
        else:
            lines.append(f"| on-device decoding | {r['codec']} | {r['values_per_s']:.3g} values/s "
                         f"({r['resident_mib']:.1f} MiB resident) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny random models (CI)")
    p.add_argument("--out", default=".", help="folder for gpu.jsonl and gpu.md")
    a = p.parse_args()
    plan = DRY if a.dry_run else FULL
    device = "cpu" if a.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device visible: run with --dry-run on a CPU machine")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.jsonl").unlink(missing_ok=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        durations = [plan["seconds"]] * plan["utts"]
        manifest = write_corpus(work / "audio", durations, ["A B"] * plan["utts"])
        for name in plan["encoders"]:
            row, cache = measure_extraction(name, manifest, work, device, sum(durations))
            rows.append(emit(out, row))
            rows.append(emit(out, measure_training(name, cache, manifest, device, plan["steps"])))
            rows.append(emit(out, measure_streaming(name, cache, device)))
        rows += [emit(out, r) for r in measure_device_decode(cache, device, small=a.dry_run)]
    (out / "gpu.md").write_text(render(rows, device))
    print(render(rows, device))


if __name__ == "__main__":
    main()
