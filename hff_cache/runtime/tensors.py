"""Tensor helpers every torch layer shares."""

from __future__ import annotations

import torch

__all__ = ["length_mask"]


def length_mask(lengths: torch.Tensor | None, max_len: int, batch: int = 1,
                device: torch.device | str | None = None) -> torch.Tensor:
    """(B, T) bool mask, True on the first ``lengths[b]`` frames, on ``device`` (default: ``lengths``' device).

    ``lengths=None`` means every frame of each of the ``batch`` rows is real."""
    if lengths is None:
        return torch.ones(batch, max_len, dtype=torch.bool, device=device)
    lengths = lengths.to(device) if device is not None else lengths
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]
