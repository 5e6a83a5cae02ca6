"""Cache size versus accuracy, side by side in one run: fp16, int8, int4, int4b, nf4b and tpca.

The fp16 caches are transcoded into each codec (`hff_cache.cache.transcode_cache`, what `hff-cache transcode`
runs: decode to float32, re-encode; tpca fits its statistics in a first pass over the cache), so every codec
sees the same frames and the encoder never runs again; then the same recipe trains on each. Reported for every
codec, with or without training, on --eval-utts utterances of the validation cache: the relative error
||x' - x|| / ||x|| and the mean squared error after a per-frame LayerNorm (what the fusion sees), per hidden
state; bytes per value (nominal, on disk, and the fit of a codec with one); hours of audio per GiB of RAM in
`--in-memory` residency; the speed of the numpy and torch (CPU) decoders.

    python benchmarks/codecs.py --train-cache DEMO/cache/<key>/train.zarr --valid-cache DEMO/cache/<key>/valid.zarr
    python benchmarks/codecs.py --valid-cache C/valid.zarr --epochs 0 --work /tmp/codecs   # errors and sizes only
    python benchmarks/codecs.py ... --epochs 1 --train-utts 100 --codecs fp16,tpca          # a smoke run

Writes docs/results/codecs.md and docs/img/codecs.png (and prints the same table); --doc/--img move them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from hff_cache.cache import CacheReader, get_codec, transcode_cache
from hff_cache.cache.reader import decode_codes
from hff_cache.config import parse_option_value
from hff_cache.runtime.threads import LoadWatch, warn_if_loaded

ROOT = Path(__file__).resolve().parents[1]


def parse_codec(spec: str) -> tuple[str, dict[str, Any]]:
    """``name`` or ``name:key=value:key=value`` (e.g. ``tpca:group=8``, ``int4b:block=16``) -> (name, params)."""
    name, *pairs = spec.split(":")
    params = {}
    for pair in pairs:
        key, value = pair.split("=", 1)
        params[key] = parse_option_value(value)  # as `--codec-param` reads it: numbers, else text
    return name, params


def transcoded(src: str, dst: Path, spec: str) -> str:
    """``dst``: ``src`` in codec ``spec`` (resumable: a finished transcode is only verified again)."""
    name, params = parse_codec(spec)
    summary = transcode_cache(src, str(dst), name, codec_params=params)
    if not summary["ok"]:
        raise SystemExit(f"transcoding {src} to {dst} failed its checks: " + "; ".join(summary["problems"]))
    return summary["dst"]


def spread(reader: CacheReader, n: int) -> list[int]:
    """``n`` utterance indices spread evenly over the cache (all of them when it holds fewer)."""
    return sorted({int(round(i)) for i in np.linspace(0, len(reader) - 1, min(n, len(reader)))})


def layer_errors(ref: CacheReader, other: CacheReader, idx: list[int]) -> tuple[list[float], list[float]]:
    """Per hidden state: relative error ||x' - x|| / ||x|| and the MSE after a per-frame LayerNorm."""

    def ln(x: np.ndarray) -> np.ndarray:
        return (x - x.mean(-1, keepdims=True)) / (x.std(-1, keepdims=True) + 1e-5)

    rel, ln_mse = [], []
    ids = [other.index_of(ref.ids[i]) for i in idx]
    for k in ref.layers:  # one layer at a time: 200 utterances of all layers would be gigabytes of float32
        a = np.concatenate(ref.read_many(idx, [k]))[:, 0]
        b = np.concatenate(other.read_many(ids, [k]))[:, 0]
        rel.append(float(np.linalg.norm(b - a) / np.linalg.norm(a)))
        ln_mse.append(float(np.mean((ln(a) - ln(b)) ** 2)))
    return rel, ln_mse


def store_sizes(url: str) -> dict[str, float]:
    """Bytes of a local cache: ``fit`` (the fit parts: no utterances, a codec's fitted statistics) and
    ``features`` (every ``layer_kk`` and side array of the other parts)."""
    out = {"features": 0.0, "fit": 0.0}
    if "://" in url:
        return out
    for part in (Path(url) / "parts").iterdir():
        if not part.is_dir():
            continue
        marker = json.loads((part / "zarr.json").read_text()).get("attributes", {})
        fit_part = marker.get("codec_fit") == part.name
        for arr in part.iterdir():
            if arr.is_dir() and (fit_part or not arr.name.startswith(("ids", "offsets", "lengths", "num_samples",
                                                                      "text", "meta", "stats_"))):
                size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(arr) for f in fs)
                out["fit" if fit_part else "features"] += size
    return out


