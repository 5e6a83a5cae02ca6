"""Training cost, cached versus online, side by side in one run: step time and peak memory.

For each encoder (faster-whisper:base; a random-weight wav2vec2-large-shaped model) and each method
(cached ``hierarchical``; online ``hff-frozen``, ``hff-adapters``, ``adapters``, ``bitfit``, ``full``), a
fresh subprocess builds the online setup (``online.prepare_online``) on the same audio, takes the same
first ``--steps`` + 1 batches of epoch 0, and times full training steps (forward, CTC loss, backward,
AdamW) after one warm-up step. The cached step runs the same hierarchical model on features the frozen
encoder computed beforehand for exactly those batches (what a cache read yields; the read itself is
excluded). Per-epoch seconds = mean step time x batches per epoch (extrapolated, not measured).
Memory: the process's resident set sampled every 5 ms during the timed steps, minus the resident set just
before them (model, optimizer and data already loaded), plus the absolute peak.
Bound: (encoder forward + cached step) / cached step, the speed-up a cache can give over hff-frozen.

    python benchmarks/training_cost.py --data DEMO/corpus/train_manifest.jsonl

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

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("cached-hierarchical", "hff-frozen", "hff-adapters", "adapters", "bitfit", "full")
ENCODERS = ("faster-whisper:base", "random:wav2vec2-large")


def wav2vec2_large_random() -> Any:
    """wav2vec2-large (LV-60 layout) dimensions with random weights: the cost, not the accuracy."""
    import transformers as tf

    from hff_cache.encoders.hf import HFSpeechEncoder

    cfg = tf.Wav2Vec2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                            intermediate_size=4096, do_stable_layer_norm=True, feat_extract_norm="layer",
                            conv_bias=True, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                            feat_proj_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0)
    enc = HFSpeechEncoder(tf.Wav2Vec2Model(cfg), "random:wav2vec2-large")
    for p in enc.parameters():
        p.requires_grad_(False)
    return enc.eval()


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


def child(encoder_name: str, method: str, data: str, steps: int, batch_seconds: float, utts: int) -> dict:
    import torch

    import hff_cache.encoders as encoders
    from hff_cache.config import TrainConfig
    from hff_cache.model import HFFModel, ModelSpec
    from hff_cache.online import prepare_online

    torch.manual_seed(0)
    if encoder_name == "random:wav2vec2-large":
        encoders.load_encoder = lambda name, device="cpu": wav2vec2_large_random()  # prepare_online looks it up
    cached = method.startswith("cached")
    cfg = TrainConfig(online=True, model=encoder_name, data=data, method="hff-frozen" if cached else method,
                      batch_seconds=batch_seconds, max_train_utts=utts, num_workers=1, prefetch=1)
    setup, _ = prepare_online(cfg, log=lambda m: print(m, file=sys.stderr))
    per_epoch = len(setup.train)
    batches = list(itertools.islice(setup.train.epoch(0), steps + 1))
    model = setup.model
    enc_fwd = None
    if cached:
        # Features of exactly these batches, as a cache would return them; then drop the encoder.
        feats, t = [], []
        with torch.no_grad():
            for b in batches:
                t0 = time.perf_counter()
                feats.append(model.features(b).float())
                t.append(time.perf_counter() - t0)
        enc_fwd = sum(t[1:]) / max(len(t) - 1, 1)
        batches = [dataclasses.replace(b, feats=f, inputs=None, waves=None) for b, f in zip(batches, feats,
                                                                                             strict=True)]
        spec = ModelSpec.from_dict(model.spec.to_dict())
        model = HFFModel(spec, encoder=None, augment=model.augment)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step(b: Any) -> None:
        loss = model.loss(model(b), b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step(batches[0])  # warm-up: allocator, optimizer state
    times = []
    with PeakRSS() as mem:
        for b in batches[1:]:
            t0 = time.perf_counter()
            step(b)
            times.append(time.perf_counter() - t0)
    step_s = sum(times) / len(times)
    return {"encoder": encoder_name, "method": method, "step_s": step_s, "epoch_s_extrapolated": step_s * per_epoch,
            "batches_per_epoch": per_epoch, "trainable_params": sum(p.numel() for p in params),
            "mem_step_mb": mem.peak - mem.base, "peak_rss_mb": mem.peak, "encoder_forward_s": enc_fwd,
            "frames": [int(b.lengths.sum()) for b in batches[1:]]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="training manifest (the demo corpus)")
    p.add_argument("--encoders", default=",".join(ENCODERS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-seconds", type=float, default=20.0)
    p.add_argument("--utts", type=int, default=64, help="utterances in the (evenly spaced) training subset")
    p.add_argument("--child", nargs=2, metavar=("ENCODER", "METHOD"), help=argparse.SUPPRESS)
    p.add_argument("--doc", default=str(ROOT / "docs" / "results" / "training_cost.md"))
    p.add_argument("--img", default=str(ROOT / "docs" / "img" / "training_cost.png"))
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(*a.child, a.data, a.steps, a.batch_seconds, a.utts)))
        return
    rows = []
    for enc in a.encoders.split(","):
        for m in a.methods.split(","):
            cmd = [sys.executable, __file__, "--data", a.data, "--steps", str(a.steps), "--batch-seconds",
                   str(a.batch_seconds), "--utts", str(a.utts), "--child", enc, m]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{enc} {m} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    md = render(rows, "python benchmarks/training_cost.py " + " ".join(sys.argv[1:]), a)
    Path(a.doc).parent.mkdir(parents=True, exist_ok=True)
    Path(a.doc).write_text(md)
    plot(rows, a.img)
    print(md)


def render(rows: list[dict], cmd: str, a: argparse.Namespace) -> str:
    lines = ["## Training cost: cached versus online", "", f"`{cmd}`", "",
             f"{time.strftime('%Y-%m-%d')}. {a.steps} timed steps per method after one warm-up, the same batches "
             f"(<= {a.batch_seconds:.0f} s of padded audio each) from {a.utts} utterances of the demo corpus; "
             "per-epoch seconds are step time x batches per epoch (extrapolated). Ratio = online step / cached "
             "step; bound = (encoder forward + cached step) / cached step. Memory: resident-set growth during "
             "the timed steps (CPU).", ""]
    for enc in dict.fromkeys(r["encoder"] for r in rows):
        rs = [r for r in rows if r["encoder"] == enc]
        base = next((r for r in rs if r["method"].startswith("cached")), None)
        bound = (base["encoder_forward_s"] + base["step_s"]) / base["step_s"] if base else float("nan")
        lines += [f"### {enc}", "", "| method | trainable params | step s | epoch s (extrap.) | ratio vs cached | "
                  "bound | step memory MiB | peak RSS MiB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rs:
            ratio = r["step_s"] / base["step_s"] if base else float("nan")
            lines.append(f"| {r['method']} | {r['trainable_params']:,} | {r['step_s']:.2f} | "
                         f"{r['epoch_s_extrapolated']:.0f} | {ratio:.1f}x | {bound:.1f}x | {r['mem_step_mb']:.0f} | "
                         f"{r['peak_rss_mb']:.0f} |")
        if base:
            lines += ["", f"Encoder forward per batch: {base['encoder_forward_s']:.2f} s; cached step "
                      f"{base['step_s']:.3f} s.", ""]
    lines += ["![step time per method](../img/training_cost.png)", ""]
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    encs = list(dict.fromkeys(r["encoder"] for r in rows))
    fig, axes = plt.subplots(1, max(len(encs), 1), figsize=(5 * max(len(encs), 1), 3.5), squeeze=False)
    for ax, enc in zip(axes[0], encs, strict=False):
        rs = [r for r in rows if r["encoder"] == enc]
        ax.bar([r["method"] for r in rs], [r["step_s"] for r in rs])
        ax.set(title=enc, ylabel="seconds per training step (CPU)", yscale="log")
        ax.tick_params(axis="x", rotation=35)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
