"""Cache size versus accuracy, side by side in one run: fp16, int8, int4 and int4b (block-scaled int4).

The fp16 caches are transcoded into each codec (`hff_cache.cache.transcode_cache`, what `hff-cache transcode`
runs: decode to float32, re-encode), so every codec sees the same frames and the encoder never runs again;
then the same recipe trains on each. Also reported: the reconstruction error in the space the fusion sees
(after its per-frame LayerNorm), per hidden state.

    python benchmarks/codecs.py --train-cache DEMO/cache/<key>/train.zarr --valid-cache DEMO/cache/<key>/valid.zarr

Writes docs/results/codecs.md and docs/img/codecs.png (and prints the same table).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from hff_cache.cache import CacheReader, get_codec, transcode_cache
from hff_cache.config import TrainConfig
from hff_cache.model.fusion import FusionConfig
from hff_cache.runtime.threads import LoadWatch, warn_if_loaded
from hff_cache.training.cached import train

ROOT = Path(__file__).resolve().parents[1]


def transcoded(src: str, dst: Path, codec: str) -> str:
    """``dst``: ``src`` in ``codec`` (resumable: a finished transcode is only verified again)."""
    summary = transcode_cache(src, str(dst), codec)
    if not summary["ok"]:
        raise SystemExit(f"transcoding {src} to {dst} failed its checks: " + "; ".join(summary["problems"]))
    return summary["dst"]


def ln_error(ref: CacheReader, other: CacheReader, n: int = 40) -> list[float]:
    """Mean squared error after a per-frame LayerNorm (what the fusion sees), per hidden state."""
    idx = list(range(0, len(ref), max(1, len(ref) // n)))[:n]
    a = np.concatenate(ref.read_many(idx), 0)
    b = np.concatenate(other.read_many([other.index_of(ref.ids[i]) for i in idx]), 0)

    def ln(x: np.ndarray) -> np.ndarray:
        return (x - x.mean(-1, keepdims=True)) / (x.std(-1, keepdims=True) + 1e-5)

    return [float(((ln(a[:, j]) - ln(b[:, j])) ** 2).mean()) for j in range(a.shape[1])]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train-cache", required=True)
    p.add_argument("--valid-cache", required=True)
    p.add_argument("--work", default=str(ROOT / "runs" / "bench_codecs"))
    p.add_argument("--codecs", default="fp16,int8,int4,int4b")
    p.add_argument("--fusion", default="last")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seeds", default="0", help="comma-separated; WER is the mean, the change is paired by seed")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--doc", default=str(ROOT / "docs" / "results" / "codecs.md"))
    p.add_argument("--img", default=str(ROOT / "docs" / "img" / "codecs.png"))
    a = p.parse_args()
    warn_if_loaded()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    ref_train, ref_valid = CacheReader(a.train_cache), CacheReader(a.valid_cache)
    rows: list[dict[str, Any]] = []
    seeds = [int(x) for x in a.seeds.split(",")]
    with LoadWatch() as watch:  # transcoding and training, every codec
        for codec in a.codecs.split(","):
            t0 = time.perf_counter()
            if codec == ref_train.meta.codec.name:
                tr, va = a.train_cache, a.valid_cache
            else:
                tr = transcoded(a.train_cache, work / f"{codec}-train.zarr", codec)
                va = transcoded(a.valid_cache, work / f"{codec}-valid.zarr", codec)
            t_code = time.perf_counter() - t0
            info = CacheReader(tr).info()
            err = ln_error(ref_valid, CacheReader(va))
            # Same recipe for every codec (the demo's: short, higher LR, small batches); paired seeds.
            wers, cers = [], []
            for seed in seeds:
                out = work / (f"run-{codec}" if seed == 0 else f"run-{codec}-s{seed}")
                if (out / "metrics.json").exists():  # a finished run of this recipe: reuse it
                    m = json.loads((out / "metrics.json").read_text())
                else:
                    cfg = TrainConfig(cache=tr, valid_cache=va, out=str(out), task="asr",
                                      fusion=FusionConfig(kind=a.fusion), epochs=a.epochs, lr=a.lr, batch_frames=5000,
                                      max_batch_utts=32, warmup_steps=10, seed=seed, force=True)
                    print(f"--- {codec} seed {seed}: training {cfg.out}", file=sys.stderr, flush=True)
                    m = train(cfg)
                wers.append(m["wer"])
                cers.append(m["cer"])
            rows.append({"codec": codec, "params": info["codec"]["params"],
                         "nominal_bpv": get_codec(codec).bytes_per_value, "disk_bpv": info["bytes_per_value"],
                         "mib": info["bytes"] / 2**20, "wers": wers, "wer": float(np.mean(wers)),
                         "cer": float(np.mean(cers)), "ln_mse": err, "transcode_s": t_code})
            print(json.dumps(rows[-1]), flush=True)
    base = next((r for r in rows if r["codec"] == "fp16"), rows[0])
    for r in rows:  # paired by seed: the same seed gives every codec the same weights, batches and masks
        r["dwers"] = [w - b for w, b in zip(r["wers"], base["wers"], strict=True)]
        r["dwer"] = float(np.mean(r["dwers"]))
    cmd = "python benchmarks/codecs.py " + " ".join(sys.argv[1:])
    md = render(rows, a, cmd, ref_train, watch.line())
    Path(a.doc).parent.mkdir(parents=True, exist_ok=True)
    Path(a.doc).write_text(md)
    plot(rows, a.img)
    print(md)


def render(rows: list[dict[str, Any]], a: argparse.Namespace, cmd: str, ref: CacheReader, machine: str) -> str:
    layers = ref.meta.layers
    lines = [
        "## Cache codecs: size versus accuracy", "",
        f"`{cmd}`", "",
        f"{time.strftime('%Y-%m-%d')}. Encoder `{ref.meta.encoder.name}`, {len(ref)} training utterances; the fp16 "
        f"caches transcoded to each codec; the same recipe on each (fusion `{a.fusion}`, {a.epochs} epochs, "
        f"lr {a.lr}, batches of 5000 frames, seeds {a.seeds}; WER/CER are means over seeds and the change against "
        "fp16 is paired by seed). Bytes per value: nominal (payload + per-frame side "
        "arrays, before zstd) and measured on disk (everything in the store / values stored). LN-MSE: mean "
        "squared error after a per-frame LayerNorm (what the fusion sees), per hidden state "
        f"{layers[0]}..{layers[-1]}.", "",
        "| codec | nominal B/value | disk B/value | cache MiB | WER % | per-seed WER | CER % | WER change vs fp16 | "
        "LN-MSE per hidden state |",
        "|---|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r['codec']} | {r['nominal_bpv']:.3f} | {r['disk_bpv']:.3f} | {r['mib']:.0f} | "
                     f"{r['wer']:.2f} | {' '.join(f'{w:.1f}' for w in r['wers'])} | {r['cer']:.1f} | "
                     f"{r['dwer']:+.2f} | "
                     + " ".join(f"{e:.3f}" for e in r["ln_mse"]) + " |")
    lines += ["", machine, "", "![bytes per value versus WER](../img/codecs.png)", ""]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: str) -> None:
    from hff_cache.runs.plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for r in rows:
        ax.scatter(r["disk_bpv"], r["wer"])
        ax.annotate(r["codec"], (r["disk_bpv"], r["wer"]), textcoords="offset points", xytext=(4, 4))
    ax.set(xlabel="bytes per stored value (on disk)", ylabel="validation WER %", title="cache codec: size vs WER")
    ax.grid(alpha=0.3)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
