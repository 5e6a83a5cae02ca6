"""The model's input: one batch of cached features or of encoder inputs."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch


@dataclass
class Batch:
    """One training/eval batch. Cached mode fills ``feats``; online mode fills ``waves`` instead."""

    ids: list[str]
    lengths: torch.Tensor  # (B,) valid feature frames
    targets: torch.Tensor  # CTC: (B, S) padded symbol ids; classification: (B,) class ids
    target_lengths: torch.Tensor | None = None  # CTC: (B,)
    feats: torch.Tensor | None = None  # (B, T, L, D), zero-padded
    waves: list[np.ndarray] | None = field(default=None, repr=False)  # online mode: raw audio
    inputs: Any = field(default=None, repr=False)  # online mode: EncoderBatch (encoder.prepare, on CPU)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_frames(self) -> int:
        return int(self.lengths.sum())

    def to(self, device: torch.device | str) -> Batch:
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return replace(self, lengths=mv(self.lengths), targets=mv(self.targets),
                       target_lengths=mv(self.target_lengths), feats=mv(self.feats),
                       inputs=None if self.inputs is None else self.inputs.to(device))