def decode_speed(reader: CacheReader, idx: list[int]) -> dict[str, float]:
    """Milliseconds per 1000 frames of one layer: the numpy decoder and the torch one (CPU), both from the
    stored codes in RAM (what streaming and compressed residency pay per batch)."""
    import torch

    from hff_cache.batches import device_decode

    below = None  # a chained codec decodes the top layer from the decoded one below: decode those first, untimed
    if reader.codec.chained:
        for lower in reader.read_codes(idx, reader.layers[:-1]):
            below = decode_codes(reader.codec, lower, below=below)
    codes = reader.read_codes(idx, [reader.layers[-1]])[0]
    frames = int(codes.lengths.sum())
    t0 = time.perf_counter()
    decode_codes(reader.codec, codes, np.float16, below=below)
    out = {"numpy": (time.perf_counter() - t0) * 1e6 / frames}
    if device_decode.can_decode(reader.codec):
        dc = device_decode.DeviceCodes({k: torch.from_numpy(v) for k, v in codes.rows.items()}, codes.lengths,
                                       codes.group, device_decode.device_groups(reader.codec, codes.groups, "cpu"),
                                       codes.groups, None if below is None else torch.from_numpy(below))
        device_decode.decode(reader.codec, dc)  # warm-up: the first torch ops pay one-off costs
        t0 = time.perf_counter()
        device_decode.decode(reader.codec, dc).half()
        out["torch"] = (time.perf_counter() - t0) * 1e6 / frames
    return out


def measure(codec: str, ref_valid: CacheReader, va: str, idx: list[int]) -> dict[str, Any]:
    """Everything but the WER: sizes, errors, residency, decode speed of ``va`` (``ref_valid`` in ``codec``)."""
    name, params = parse_codec(codec)
    other = CacheReader(va)
    info = other.info()
    e = other.meta.encoder
    values = info["frames"] * len(other.layers) * e.hidden_size
    sizes = store_sizes(va)
    zeros = [0.0] * len(other.layers)  # the reference itself
    rel, ln_mse = layer_errors(ref_valid, other, idx) if va != ref_valid.url else (zeros, zeros)
    return {"codec": codec, "params": info["codec"]["params"],
            "nominal_bpv": get_codec(name, **params).bytes_per_value,
            "disk_bpv": info["bytes_per_value"], "features_bpv": sizes["features"] / values,
            "fit_mib": sizes["fit"] / 2**20, "mib": info["bytes"] / 2**20, "rel_err": rel,
            "ln_mse": ln_mse, "eval_frames": int(ref_valid.lengths[idx].sum()),
            "hours_per_gib": resident_hours_per_gib(other),
            "decode_us_per_frame": decode_speed(other, idx[:40])}


def resident_hours_per_gib(reader: CacheReader) -> float:
    """Hours of audio a GiB of RAM holds under ``--in-memory``, measured: every utterance of ``reader`` loaded
    as training would (the stored codes, bit-packed levels or decoded float16), all layers."""
    from hff_cache.batches.from_cache import CacheBatches
    from hff_cache.testing import unlabelled

    src = CacheBatches(reader, unlabelled(reader), ctc=False, in_memory=True)
    src.load()
    return src.num_frames / reader.meta.encoder.frame_rate / 3600 / (src.resident_nbytes / 2**30)


def subset_labels(reader: CacheReader, n: int, path: Path) -> str:
    """A labels file of ``n`` utterances spread over the cache, with the cache's texts (the run's split)."""
    with path.open("w", encoding="utf-8") as f:
        for i in spread(reader, n):
            f.write(json.dumps({"id": reader.ids[i], "text": reader.texts[i]}) + "\n")
    return str(path)


