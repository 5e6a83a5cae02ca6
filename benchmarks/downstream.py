"""What each downstream costs a training step on the CPU: the conv blocks, the lstm downstream (two one-way LSTMs
over the padded batch), and torch's packed bidirectional LSTM that computes the same, side by side.

    python benchmarks/downstream.py --batch 25 --frames 400 --width 256 --rounds 5

One forward and backward pass of a padded batch of ``--batch`` utterances (lengths spread between half and all
of ``--frames``) through each body; the rounds are interleaved and the median kept, so the machine's drift hits
every body alike. Ratios are to the lstm downstream.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from hff_cache.model.downstream import ConvDownstream, LSTMDownstream
from hff_cache.runtime.tensors import length_mask
from hff_cache.runtime.threads import LoadWatch, warn_if_loaded


def step(body: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    body(x).square().mean().backward()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--frames", type=int, default=400)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    warn_if_loaded()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    lengths = torch.randint(a.frames // 2, a.frames + 1, (a.batch,))
    lengths[0] = a.frames
    mask = length_mask(lengths, a.frames)
    x = torch.randn(a.batch, a.frames, a.width, requires_grad=True)
    packed_lstm = nn.LSTM(a.width, a.width // 2, num_layers=a.blocks, batch_first=True, bidirectional=True)

    def packed(v: torch.Tensor) -> torch.Tensor:
        p = pack_padded_sequence(v, lengths, batch_first=True, enforce_sorted=False)
        return pad_packed_sequence(packed_lstm(p)[0], batch_first=True, total_length=a.frames)[0]

    conv, lstm = ConvDownstream(a.width, a.blocks, 5, 0.0), LSTMDownstream(a.width, a.blocks, 5, 0.0)
    bodies = {"conv (default: 2 blocks, kernel 5)": lambda v: conv(v, mask),
              "lstm downstream (two one-way LSTMs)": lambda v: lstm(v, mask),
              "packed bidirectional nn.LSTM (the same computation)": packed}
    seconds: dict[str, list[float]] = {name: [] for name in bodies}
    with LoadWatch() as watch:
        for _ in range(a.rounds):
            for name, body in bodies.items():
                seconds[name].append(step(body, x))
    base = statistics.median(seconds["lstm downstream (two one-way LSTMs)"])
    print(f"a {a.batch} x {a.frames} x {a.width} batch, {a.blocks} blocks/layers, {a.threads} thread(s); forward "
          f"and backward, median of {a.rounds} interleaved rounds")
    print("| downstream | step s | x the lstm downstream |")
    print("|---|---:|---:|")
    for name, times in seconds.items():
        print(f"| {name} | {statistics.median(times):.3f} | {statistics.median(times) / base:.2f} |")
    print(watch.line())


if __name__ == "__main__":
    main()
