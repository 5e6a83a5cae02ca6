"""Fusion of cached encoder layers + a shared downstream body (pure PyTorch).

Input everywhere: ``feats`` (B, T, L, D) -- the L stored hidden states in order -- and ``lengths`` (B,)
valid frames. Output: (B, T, d).

Kinds (``FusionConfig.kind``):

* ``last`` / ``single:K`` -- one layer (K indexes the available layers, negative allowed), projected D->d.
* ``weighted`` -- softmax-weighted sum over all layers (SUPERB featurizer), projected D->d.
* ``hierarchical`` -- HFF ladder over G contiguous groups (see ``HierarchicalFusion``).

Every kind feeds the *same* ``Downstream`` (``blocks`` residual blocks of width d + LayerNorm), so a
benchmark compares fusion against fusion, not model size.

"Never worse than the best input" (measured on Whisper base: last layer 49 WER, uniform weighted sum 59,
naive 4-group ladder 63). Three defaults address it, each switchable for ablations:

(a) ``layer_norm``: parameter-free LayerNorm on every layer before mixing, so a layer with a large norm
    (early Whisper layers are much louder than late ones) cannot dominate a weighted sum by scale alone.
(b) ``top_init``: the softmax logit of the top layer of each group (for ``weighted``: the last layer)
    starts at ``top_init`` instead of 0, so mixing starts close to "the top layer" and has to *learn* to
    pull in lower layers. 0 gives uniform weights.
(c) ``rung_gate_init``: in the ladder, the top group enters at the last rung on the residual path
    (z_G = B_G(gate * z_{G-1} + P_G u_G) and B_G is residual), and the lower ladder reaches it only
    through a learned per-channel gate initialised small. With the default groups on a 7-state encoder
    the top group is exactly the last layer, so the model starts as "last layer + blocks" and opens
    the gate only if lower layers help. ``rung_gate_init=None`` removes the gate (the naive ladder).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Downstream", "FusionConfig", "FusionNetwork", "HierarchicalFusion", "ResidualConvBlock", "SelectFusion",
           "WeightedFusion", "build_fusion", "build_model_body", "count_parameters", "group_bounds", "lengths_to_mask"]


@dataclass
class FusionConfig:
    kind: str = "hierarchical"  # "last" | "single:K" | "weighted" | "hierarchical"
    groups: int = 4  # G for hierarchical (clipped to L)
    width: int = 256  # d
    blocks: int = 2  # downstream depth, identical for every kind
    kernel: int = 5  # depthwise conv kernel (odd)
    dropout: float = 0.1
    layer_norm: bool = True  # parameter-free per-layer LayerNorm before mixing
    top_init: float = 5.0  # logit bias of each group's top layer (0 = uniform softmax); 5 > 2 measured
    rung_gate_init: float | None = 0.1  # gate on the lower ladder at the top rung; None = no gate


def lengths_to_mask(lengths: torch.Tensor | None, max_len: int, batch: int | None = None) -> torch.Tensor:
    """(B, T) bool mask, True on valid frames. ``lengths=None`` means every frame is valid."""
    if lengths is None:
        if batch is None:
            raise ValueError("batch is required when lengths is None")
        return torch.ones(batch, max_len, dtype=torch.bool)
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


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


def _per_layer_norm(x: torch.Tensor, enabled: bool) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:]) if enabled else x


def _init_logits(n: int, top_init: float) -> torch.Tensor:
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


class Downstream(nn.Module):
    """``blocks`` residual blocks + final LayerNorm; shared by all fusion kinds."""

    def __init__(self, width: int, blocks: int, kernel: int, dropout: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ResidualConvBlock(width, kernel, dropout) for _ in range(blocks))
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x).masked_fill(~mask[..., None], 0.0)


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
        x = _per_layer_norm(feats[:, :, self.index].to(self.proj.weight.dtype), self.layer_norm)
        return self.proj(x)

    def layer_weights(self) -> dict:
        w = torch.zeros(self.num_layers)
        w[self.index] = 1.0
        return {"layer": w, "groups": [(0, self.num_layers)], "group_gate": None}


class WeightedFusion(nn.Module):
    """SUPERB featurizer: softmax(logits) over normalised layers, then D->d."""

    def __init__(self, num_layers: int, hidden_size: int, cfg: FusionConfig) -> None:
        super().__init__()
        self.layer_norm = cfg.layer_norm
        self.logits = nn.Parameter(_init_logits(num_layers, cfg.top_init))
        self.proj = nn.Linear(hidden_size, cfg.width)

    def forward(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = _per_layer_norm(feats.to(self.proj.weight.dtype), self.layer_norm)
        u = torch.einsum("btld,l->btd", x, self.logits.softmax(0))
        return self.proj(u)

    def layer_weights(self) -> dict:
        w = self.logits.detach().softmax(0).cpu()
        return {"layer": w, "groups": [(0, w.numel())], "group_gate": None}


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
        self.logits = nn.Parameter(torch.cat([_init_logits(e - s, cfg.top_init) for s, e in self.bounds]))
        self.projs = nn.ModuleList(nn.Linear(hidden_size, cfg.width) for _ in self.bounds)
        self.rungs = nn.ModuleList(ResidualConvBlock(cfg.width, cfg.kernel, cfg.dropout) for _ in self.bounds)
        use_gate = cfg.rung_gate_init is not None and len(self.bounds) > 1
        self.gate = nn.Parameter(torch.full((cfg.width,), float(cfg.rung_gate_init))) if use_gate else None

    def _group_weights(self, logits: torch.Tensor) -> list[torch.Tensor]:
        return [logits[s:e].softmax(0) for s, e in self.bounds]

    def forward(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = _per_layer_norm(feats.to(self.projs[0].weight.dtype), self.layer_norm)
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


def build_fusion(cfg: FusionConfig, num_layers: int, hidden_size: int) -> nn.Module:
    kind = cfg.kind.strip().lower()
    if kind == "last":
        return SelectFusion(num_layers, hidden_size, cfg, -1)
    if kind.startswith("single:"):
        try:
            index = int(kind.split(":", 1)[1])
        except ValueError as err:
            raise ValueError(f"bad fusion kind {cfg.kind!r}; expected single:K with integer K") from err
        return SelectFusion(num_layers, hidden_size, cfg, index)
    if kind == "weighted":
        return WeightedFusion(num_layers, hidden_size, cfg)
    if kind in ("hierarchical", "hff"):
        return HierarchicalFusion(num_layers, hidden_size, cfg)
    raise ValueError(f"unknown fusion kind {cfg.kind!r}; use last, single:K, weighted or hierarchical")


class FusionNetwork(nn.Module):
    """Fusion + shared downstream: (B, T, L, D) features -> (B, T, d), zero on padded frames."""

    def __init__(self, cfg: FusionConfig, num_layers: int, hidden_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.out_width = cfg.width
        self.fusion = build_fusion(cfg, num_layers, hidden_size)
        self.downstream = Downstream(cfg.width, cfg.blocks, cfg.kernel, cfg.dropout)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if feats.dim() != 4 or feats.shape[2] != self.num_layers or feats.shape[3] != self.hidden_size:
            raise ValueError(
                f"expected feats (B, T, {self.num_layers}, {self.hidden_size}), got {tuple(feats.shape)}"
            )
        mask = lengths_to_mask(lengths, feats.shape[1], feats.shape[0]).to(feats.device)
        return self.downstream(self.fusion(feats, mask), mask)

    def layer_weights(self) -> dict:
        """{"layer": (L,) softmax weights (per group for hierarchical), "groups": [(s, e)], "group_gate"}."""
        return {"kind": self.cfg.kind, **self.fusion.layer_weights()}


def build_model_body(cfg: FusionConfig, num_layers: int, hidden_size: int) -> FusionNetwork:
    return FusionNetwork(cfg, num_layers, hidden_size)




def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
