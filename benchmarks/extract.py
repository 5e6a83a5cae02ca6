"""Extraction speed and cache size, side by side in one run.

- this extractor (length-sorted batches, real-length Whisper, threaded audio decoding) versus a
  naive loop (one utterance at a time, Whisper padded to 30 s as its feature extractor does);
- how far real-length features are from the 30 s-padded ones (what skipping the padding changes);
- bytes per stored value and per audio-second for each codec.

    python benchmarks/extract.py --model faster-whisper:base --num-utts 60

Writes docs/results/extract.md (and prints the same table).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hff_cache.cache import CacheReader
from hff_cache.config import ExtractConfig
from hff_cache.encoders import EncoderBatch, load_encoder
from hff_cache.extraction.extract import extract
from hff_cache.intake.audio import load_audio
from hff_cache.intake.manifests import load_intake
from hff_cache.runtime.threads import LoadWatch, warn_if_loaded

ROOT = Path(__file__).resolve().parents[1]
LIBRI = ROOT.parent / "shared" / "data" / "librispeech-subset"


def subset_manifest(data: Path, n: int, out: Path) -> Path:
    utts = sorted(load_intake(data), key=lambda u: u.id)
    step = max(1, len(utts) // n)
    with out.open("w") as f:
        for u in utts[::step][:n]:
            f.write(json.dumps({"id": u.id, "audio": u.audio, "text": u.text}) + "\n")
    return out


def naive_whisper(encoder, waves: list[np.ndarray]) -> tuple[float, list[list[np.ndarray]]]:
    """One utterance at a time through the 30 s-padded input, as transformers' WhisperEncoder requires."""
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=encoder.n_mels)
    outs = []
    start = time.perf_counter()
    for w in waves:
        feats = fe(w, sampling_rate=16000, return_tensors="pt")["input_features"]  # (1, 80, 3000)
        batch = EncoderBatch({"input_features": feats, "mel_lengths": torch.tensor([feats.shape[-1]])},
                             torch.tensor([feats.shape[-1] // 2]))
        with torch.inference_mode():
            states = encoder(batch)
        n = encoder.num_frames(len(w))
        outs.append([s[0, :n].numpy() for s in states])
    return time.perf_counter() - start, outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="faster-whisper:base")
    ap.add_argument("--data", default=str(LIBRI))
    ap.add_argument("--num-utts", type=int, default=60)
    ap.add_argument("--codecs", default="fp16,int8,int4")
    ap.add_argument("--report", default=str(ROOT / "docs" / "results" / "extract.md"))
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    warn_if_loaded()

    work = Path(tempfile.mkdtemp(prefix="hff-bench-extract-"))
    try:
        manifest = subset_manifest(Path(args.data), args.num_utts, work / "subset.jsonl")
        utts = load_intake(manifest)
        encoder = load_encoder(args.model)
        audio_s = sum(u.duration for u in utts)
        rows, sizes = [], []
        is_whisper = hasattr(encoder, "n_mels")
        with LoadWatch() as watch:  # the timed part: both extractors
            for i, codec in enumerate(args.codecs.split(",")):
                cfg = ExtractConfig(model=args.model, data=str(manifest), out=str(work / f"{codec}.zarr"),
                                    codec=codec, progress=False)
                t0 = time.perf_counter()
                extract(cfg, encoder=encoder)
                dt = time.perf_counter() - t0
                info = CacheReader(cfg.out).info()
                if i == 0:
                    rows.append(("hff-cache extract (batched, real length)", dt, audio_s / dt))
                sizes.append((codec, info["bytes"], info["bytes_per_value"], info["bytes"] / audio_s))
            if is_whisper:  # the same extractor on Whisper's padded 30 s window (`extract --whisper-window 30s`)
                cfg = ExtractConfig(model=args.model, data=str(manifest), out=str(work / "window30s.zarr"),
                                    whisper_window="30s", progress=False)
                t0 = time.perf_counter()
                extract(cfg, encoder=encoder)
                dt = time.perf_counter() - t0
                rows.append(("hff-cache extract --whisper-window 30s (batched, padded, trimmed)", dt, audio_s / dt))
                encoder.set_window("real")  # extract put it on the 30 s window; the naive loop pads by itself
                waves = [load_audio(u.audio, 16000) for u in utts]
                dt, naive = naive_whisper(encoder, waves)
                rows.append(("naive loop (one at a time, padded to 30 s)", dt, audio_s / dt))
        if is_whisper:
            reader = CacheReader(str(work / "fp16.zarr"))
            window = CacheReader(str(work / "window30s.zarr"))  # should be the naive loop's, batched
            window_err = max(float(np.linalg.norm(window.read(u.id)[:, k] - ref[k]) / np.linalg.norm(ref[k]))
                             for u, ref in zip(utts, naive, strict=True) for k in range(len(ref)))
            diffs = []
            for u, ref in zip(utts, naive, strict=True):
                got = reader.read(u.id)  # (T, L, D) real length
                for k in range(got.shape[1]):
                    a, b = got[:, k], ref[k]
                    cos = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-9)
                    diffs.append((k, float(np.mean(cos)), float(np.linalg.norm(a - b) / np.linalg.norm(b))))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    lines = [f"# Extraction: speed and size ({args.model}, {len(utts)} utterances, {audio_s / 60:.1f} min audio)", "",
             f"Command: `python benchmarks/extract.py {' '.join(sys.argv[1:])}`", "",
             "| extractor | seconds | audio-s per s |", "|---|---:|---:|"]
    lines += [f"| {name} | {dt:.1f} | {rate:.1f} |" for name, dt, rate in rows]
    lines += ["", watch.line()]
    if len(rows) == 3:
        lines += ["", f"**Speed-up over the naive loop: {rows[0][2] / rows[2][2]:.2f}x**; real length against the "
                  f"30 s window, the same extractor: **{rows[0][2] / rows[1][2]:.2f}x**"]
    lines += ["", "| codec | bytes on disk | bytes per value | bytes per audio-second |", "|---|---:|---:|---:|"]
    lines += [f"| {c} | {b:,} | {bpv:.3f} | {bps:,.0f} |" for c, b, bpv, bps in sizes]
    if is_whisper:
        by_layer: dict[int, list[tuple[float, float]]] = {}
        for k, cos, rel in diffs:
            by_layer.setdefault(k, []).append((cos, rel))
        lines += ["", f"The `--whisper-window 30s` cache against the naive padded loop: largest relative L2 "
                  f"difference of any utterance and hidden state {window_err:.4f} (fp16 storage)."]
        lines += ["", "Real length versus 30 s padding (same utterances, fp16 cache vs. padded forward):", "",
                  "| hidden state | mean cosine | relative L2 difference |", "|---:|---:|---:|"]
        lines += [f"| {k} | {np.mean([c for c, _ in v]):.4f} | {np.mean([r for _, r in v]):.3f} |"
                  for k, v in sorted(by_layer.items())]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(text)


if __name__ == "__main__":
    main()