def train_codec(a: argparse.Namespace, codec: str, tr: str, va: str, labels: tuple[str | None, str | None]
                ) -> tuple[list[float], list[float]]:
    """(WER per seed, CER per seed) of the recipe on ``tr``/``va``; finished runs are reused."""
    from hff_cache.config import TrainConfig
    from hff_cache.model.fusion import FusionConfig
    from hff_cache.training.cached import train

    wers, cers = [], []
    for seed in [int(x) for x in a.seeds.split(",")]:
        tag = codec.replace(":", "-").replace("=", "")
        out = Path(a.work) / (f"run-{tag}" if seed == 0 else f"run-{tag}-s{seed}")
        if (out / "metrics.json").exists():  # a finished run of this recipe: reuse it
            m = json.loads((out / "metrics.json").read_text())
        else:
            cfg = TrainConfig(cache=tr, valid_cache=va, out=str(out), task="asr", labels=labels[0],
                              valid_labels=labels[1], fusion=FusionConfig(kind=a.fusion), epochs=a.epochs, lr=a.lr,
                              batch_frames=5000, max_batch_utts=32, warmup_steps=10, seed=seed, force=True)
            print(f"--- {codec} seed {seed}: training {cfg.out}", file=sys.stderr, flush=True)
            m = train(cfg)
        wers.append(m["wer"])
        cers.append(m["cer"])
    return wers, cers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train-cache", help="needed when training (--epochs > 0)")
    p.add_argument("--valid-cache", required=True)
    p.add_argument("--work", default=str(ROOT / "runs" / "bench_codecs"), help="transcoded caches and runs")
    p.add_argument("--codecs", default="fp16,int8,int4,int4b,nf4b,tpca",
                   help="comma-separated; parameters as name:key=value, e.g. tpca:group=8")
    p.add_argument("--fusion", default="last")
    p.add_argument("--epochs", type=int, default=10, help="0: no training, sizes and errors only")
    p.add_argument("--train-utts", type=int, default=0, help="train on this many utterances (0: all)")
    p.add_argument("--eval-utts", type=int, default=200, help="validation utterances the errors are measured on")
    p.add_argument("--seeds", default="0", help="comma-separated; WER is the mean, the change is paired by seed")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--doc", default=str(ROOT / "docs" / "results" / "codecs.md"))
    p.add_argument("--img", default=str(ROOT / "docs" / "img" / "codecs.png"))
    a = p.parse_args()
    if a.epochs > 0 and not a.train_cache:
        p.error("--train-cache is needed to train (or pass --epochs 0)")
    warn_if_loaded()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    ref_valid = CacheReader(a.valid_cache)
    idx = spread(ref_valid, a.eval_utts)
    labels: tuple[str | None, str | None] = (None, None)
    if a.epochs > 0 and a.train_utts:
        labels = (subset_labels(CacheReader(a.train_cache), a.train_utts, work / "train_labels.jsonl"),
                  subset_labels(ref_valid, len(ref_valid), work / "valid_labels.jsonl"))
    rows: list[dict[str, Any]] = []
    with LoadWatch() as watch:  # transcoding, measuring and training, every codec
        for codec in a.codecs.split(","):
            t0 = time.perf_counter()
            same = codec == ref_valid.meta.codec.name
            tag = codec.replace(":", "-").replace("=", "")
            va = a.valid_cache if same else transcoded(a.valid_cache, work / f"{tag}-valid.zarr", codec)
            tr = None
            if a.epochs > 0:
                tr = a.train_cache if same else transcoded(a.train_cache, work / f"{tag}-train.zarr", codec)
            row = {**measure(codec, ref_valid, va, idx), "transcode_s": time.perf_counter() - t0}
            if tr is not None:
                row["wers"], row["cers"] = train_codec(a, codec, tr, va, labels)
                row["wer"], row["cer"] = float(np.mean(row["wers"])), float(np.mean(row["cers"]))
            rows.append(row)
            print(json.dumps(row), flush=True)
    base = next((r for r in rows if r["codec"] == "fp16"), rows[0])
    for r in rows:  # paired by seed: the same seed gives every codec the same weights, batches and masks
        if "wers" in r and "wers" in base:
            r["dwers"] = [w - b for w, b in zip(r["wers"], base["wers"], strict=True)]
            r["dwer"] = float(np.mean(r["dwers"]))
    cmd = "python benchmarks/codecs.py " + " ".join(sys.argv[1:])
    md = render(rows, a, cmd, ref_valid, watch.line())
    Path(a.doc).parent.mkdir(parents=True, exist_ok=True)
    Path(a.doc).write_text(md)
    plot(rows, a.img)
    print(md)


