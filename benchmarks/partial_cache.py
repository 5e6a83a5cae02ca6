"""Partial caching's cost curve: hff-adapters from layer K (h_0..h_K cached) against adapters in every layer.

For each encoder shape and each K from L (cached HFF, nothing online) down to 0 (adapters in every layer, the
front end skipped), a fresh subprocess builds ``hff-adapters`` with ``--from-layer K`` exactly as
``training.partial`` does (adapters in layers K+1..L, hierarchical fusion over every hidden state) and times
full training steps (forward, CTC loss, backward, AdamW) on the same batch: h_0..h_K as an in-RAM fp16 cache
holds them, the top layers computed. The reference row, ``online``, is today's ``hff-adapters`` from audio:
front end and every layer in the loop. Memory: the resident-set growth during the timed steps (activations,
gradients, optimizer state, from before the first step), the tensors autograd saves for the backward pass
(counted exactly, weights aside), and the process peak (weights included).

    python benchmarks/partial_cache.py --shapes random:whisper-base,random:wav2vec2-large --threads 2

Writes docs/results/partial_cache.md and docs/img/partial_cache.png. Step times only; the WER side of the
curve comes from training runs (pipelines/real_speech/run.sh stage 10).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from training_cost import PeakRSS, training_step  # noqa: E402

from hff_cache.runtime.threads import LoadWatch, warn_if_loaded  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ("random:whisper-base", "random:wav2vec2-large")


def load_shape(name: str) -> Any:
    from hff_cache.encoders import load_encoder

    return load_encoder(name)


def child(shape: str, k: str, batch: int, seconds: float, steps: int, threads: int) -> dict:
    import numpy as np
    import torch

    from hff_cache.model.adapters import encoder_parameter_counts, setup_method
    from hff_cache.model.batch import Batch
    from hff_cache.model.hff import HFFModel, ModelSpec

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    encoder = load_shape(shape)
    top = encoder.num_hidden_states - 1
    from_layer = None if k == "online" else int(k)
    rng = np.random.default_rng(0)
    waves = [rng.standard_normal(int(seconds * 16000)).astype(np.float32) * 0.1 for _ in range(batch)]
    inputs = encoder.prepare(waves)
    lengths = inputs.frame_lengths
    spec = ModelSpec(fusion={"kind": "hierarchical"}, num_layers=top + 1, hidden_size=encoder.info.hidden_size,
                     head="ctc", vocab_size=32, layers=list(range(top + 1)), from_layer=from_layer)
    common = dict(ids=[str(i) for i in range(batch)], lengths=lengths,
                  targets=torch.randint(1, 32, (batch, int(seconds * 12))),
                  target_lengths=torch.full((batch,), int(seconds * 12)))
    if from_layer is None:
        b = Batch(**common, inputs=inputs)
    else:  # what an in-RAM fp16 cache hands the step: h_0..h_K, stored once
        with torch.no_grad():
            stored = encoder(inputs, spec.cached_layers)
        b = Batch(**common, feats=torch.stack(stored, dim=2).half())
    setup_method(encoder, "hff-adapters", 64, from_layer)
    model = HFFModel(spec, encoder=encoder).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    step = training_step(model, opt)
    activations = saved_for_backward_mb(model, b)
    times = []
    with PeakRSS() as mem:  # from before the first step: optimizer state, gradients, activations
        step(b)  # warm-up: allocator, optimizer state
        for _ in range(steps):
            t0 = time.perf_counter()
            step(b)
            times.append(time.perf_counter() - t0)
    return {"shape": shape, "k": k, "layers": top, "step_s": min(times), "mem_step_mb": mem.peak - mem.base,
            "activations_mb": activations, "peak_rss_mb": mem.peak,
            "trainable_encoder_params": encoder_parameter_counts(encoder)["trainable_encoder_params"],
            "batch": batch, "seconds": seconds}


def saved_for_backward_mb(model: Any, b: Any) -> float:
    """MiB of the tensors autograd keeps for the backward pass (weights aside): the memory that running fewer
    layers in the loop saves, free of the allocator's and the machine's noise."""
    import torch

    weights = {p.data_ptr() for p in model.parameters()}
    saved: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in weights:
            saved[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.loss(model(b), b)
    return sum(saved.values()) / 2**20


def ks_for(layers: int, every: int) -> list[str]:
    ks = sorted({layers, layers // 2, 0, *range(0, layers + 1, every)}, reverse=True)
    return [str(k) for k in ks] + ["online"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--batch", type=int, default=4, help="utterances per step")
    p.add_argument("--seconds", type=float, default=8.0, help="seconds of audio per utterance")
    p.add_argument("--steps", type=int, default=3, help="timed steps (the fastest is kept)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--every", type=int, default=0, help="also every N-th K (0: only L, L/2, 0)")
    p.add_argument("--render-from", help="a log of an earlier run: only write the table and plot")
    p.add_argument("--child", nargs=3, metavar=("SHAPE", "K", "LAYERS"), help=argparse.SUPPRESS)
    p.add_argument("--doc", default=str(ROOT / "docs" / "results" / "partial_cache.md"))
    p.add_argument("--img", default=str(ROOT / "docs" / "img" / "partial_cache.png"))
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], a.child[1], a.batch, a.seconds, a.steps, a.threads)))
        return
    if a.render_from:
        rows = [json.loads(x) for x in Path(a.render_from).read_text().splitlines() if x.startswith("{")]
        machine = next((r["machine"]["line"] for r in rows if "machine" in r), "machine: not recorded")
        return finish([r for r in rows if "k" in r], a, machine)
    warn_if_loaded()
    rows: list[dict] = []
    layers = {"faster-whisper:base": 6, "random:whisper-base": 6, "random:wav2vec2-large": 24,
              "faster-whisper:tiny.en": 4}
    with LoadWatch() as watch:
        for shape in a.shapes.split(","):
            for k in ks_for(layers[shape], a.every or layers[shape] + 1):
                cmd = [sys.executable, __file__, "--batch", str(a.batch), "--seconds", str(a.seconds), "--steps",
                       str(a.steps), "--threads", str(a.threads), "--child", shape, k, str(layers[shape])]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode != 0:
                    print(f"{shape} K={k} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
                    continue
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), flush=True)
    machine = {**watch.summary(), "line": watch.line()}
    print(json.dumps({"machine": machine}), flush=True)
    finish(rows, a, machine["line"])


def finish(rows: list[dict], a: argparse.Namespace, machine: str) -> None:
    argv = [x for i, x in enumerate(sys.argv[1:]) if "--render-from" not in (x, sys.argv[i])]
    md = render(rows, "python benchmarks/partial_cache.py " + " ".join(argv), machine)
    Path(a.doc).parent.mkdir(parents=True, exist_ok=True)
    Path(a.doc).write_text(md)
    plot(rows, a.img)
    print(md)


def render(rows: list[dict], cmd: str, machine: str) -> str:
    r0 = rows[0] if rows else {"batch": 0, "seconds": 0}
    lines = ["## Partial caching: hff-adapters from layer K", "", f"`{cmd}`", "",
             f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, no GPU. One batch of {r0['batch']} x "
             f"{r0['seconds']:.0f} s, full training steps (fastest of the timed ones). K = L: nothing online "
             "(cached HFF with the encoder loaded); K = 0: adapters in every layer from the cached h_0; `online`: "
             "hff-adapters from audio (today's method). Speed-up and memory ratios against `online`.", ""]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        rs = [r for r in rows if r["shape"] == shape]
        ref = next((r for r in rs if r["k"] == "online"), None)
        lines += [f"### {shape}", "", "| K | online layers | trainable encoder params | step s | speed-up vs online | "
                  "saved for backward MiB | vs online | training memory MiB | vs online | peak RSS MiB |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rs:
            online_layers = r["layers"] if r["k"] == "online" else r["layers"] - int(r["k"])
            speed = ref["step_s"] / r["step_s"] if ref else float("nan")
            act = r["activations_mb"] / ref["activations_mb"] if ref and ref["activations_mb"] > 0 else float("nan")
            memr = r["mem_step_mb"] / ref["mem_step_mb"] if ref and ref["mem_step_mb"] > 0 else float("nan")
            lines.append(f"| {r['k']} | {online_layers} | {r['trainable_encoder_params']:,} | {r['step_s']:.2f} | "
                         f"{speed:.2f}x | {r['activations_mb']:.0f} | {act:.0%} | {r['mem_step_mb']:.0f} | "
                         f"{memr:.0%} | {r['peak_rss_mb']:.0f} |")
        lines.append("")
    lines += [machine, "", "![step time against K](../img/partial_cache.png)", ""]
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    from hff_cache.runs.plots import panels, save_figure

    fig, grid = panels(rows, "shape")
    for ax, shape, shape_rows in grid:
        rs = [r for r in shape_rows if r["k"] != "online"]
        ref = next((r for r in shape_rows if r["k"] == "online"), None)
        ax.plot([int(r["k"]) for r in rs], [r["step_s"] for r in rs], "o-", label="from layer K")
        if ref:
            ax.axhline(ref["step_s"], color="grey", ls="--", label="hff-adapters from audio")
        ax.set(title=shape, xlabel="K (hidden states read from the cache: 0..K)", ylabel="step seconds (CPU)")
        ax.legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
