"""Online-mode methods: bottleneck adapters, BitFit, full fine-tuning, frozen HFF -- what trains in the encoder.

Every method starts from a frozen encoder (``load_encoder`` turns ``requires_grad`` off everywhere) and
switches on exactly the parameters it trains:

- ``hff-adapters``: adapters after every layer; hierarchical fusion over all (adapted) hidden states.
- ``adapters``: one adapter after the last layer; fusion ``last``.
- ``bitfit``: every bias term of the encoder (not the wav2vec2 CNN); fusion ``last``.
- ``full``: every encoder weight except the wav2vec2 CNN (frozen in the usual fine-tuning recipe) and
  Whisper's fixed sinusoidal position table (which transformers freezes too); fusion ``last``.
- ``hff-frozen``: nothing in the encoder (it runs under no_grad); hierarchical fusion over all hidden
  states -- the cached path's model, with the encoder in the loop.

Partial caching (``--from-layer K``, the adapter methods only): adapters sit in layers K+1..L alone, and
h_0..h_K come from a cache of the same encoder (``training.partial``).

Adapters count as encoder parameters (as in the papers' "trainable encoder parameters"). An adapter is
x + W_up GELU(W_down LN(x)) with W_up initialised near zero (std 1e-3, not exactly zero: with a zero
W_up, W_down and the LayerNorm would get no gradient on the first step), so training starts from the
frozen encoder's own features.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from hff_cache.encoders.base import SpeechEncoder

__all__ = ["METHODS", "BottleneckAdapter", "MethodSetup", "attach_adapters", "enable_grad_checkpointing",
           "encoder_parameter_counts", "setup_method"]



class BottleneckAdapter(nn.Module):
    """x + W_up GELU(W_down LayerNorm(x)) over the last dimension."""

    def __init__(self, hidden_size: int, bottleneck: int = 64, init_std: float = 1e-3) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.down = nn.Linear(hidden_size, bottleneck)
        self.up = nn.Linear(bottleneck, hidden_size)
        nn.init.normal_(self.up.weight, std=init_std)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(nn.functional.gelu(self.down(self.norm(x))))
        return x + h.to(x.dtype)


def attach_adapters(encoder: SpeechEncoder, bottleneck: int = 64, layers: str = "all",
                    init_std: float = 1e-3, first: int = 0) -> nn.ModuleList:
    """Put adapters after every transformer layer (``all``) or only the last (``last``); return them.
    ``first`` (partial caching, ``--from-layer``): no adapter below transformer layer ``first`` (0-based), whose
    input h_first then comes from the cache unchanged.

    They live in ``encoder.layer_transforms`` (identity where no adapter), which the encoder applies to
    each layer's output inside its forward pass, so later layers (and the fusion) see adapted states.
    """
    if layers not in ("all", "last"):
        raise ValueError(f"layers must be 'all' or 'last', not {layers!r}")
    if bottleneck < 1:
        raise ValueError(f"bottleneck must be >= 1, got {bottleneck}")
    n = len(encoder.layers)
    d = int(encoder.info.hidden_size)
    device = next(encoder.parameters()).device
    mods = [BottleneckAdapter(d, bottleneck, init_std) if i >= first and (layers == "all" or i == n - 1)
            else nn.Identity() for i in range(n)]
    encoder.layer_transforms = nn.ModuleList(mods).to(device)
    return encoder.layer_transforms


def _is_bias(name: str) -> bool:
    return name == "bias" or name.endswith(".bias")


@dataclass
class MethodSetup:
    """What ``setup_method`` decided: how the model reads the encoder."""

    method: str
    fusion_kind: str | None  # None: keep the configured fusion (hierarchical methods); else "last"
    encoder_trainable: bool  # False: run the encoder under no_grad (hff-frozen)


def _adapters_everywhere(encoder: SpeechEncoder, bottleneck: int, first: int = 0) -> None:
    for p in attach_adapters(encoder, bottleneck, "all", first=first).parameters():
        p.requires_grad_(True)


def _adapter_on_top(encoder: SpeechEncoder, bottleneck: int, first: int = 0) -> None:
    for p in attach_adapters(encoder, bottleneck, "last", first=first).parameters():
        p.requires_grad_(True)


def _unfreeze(encoder: SpeechEncoder, biases_only: bool) -> None:
    # The wav2vec2 CNN stays frozen (the usual recipe: it is cheap to keep, costly to tune), and Whisper's
    # position table is fixed sinusoids (transformers never trains it either).
    frozen = {id(p) for p in encoder.frozen_feature_encoder_parameters()}
    for name, p in encoder.named_parameters():
        if id(p) in frozen or not p.is_floating_point() or name.endswith("embed_positions.weight"):
            continue
        if not biases_only or _is_bias(name):
            p.requires_grad_(True)


@dataclass(frozen=True)
class Method:
    """An online method: what it switches on in the frozen encoder, and whether the fusion reads every
    hidden state (hierarchical) or the last one."""

    setup: Callable[..., None]  # (encoder, bottleneck[, first]) -> None; ``first`` only where partial
    hierarchical: bool
    trains_encoder: bool = True
    # LR of the encoder's own weights when --encoder-lr is not given (None: the head's --lr). Full fine-tuning
    # needs a far smaller step than a freshly initialised head; BitFit's few biases tolerate a larger one.
    encoder_lr: float | None = None
    uses_adapters: bool = False
    # Partial caching (--from-layer K) needs every trained weight above h_K: adapters qualify, BitFit and full
    # would train weights of the layers the cache replaces.
    partial: bool = False


# The registry. A new method is one function (or file) plus one line here; docs/contributing.md.
METHODS: dict[str, Method] = {
    "hff-adapters": Method(_adapters_everywhere, hierarchical=True, uses_adapters=True, partial=True),
    "adapters": Method(_adapter_on_top, hierarchical=False, uses_adapters=True, partial=True),
    "bitfit": Method(lambda enc, _: _unfreeze(enc, biases_only=True), hierarchical=False, encoder_lr=5e-4),
    "full": Method(lambda enc, _: _unfreeze(enc, biases_only=False), hierarchical=False, encoder_lr=5e-5),
    "hff-frozen": Method(lambda enc, _: None, hierarchical=True, trains_encoder=False),
}


def setup_method(encoder: SpeechEncoder, method: str, bottleneck: int = 64,
                 from_layer: int | None = None) -> MethodSetup:
    """Attach adapters and set ``requires_grad`` on ``encoder`` for ``method`` (see the module table).

    ``from_layer`` K (partial caching): h_0..h_K come from a cache, so only transformer layers K+1..L
    (0-based K..L-1) get adapters."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    for p in encoder.parameters():
        p.requires_grad_(False)
    encoder.layer_transforms = None
    spec = METHODS[method]
    if from_layer is None:
        spec.setup(encoder, bottleneck)
    elif not spec.partial:
        raise ValueError(f"--from-layer works with {', '.join(m for m, s in METHODS.items() if s.partial)}, "
                         f"not {method}: it would train weights of the layers the cache stands in for")
    else:
        spec.setup(encoder, bottleneck, from_layer)
    return MethodSetup(method=method, fusion_kind=None if spec.hierarchical else "last",
                       encoder_trainable=spec.trains_encoder)


