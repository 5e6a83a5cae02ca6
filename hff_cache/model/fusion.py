"""Fusion of cached encoder layers + a shared downstream body (pure PyTorch).

Input everywhere: ``feats`` (B, T, L, D) -- the L stored hidden states in order -- and ``lengths`` (B,)
valid frames. Output: (B, T, d).

Kinds (``FusionConfig.kind``):

* ``last`` / ``single:K`` -- one layer (K indexes the available layers, negative allowed), projected D->d.
* ``weighted`` -- softmax-weighted sum over all layers (SUPERB featurizer), projected D->d.
* ``hierarchical`` -- HFF ladder over G contiguous groups (see ``HierarchicalFusion``).

Every kind feeds the *same* downstream (``model/downstream.py``: ``blocks`` residual conv blocks of width d, or
bidirectional LSTM layers, + LayerNorm), so a benchmark compares fusion against fusion, not model size.

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

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from hff_cache.model.downstream import DOWNSTREAMS, build_downstream
from hff_cache.model.fusions.hierarchical import HierarchicalFusion
from hff_cache.model.fusions.select import SelectFusion
from hff_cache.model.fusions.weighted import WeightedFusion
from hff_cache.runtime.tensors import length_mask

__all__ = ["FUSIONS", "FusionConfig", "FusionNetwork", "build_fusion", "build_model_body", "count_parameters",
           "layers_to_read", "parse_kind"]

# The registry: kind name -> module class, built as cls(num_layers, hidden_size, cfg[, index]). A new fusion is
# one file in model/fusions/ plus one line here (docs/contributing.md).
FUSIONS: dict[str, type[nn.Module]] = {
    "last": SelectFusion,
    "single": SelectFusion,  # single:K
    "weighted": WeightedFusion,
    "hierarchical": HierarchicalFusion,
}
_ALIASES = {"hff": "hierarchical"}
ONE_LAYER = ("last", "single")  # kinds that read one hidden state: the loader fetches only that one


def fusion_choices() -> str:
    return ", ".join(k if k != "single" else "single:K" for k in FUSIONS)


@dataclass
class FusionConfig:
    # metadata["help"] is the CLI's help for each field (`hff-cache train --help` is derived from it)
    kind: str = field(default="hierarchical", metadata={"help": f"Fusion kind: {fusion_choices()}"})
    groups: int = field(default=4, metadata={"help": "Hierarchical groups G (clipped to the layers read)"})
    width: int = field(default=256, metadata={"help": "Fusion/downstream width d"})
    downstream: str = field(default="conv", metadata={
        "help": f"Downstream body after the fusion: {' | '.join(DOWNSTREAMS)} (conv: residual depthwise-conv "
                "blocks, local context; lstm: bidirectional LSTM layers, the whole utterance)"})
    blocks: int = field(default=2, metadata={"help": "Downstream blocks: conv blocks or LSTM layers (the same for "
                                                     "every fusion kind)"})
    kernel: int = field(default=5, metadata={"help": "Depthwise conv kernel (odd)"})
    dropout: float = field(default=0.1, metadata={"help": "Dropout"})
    layer_norm: bool = field(default=True, metadata={"help": "Parameter-free LayerNorm per layer before mixing"})
    # 5 > 2 measured (docs/cli.md); 0 gives a uniform softmax
    top_init: float = field(default=5.0, metadata={"help": "Initial logit of each group's top layer"})
    rung_gate_init: float | None = field(default=0.1, metadata={
        "help": "Gate on the lower ladder at the top rung, or 'none' (the naive ladder)"})


def parse_kind(kind: str) -> tuple[str, int | None]:
    """``'single:3'`` -> ``('single', 3)``, ``'weighted'`` -> ``('weighted', None)``; unknown kinds are refused
    with the registry's names."""
    name, sep, arg = str(kind).strip().lower().partition(":")
    name = _ALIASES.get(name, name)
    if name not in FUSIONS:
        raise ValueError(f"unknown fusion kind {kind!r}; choose one of {fusion_choices()}")
    if name == "single":
        try:
            return name, int(arg)
        except ValueError:
            raise ValueError(f"bad fusion kind {kind!r}; expected single:K with integer K") from None
    if sep:
        raise ValueError(f"fusion kind {name!r} takes no ':' argument (got {kind!r})")
    return name, None


def layers_to_read(cfg: FusionConfig, available: Sequence[int]) -> tuple[list[int], FusionConfig]:
    """The one decision of which hidden states a model reads: (hidden-state indices, the fusion config the
    model is built with).

    A one-layer fusion (``last``, ``single:K`` with K indexing ``available``, negative allowed) reads only
    that hidden state, so its batches are 1/L the size, and is built as ``last`` over it: the same model,
    far less I/O. Every other fusion reads all of ``available``."""
    name, index = parse_kind(cfg.kind)
    available = list(available)
    if not available:
        raise ValueError("no hidden states to read")
    if name not in ONE_LAYER:
        return available, cfg
    k = -1 if name == "last" else int(index)  # type: ignore[arg-type]
    if not -len(available) <= k < len(available):
        raise ValueError(f"fusion {cfg.kind!r}: no such layer among the {len(available)} available ({available})")
    return [available[k]], replace(cfg, kind="last")


def build_fusion(cfg: FusionConfig, num_layers: int, hidden_size: int) -> nn.Module:
    name, index = parse_kind(cfg.kind)
    if name in ONE_LAYER:
        return FUSIONS[name](num_layers, hidden_size, cfg, -1 if index is None else index)
    return FUSIONS[name](num_layers, hidden_size, cfg)


class FusionNetwork(nn.Module):
    """Fusion + shared downstream: (B, T, L, D) features -> (B, T, d), zero on padded frames."""

    def __init__(self, cfg: FusionConfig, num_layers: int, hidden_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.out_width = cfg.width
        self.fusion = build_fusion(cfg, num_layers, hidden_size)
        self.downstream = build_downstream(cfg.downstream, cfg.width, cfg.blocks, cfg.kernel, cfg.dropout)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if feats.dim() != 4 or feats.shape[2] != self.num_layers or feats.shape[3] != self.hidden_size:
            raise ValueError(
                f"expected feats (B, T, {self.num_layers}, {self.hidden_size}), got {tuple(feats.shape)}"
            )
        mask = length_mask(lengths, feats.shape[1], feats.shape[0], feats.device)
        return self.downstream(self.fusion(feats, mask), mask)

    def layer_weights(self) -> dict:
        """{"layer": (L,) softmax weights (per group for hierarchical), "groups": [(s, e)], "group_gate"}."""
        return {"kind": self.cfg.kind, **self.fusion.layer_weights()}


def build_model_body(cfg: FusionConfig, num_layers: int, hidden_size: int) -> FusionNetwork:
    return FusionNetwork(cfg, num_layers, hidden_size)




def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
