"""SpecAugment on (B, T, L, D) features: spans shared by all layers."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SpecAugment:
    time_masks: int = 0
    time_width: int = 0
    feat_masks: int = 0
    feat_width: int = 0

    @property
    def active(self) -> bool:
        return (self.time_masks > 0 and self.time_width > 0) or (self.feat_masks > 0 and self.feat_width > 0)


def spec_augment(
    feats: torch.Tensor,
    lengths: torch.Tensor | None,
    time_masks: int,
    time_width: int,
    feat_masks: int,
    feat_width: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """SpecAugment-style zero masking on (B, T, L, D); returns a new tensor.

    Time masks (width uniform in [0, time_width], inside the valid frames) and feature masks (width
    uniform in [0, feat_width] over D) are drawn per utterance and shared by all L layers, so the fusion
    cannot recover a masked span from another layer. Randomness comes from ``generator`` (a CPU
    generator) for reproducibility.
    """
    b, t, _, d = feats.shape
    if lengths is None:
        lengths = torch.full((b,), t, dtype=torch.long)
    lens = lengths.detach().cpu().tolist()

    def _randint(high: int) -> int:  # uniform in [0, high]
        return int(torch.randint(0, max(high, 0) + 1, (1,), generator=generator))

    keep_t = torch.ones(b, t, dtype=torch.bool)
    keep_f = torch.ones(b, d, dtype=torch.bool)
    for i, n in enumerate(lens):
        n = min(int(n), t)
        for _ in range(time_masks):
            w = _randint(min(time_width, n))
            s = _randint(n - w)
            keep_t[i, s : s + w] = False
        for _ in range(feat_masks):
            w = _randint(min(feat_width, d))
            s = _randint(d - w)
            keep_f[i, s : s + w] = False
    keep = (keep_t[:, :, None, None] & keep_f[:, None, None, :]).to(feats.device)
    return feats.masked_fill(~keep, 0.0)