def encoder_parameter_counts(encoder: SpeechEncoder | None) -> dict[str, int]:
    """{encoder_params: the encoder's own weights, adapter_params, trainable_encoder_params}.

    Trainable encoder parameters include the adapters: they are what a method adds to or tunes in the
    encoder, as opposed to the fusion and head that every method trains.
    """
    if encoder is None:
        return {"encoder_params": 0, "adapter_params": 0, "trainable_encoder_params": 0}
    own = encoder.encoder_parameters()
    adapters = list(encoder.layer_transforms.parameters()) if encoder.layer_transforms is not None else []
    return {"encoder_params": sum(p.numel() for p in own) + encoder.released_params,
            "adapter_params": sum(p.numel() for p in adapters),
            "trainable_encoder_params": sum(p.numel() for p in encoder.parameters() if p.requires_grad)}


def enable_grad_checkpointing(encoder: SpeechEncoder) -> None:
    """Recompute each transformer layer's activations in the backward pass instead of storing them.

    Wraps each layer's ``forward`` (not ``__call__``), so the encoder's hooks and adapters stay outside
    the checkpoint. Recomputation is exact because the encoder runs in eval mode (no dropout). It only
    saves memory when gradients flow through the layers (``full``, ``bitfit``, adapters).
    """
    for layer in encoder.layers:
        if getattr(layer, "_hff_checkpointed", False):
            continue
        inner = layer.forward

        @functools.wraps(inner)
        def forward(*args: Any, _inner: Any = inner, **kwargs: Any) -> Any:
            if torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        layer.forward = forward
        layer._hff_checkpointed = True
