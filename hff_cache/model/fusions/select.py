"""``last`` / ``single:K``: one layer, normalised and projected D->d."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from hff_cache.model.blocks import per_layer_norm

if TYPE_CHECKING:
    from hff_cache.model.fusion import FusionConfig


class SelectFusion(nn.Module):
    """One layer (``last`` or ``single:K``), normalised and projected D->d."""

    def __init__(self, num_layers: int, hidden_size: int, cfg: FusionConfig, index: int = -1) -> None:
        super().__init__()
        if not -num_layers <= index < num_layers:
            raise ValueError(f"layer index {index} out of range for {num_layers} layers")
        self.num_layers = num_layers
        self.index = index % num_layers
        self.layer_norm = cfg.layer_norm
        self.proj = nn.Linear(hidden_size, cfg.width)

    def forward(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = per_layer_norm(feats[:, :, self.index].to(self.proj.weight.dtype), self.layer_norm)
        return self.proj(x)

    def layer_weights(self) -> dict:
        w = torch.zeros(self.num_layers)
        w[self.index] = 1.0
        return {"layer": w, "groups": [(0, self.num_layers)], "group_gate": None}
