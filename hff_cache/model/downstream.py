"""The downstream body after the fusion: (B, T, d) fused frames -> (B, T, d) context for the head.

Every fusion kind feeds the same downstream, so a comparison of fusions is never one of model size. Kinds
(``FusionConfig.downstream``), each built as ``cls(width, blocks, kernel, dropout)``:

* ``conv`` (default) -- ``blocks`` residual depthwise-conv blocks: cheap, and local (each block sees
  ``kernel`` frames), which suits the cached runs' step time on a CPU.
* ``lstm`` -- ``blocks`` bidirectional LSTM layers (``width / 2`` a direction), SUPERB's ASR downstream: every
  frame sees the whole utterance, at the cost of a sequential step.

A new downstream is one class here plus one line in ``DOWNSTREAMS`` (docs/contributing.md).
"""

from __future__ import annotations

import torch
from torch import nn

from hff_cache.model.blocks import ResidualConvBlock


def _zero_padding(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x.masked_fill(~mask[..., None], 0.0)


class ConvDownstream(nn.Module):
    """``blocks`` residual conv blocks + final LayerNorm."""

    def __init__(self, width: int, blocks: int, kernel: int, dropout: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ResidualConvBlock(width, kernel, dropout) for _ in range(blocks))
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, mask)
        return _zero_padding(self.norm(x), mask)


class LSTMDownstream(nn.Module):
    """x + Dropout(BiLSTM(x)) then LayerNorm; ``blocks`` stacked layers (``kernel`` is unused).

    Each direction is a one-way LSTM over the padded batch; the backward one reads every utterance reversed
    within its own length. So a padded frame never reaches a valid one, and the CPU runs its fused LSTM kernel:
    a packed sequence would do the same exactly, at 4.4x the step time on a CPU (benchmarks/downstream.py)."""

    def __init__(self, width: int, blocks: int, kernel: int, dropout: float) -> None:
        super().__init__()
        if width % 2:
            raise ValueError(f"the lstm downstream splits width between two directions: width must be even, "
                             f"got {width}")
        def one_way() -> nn.ModuleList:
            return nn.ModuleList(nn.LSTM(width, width // 2, batch_first=True) for _ in range(blocks))

        self.forwards, self.backwards = one_way(), one_way()
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if len(self.forwards):
            reverse = _reversed_within_length(mask)
            h = _zero_padding(x, mask)
            for i, (ahead, back) in enumerate(zip(self.forwards, self.backwards, strict=True)):
                h = self.drop(h) if i else h  # between layers, as nn.LSTM's dropout
                h = torch.cat([ahead(h)[0], _gather_frames(back(_gather_frames(h, reverse))[0], reverse)], -1)
            x = x + self.drop(h)
        return _zero_padding(self.norm(x), mask)


def _reversed_within_length(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) frame indices that reverse each utterance's valid frames and leave its padding in place."""
    t = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask, mask.sum(1, keepdim=True) - 1 - t, t)


def _gather_frames(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.gather(1, index[..., None].expand_as(x))


# The registry: name -> class. A new downstream is one class plus one line here.
DOWNSTREAMS: dict[str, type[nn.Module]] = {
    "conv": ConvDownstream,
    "lstm": LSTMDownstream,
}


def build_downstream(kind: str, width: int, blocks: int, kernel: int, dropout: float) -> nn.Module:
    if kind not in DOWNSTREAMS:
        raise ValueError(f"unknown downstream {kind!r}; choose one of {', '.join(DOWNSTREAMS)}")
    return DOWNSTREAMS[kind](width, blocks, kernel, dropout)
