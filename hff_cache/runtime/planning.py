"""Length-bucketed batch planning: one cutter for extraction batches, training batches and audio batches."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["plan_batches"]


def plan_batches(positions: Sequence[int], lengths: np.ndarray, batch_frames: int,
                 max_utts: int) -> list[list[int]]:
    """Sort ``positions`` by length (ties by position) and cut greedily so that padded frames
    (longest x count) stay <= ``batch_frames``; an utterance longer than the budget gets its own batch."""
    order = sorted(positions, key=lambda p: (int(lengths[p]), p))
    batches: list[list[int]] = []
    cur: list[int] = []
    for p in order:
        n = int(lengths[p])  # sorted ascending, so n is the longest so far
        if cur and (n * (len(cur) + 1) > batch_frames or len(cur) >= max_utts):
            batches.append(cur)
            cur = []
        cur.append(p)
    if cur:
        batches.append(cur)
    return batches
