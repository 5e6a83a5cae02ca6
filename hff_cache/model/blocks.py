"""Building blocks every fusion and downstream shares: the residual conv block, per-layer normalisation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def per_layer_norm(x: torch.Tensor, enabled: bool) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:]) if enabled else x


def init_logits(n: int, top_init: float) -> torch.Tensor:
    logits = torch.zeros(n)
    logits[-1] = top_init
    return logits


class ResidualConvBlock(nn.Module):
    """x + Dropout(Linear(GELU(DWConv(LN(x))))): cheap temporal context at width d.

    Padded frames are zeroed before the conv so they never leak into valid frames (every other op is
    per-frame); masking uses ``masked_fill`` so even NaN/inf padding cannot propagate.
    """

    def __init__(self, width: int, kernel: int = 5, dropout: float = 0.1) -> None:
        super().__init__()
        if kernel % 2 != 1:
            raise ValueError(f"kernel must be odd to keep frames aligned, got {kernel}")
        self.norm = nn.LayerNorm(width)
        self.conv = nn.Conv1d(width, width, kernel, padding=kernel // 2, groups=width)
        self.proj = nn.Linear(width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        y = self.norm(x).masked_fill(~mask[..., None], 0.0)
        y = self.conv(y.transpose(1, 2)).transpose(1, 2)
        y = self.drop(self.proj(F.gelu(y)))
        return (x + y).masked_fill(~mask[..., None], 0.0)
