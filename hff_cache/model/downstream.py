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
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

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
    """x + Dropout(BiLSTM(x)) then LayerNorm; ``blocks`` stacked LSTM layers (``kernel`` is unused).

    Utterances are packed by length, so a padded frame never enters a valid frame's state in either direction,
    and the batch's padding costs no steps."""

    def __init__(self, width: int, blocks: int, kernel: int, dropout: float) -> None:
        super().__init__()
        if width % 2:
            raise ValueError(f"the lstm downstream splits width between two directions: width must be even, "
                             f"got {width}")
        self.lstm = (nn.LSTM(width, width // 2, num_layers=blocks, batch_first=True, bidirectional=True,
                             dropout=dropout if blocks > 1 else 0.0) if blocks else None)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.lstm is not None:
            lengths = mask.sum(1).clamp(min=1).cpu()  # pack needs lengths on the CPU, and none of 0
            packed = pack_padded_sequence(_zero_padding(x, mask), lengths, batch_first=True, enforce_sorted=False)
            y, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True, total_length=x.shape[1])
            x = x + self.drop(y)
        return _zero_padding(self.norm(x), mask)


# The registry: name -> class. A new downstream is one class plus one line here.
DOWNSTREAMS: dict[str, type[nn.Module]] = {
    "conv": ConvDownstream,
    "lstm": LSTMDownstream,
}


def build_downstream(kind: str, width: int, blocks: int, kernel: int, dropout: float) -> nn.Module:
    if kind not in DOWNSTREAMS:
        raise ValueError(f"unknown downstream {kind!r}; choose one of {', '.join(DOWNSTREAMS)}")
    return DOWNSTREAMS[kind](width, blocks, kernel, dropout)