def render(rows: list[dict[str, Any]], a: argparse.Namespace, cmd: str, ref: CacheReader, machine: str) -> str:
    layers, trained = ref.meta.layers, any("wer" in r for r in rows)
    e = ref.meta.encoder
    recipe = (f"the same recipe on each (fusion `{a.fusion}`, {a.epochs} epochs, lr {a.lr}, batches of 5000 frames, "
              f"seeds {a.seeds}{f', {a.train_utts} training utterances' if a.train_utts else ''}; WER/CER are means "
              "over seeds and the change against fp16 is paired by seed). " if trained else "no training. ")
    lines = [
        "## Cache codecs: size versus accuracy", "",
        f"`{cmd}`", "",
        f"{time.strftime('%Y-%m-%d')}. Encoder `{e.name}` ({len(layers)} hidden states x {e.hidden_size}); the fp16 "
        f"caches transcoded to each codec; {recipe}Errors on {rows[0]['eval_frames']} frames of {a.eval_utts} "
        "validation utterances: relative error ||x' - x|| / ||x|| and LN-MSE (mean squared error after a per-frame "
        f"LayerNorm, what the fusion sees), per hidden state {layers[0]}..{layers[-1]}. Bytes per value: nominal "
        "(payload + per-frame side arrays, before zstd), on disk (everything in the store / values stored), on disk "
        "of the feature arrays alone; fit: the fitted statistics (tpca: one fit part per writer, left out of the "
        "feature bytes). h/GiB: hours of audio (50 frames/s) one GiB of RAM holds with `--in-memory`, measured by "
        "loading the validation cache as training does. Decode: "
        "microseconds per frame of one layer from the codes in RAM, numpy / torch (CPU).", "",
        "| codec | nominal B/value | disk B/value | features B/value | fit MiB | h/GiB RAM | decode us/frame | "
        + ("WER % | WER change vs fp16 | " if trained else "")
        + "rel. error per hidden state | LN-MSE per hidden state |",
        "|---|---:|---:|---:|---:|---:|---|" + ("---:|---:|" if trained else "") + "---|---|",
    ]
    for r in rows:
        speed = " / ".join(f"{v:.1f}" for v in r["decode_us_per_frame"].values())
        wer = f"{r['wer']:.2f} | {r.get('dwer', 0.0):+.2f} | " if trained else ""
        lines.append(f"| {r['codec']} | {r['nominal_bpv']:.3f} | {r['disk_bpv']:.3f} | {r['features_bpv']:.3f} | "
                     f"{r['fit_mib']:.1f} | {r['hours_per_gib']:.2f} | {speed} | {wer}"
                     + " ".join(f"{x:.3f}" for x in r["rel_err"]) + " | "
                     + " ".join(f"{x:.4f}" for x in r["ln_mse"]) + " |")
    image = os.path.relpath(a.img, Path(a.doc).parent)  # the figure this run wrote, wherever --img put it
    lines += ["", machine, "", f"![bytes per value versus error and WER]({image})", ""]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: str) -> None:
    """Bytes per value (on disk) against the mean LN-MSE and, when trained, against the WER change."""
    from hff_cache.runs.plots import plt, save_figure

    trained = [r for r in rows if "dwer" in r]
    fig, axes = plt.subplots(1, 2 if trained else 1, figsize=(10 if trained else 5, 3.5), squeeze=False)
    # fp16 is the reference (error 0): drawn at 1e-6 so the log axis can show it
    panels = [("LN-MSE", "mean LN-MSE over hidden states", lambda r: max(float(np.mean(r["ln_mse"])), 1e-6), rows)]
    if trained:
        panels.append(("WER", "WER change vs fp16 (points)", lambda r: r["dwer"], trained))
    for ax, (short, label, value, which) in zip(axes[0], panels, strict=True):
        families: dict[str, list[dict[str, Any]]] = {}  # one series per codec name: tpca at several rates is a curve
        for r in which:
            families.setdefault(r["codec"].split(":")[0], []).append(r)
        for name, members in families.items():
            members = sorted(members, key=lambda r: r["disk_bpv"])
            xs, ys = [r["disk_bpv"] for r in members], [value(r) for r in members]
            ax.plot(xs, ys, marker="o", linestyle="-" if len(members) > 1 else "none", label=name)
            for r, x, y in zip(members, xs, ys, strict=True):
                if ":" in r["codec"] or len(members) > 1:  # name the parameters of a family's points
                    ax.annotate(r["codec"].split(":", 1)[-1] if ":" in r["codec"] else "default", (x, y),
                                textcoords="offset points", xytext=(4, 4), fontsize=6)
        ax.set(xlabel="bytes per stored value (on disk)", ylabel=label, title=f"cache codec: size vs {short}")
        if short == "LN-MSE":
            ax.set_yscale("log")
        ax.set_xscale("log")  # the compact codecs crowd below 0.5 B/value
        from matplotlib.ticker import FuncFormatter

        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if round(v * 10) in (2, 3, 5) else ""))
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
