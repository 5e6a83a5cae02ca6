"""``weighted``: the SUPERB featurizer, a softmax-weighted sum of all layers."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from hff_cache.model.blocks import init_logits, per_layer_norm

if TYPE_CHECKING:
    from hff_cache.model.fusion import FusionConfig


class WeightedFusion(nn.Module):
    """SUPERB featurizer: softmax(logits) over normalised layers, then D->d."""

    def __init__(self, num_layers: int, hidden_size: int, cfg: FusionConfig) -> None:
        super().__init__()
        self.layer_norm = cfg.layer_norm
        self.logits = nn.Parameter(init_logits(num_layers, cfg.top_init))
        self.proj = nn.Linear(hidden_size, cfg.width)

    def forward(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = per_layer_norm(feats.to(self.proj.weight.dtype), self.layer_norm)
        u = torch.einsum("btld,l->btd", x, self.logits.softmax(0))
        return self.proj(u)

    def layer_weights(self) -> dict:
        w = self.logits.detach().softmax(0).cpu()
        return {"layer": w, "groups": [(0, w.numel())], "group_gate": None}
