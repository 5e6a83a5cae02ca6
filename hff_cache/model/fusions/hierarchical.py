"""``hierarchical``: the HFF ladder over G contiguous groups of layers."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from hff_cache.model.blocks import ResidualConvBlock, init_logits, per_layer_norm

if TYPE_CHECKING:
    from hff_cache.model.fusion import FusionConfig


def group_bounds(num_layers: int, groups: int) -> list[tuple[int, int]]:
    """Balanced contiguous [start, end) groups; G = min(groups, L), earlier groups take the remainder.

    Putting the remainder low keeps the top group small: L=7, G=4 -> [0,2) [2,4) [4,6) [6,7), i.e. the
    top group is exactly the last layer.
    """
    if num_layers < 1 or groups < 1:
        raise ValueError(f"need num_layers >= 1 and groups >= 1, got {num_layers}, {groups}")
    g = min(groups, num_layers)
    base, extra = divmod(num_layers, g)
    bounds, start = [], 0
    for i in range(g):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


class HierarchicalFusion(nn.Module):
    """HFF ladder over G contiguous groups.

    u_g = softmax-weighted sum inside group g; z_1 = B_1(P_1 u_1);
    z_g = B_g(z_{g-1} + P_g u_g) for g < G;  z_G = B_G(gate * z_{G-1} + P_G u_G).
    Since B_G is residual, P_G u_G (the top group) lies on an ungated identity path to the output, and
    the gate (per channel, init ``rung_gate_init``) decides how much of the lower ladder is mixed in.
    One logit vector of length L holds all groups' logits; a singleton group's logit is inert.
    """

    def __init__(self, num_layers: int, hidden_size: int, cfg: FusionConfig) -> None:
        super().__init__()
        self.layer_norm = cfg.layer_norm
        self.bounds = group_bounds(num_layers, cfg.groups)
        self.logits = nn.Parameter(torch.cat([init_logits(e - s, cfg.top_init) for s, e in self.bounds]))
        self.projs = nn.ModuleList(nn.Linear(hidden_size, cfg.width) for _ in self.bounds)
        self.rungs = nn.ModuleList(ResidualConvBlock(cfg.width, cfg.kernel, cfg.dropout) for _ in self.bounds)
        use_gate = cfg.rung_gate_init is not None and len(self.bounds) > 1
        self.gate = nn.Parameter(torch.full((cfg.width,), float(cfg.rung_gate_init))) if use_gate else None

    def _group_weights(self, logits: torch.Tensor) -> list[torch.Tensor]:
        return [logits[s:e].softmax(0) for s, e in self.bounds]

    def forward(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = per_layer_norm(feats.to(self.projs[0].weight.dtype), self.layer_norm)
        weights = self._group_weights(self.logits)
        last = len(self.bounds) - 1
        z = None
        parts = zip(self.bounds, weights, self.projs, self.rungs, strict=True)
        for g, ((s, e), w, proj, rung) in enumerate(parts):
            h = proj(torch.einsum("btld,l->btd", x[:, :, s:e], w))
            if z is not None:
                h = h + (self.gate * z if g == last and self.gate is not None else z)
            z = rung(h, mask)
        return z

    def layer_weights(self) -> dict:
        w = torch.cat(self._group_weights(self.logits.detach())).cpu()
        gate = None if self.gate is None else float(self.gate.detach().abs().mean())
        return {"layer": w, "groups": list(self.bounds), "group_gate": gate}
