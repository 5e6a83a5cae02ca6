"""SpecAugment on (B, T, L, D) features: time and feature spans shared by all layers.

One draw (``SpecAugment.spans``) serves both ways of applying it: ``apply`` zeroes the spans in place when
the batch is a fresh, grad-free copy (a cached batch: touching only the masked spans avoids a full copy of
the (B, T, L, D) batch, ~25% of a step on CPU), and returns a masked copy otherwise (online features with a
graph). So the two paths draw identical masks by construction (tests/test_fusion.py checks it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SpecAugment", "spec_augment"]

Spans = list[tuple[list[tuple[int, int]], list[tuple[int, int]]]]  # per utterance: (time spans, feature spans)


@dataclass
class SpecAugment:
    time_masks: int = 0
    time_width: int = 0  # widths are uniform in [0, width]
    feat_masks: int = 0
    feat_width: int = 0

    @property
    def active(self) -> bool:
        return (self.time_masks > 0 and self.time_width > 0) or (self.feat_masks > 0 and self.feat_width > 0)

    def spans(self, lengths: list[int], frames: int, dims: int, generator: torch.Generator | None) -> Spans:
        """[(time spans, feature spans)] per utterance, each span (start, end); time spans inside the valid
        frames. Randomness comes from ``generator`` (a CPU generator) for reproducibility."""

        def draw(high: int) -> int:  # uniform in [0, high]
            return int(torch.randint(0, max(high, 0) + 1, (1,), generator=generator))

        out: Spans = []
        for n in lengths:
            n = min(int(n), frames)
            time, feat = [], []
            for _ in range(self.time_masks):
                w = draw(min(self.time_width, n))
                s = draw(n - w)
                time.append((s, s + w))
            for _ in range(self.feat_masks):
                w = draw(min(self.feat_width, dims))
                s = draw(dims - w)
                feat.append((s, s + w))
            out.append((time, feat))
        return out

    def apply(self, x: torch.Tensor, lengths: torch.Tensor | None, generator: torch.Generator | None = None
              ) -> torch.Tensor:
        """Masked (B, T, L, D) features: in place for a grad-free leaf tensor, else a new tensor."""
        b, t, _, d = x.shape
        lens = [t] * b if lengths is None else lengths.detach().cpu().tolist()
        spans = self.spans(lens, t, d, generator)
        if x.is_leaf and not x.requires_grad:
            for i, (time, feat) in enumerate(spans):
                for s, e in time:
                    x[i, s:e] = 0
                for s, e in feat:
                    x[i, :, :, s:e] = 0
            return x
        keep_t = torch.ones(b, t, dtype=torch.bool)
        keep_f = torch.ones(b, d, dtype=torch.bool)
        for i, (time, feat) in enumerate(spans):
            for s, e in time:
                keep_t[i, s:e] = False
            for s, e in feat:
                keep_f[i, s:e] = False
        keep = (keep_t[:, :, None, None] & keep_f[:, None, None, :]).to(x.device)
        return x.masked_fill(~keep, 0.0)


def spec_augment(feats: torch.Tensor, lengths: torch.Tensor | None, time_masks: int, time_width: int,
                 feat_masks: int, feat_width: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A masked copy of ``feats`` (the functional form of ``SpecAugment.apply``; the input is never changed)."""
    aug = SpecAugment(time_masks, time_width, feat_masks, feat_width)
    return aug.apply(feats.clone() if feats.is_leaf and not feats.requires_grad else feats, lengths, generator)
