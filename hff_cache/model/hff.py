"""The trainable model: optional frozen encoder -> fusion body -> task head.

Cached mode has ``encoder=None`` and reads (B, T, L, D) features from the batch; online mode
(``hff_cache.training.online``) sets an encoder and computes the same features from ``batch.inputs``; partial
caching (``ModelSpec.from_layer`` K) reads h_0..h_K from the batch and runs the encoder's top layers on h_K. Everything
after ``features`` -- normalisation, SpecAugment, fusion, head, loss, decoding -- is shared, so the
training loop, checkpoints and metrics do not know which mode they run.

Online, the encoder always stays in eval mode, whatever ``model.train()`` says: no dropout or layerdrop,
BatchNorm statistics fixed. ``hff-frozen`` then computes exactly the cached features, and every method
sees one deterministic encoder, so the comparison is between what each method trains, and gradient
checkpointing recomputes exactly. Regularisation comes from SpecAugment on the features and the head's
dropout, as in cached training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from hff_cache.model.augment import SpecAugment
from hff_cache.model.batch import Batch
from hff_cache.model.fusion import FusionConfig, build_model_body, count_parameters
from hff_cache.model.heads import ClassifierHead, CTCHead
from hff_cache.runtime.tensors import length_mask

__all__ = ["HFFModel", "ModelSpec", "SpecAugment"]




@dataclass
class ModelSpec:
    """Everything needed to rebuild the model's shapes (stored in the run's config.json)."""

    fusion: dict[str, Any]  # FusionConfig as a dict
    num_layers: int
    hidden_size: int
    head: str  # ctc | classify
    vocab_size: int  # CTC symbols incl. blank, or classes
    layers: list[int]  # hidden-state indices the model reads (in order)
    pooling: str = "mean"
    normalize: str = "none"  # none | stats (buffers ``norm_mean``/``norm_std`` in the weights)
    from_layer: int | None = None  # partial caching: h_0..h_K come from the cache, the encoder computes the rest

    @property
    def cached_layers(self) -> list[int]:
        """The hidden states a batch's ``feats`` hold: all the model reads (cached mode), or, with
        ``from_layer`` K, those up to K plus h_K itself (the top layers' input)."""
        if self.from_layer is None:
            return list(self.layers)
        return sorted({k for k in self.layers if k <= self.from_layer} | {self.from_layer})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


class HFFModel(nn.Module):
    """encoder (optional, frozen) -> per-layer normalisation -> FusionNetwork -> CTC/classifier head."""

    def __init__(self, spec: ModelSpec, encoder: nn.Module | None = None,
                 augment: SpecAugment | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.encoder = encoder
        self.augment = augment or SpecAugment()
        self.body = build_model_body(FusionConfig(**spec.fusion), spec.num_layers, spec.hidden_size)
        if spec.head == "ctc":
            self.head: nn.Module = CTCHead(self.body.out_width, spec.vocab_size)
        elif spec.head == "classify":
            self.head = ClassifierHead(self.body.out_width, spec.vocab_size, spec.pooling)
        else:
            raise ValueError(f"unknown head {spec.head!r}; use ctc or classify")
        # Per-layer standardisation from cache statistics (identity unless set_stats is called); buffers,
        # so they travel with the weights and evaluation normalises exactly like training.
        self.register_buffer("norm_mean", torch.zeros(spec.num_layers, spec.hidden_size))
        self.register_buffer("norm_std", torch.ones(spec.num_layers, spec.hidden_size))

    @property
    def is_ctc(self) -> bool:
        return self.spec.head == "ctc"

    def set_stats(self, mean: Any, std: Any) -> None:
        self.norm_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.norm_std.copy_(torch.as_tensor(std, dtype=torch.float32).clamp(min=1e-5))

    def train(self, mode: bool = True) -> HFFModel:
        super().train(mode)
        if self.encoder is not None:
            self.encoder.eval()  # see the module docstring
        return self

    def features(self, batch: Batch) -> torch.Tensor:
        """(B, T, L, D) features: from the batch (cached), the encoder (online), or both (partial caching)."""
        if batch.feats is not None:
            return batch.feats if self.spec.from_layer is None or self.encoder is None else self._top_up(batch)
        if self.encoder is None:
            raise ValueError("batch has no features and the model has no encoder (online mode)")
        inputs = batch.inputs
        if inputs is None:
            if batch.waves is None:
                raise ValueError("online batch has neither encoder inputs nor waveforms")
            inputs = self.encoder.prepare(batch.waves).to(batch.lengths.device)
        # No trainable encoder parameter (hff-frozen, or a frozen encoder at inference): no graph at all,
        # which is what makes hff-frozen cost one plain forward pass, as extraction does.
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.encoder.parameters())
        with torch.set_grad_enabled(grad):
            states = self.encoder(inputs, self.spec.layers)
        return self._stack(states, batch.lengths)

    def _top_up(self, batch: Batch) -> torch.Tensor:
        """Partial caching: the cached h_0..h_K from the batch, the encoder's layers K+1..L run on h_K."""
        k, cached = self.spec.from_layer, self.spec.cached_layers
        assert self.encoder is not None and k is not None and batch.feats is not None
        feats = batch.feats.float()
        top = [layer for layer in self.spec.layers if layer > k]
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.encoder.parameters())
        with torch.set_grad_enabled(grad):
            computed = self.encoder.forward_from(feats[:, :, cached.index(k)], batch.lengths, k, top)
        by_layer = dict(zip(top, computed, strict=True))
        states = [by_layer[layer] if layer > k else feats[:, :, cached.index(layer)] for layer in self.spec.layers]
        return self._stack(states, batch.lengths)

    @staticmethod
    def _stack(states: list[torch.Tensor], lengths: torch.Tensor) -> torch.Tensor:
        x = torch.stack(states, dim=2)
        # zero padded frames, as the cache's collate does (they never reach real frames either way)
        valid = length_mask(lengths, x.shape[1], device=x.device)
        return x.masked_fill(~valid[:, :, None, None], 0.0)

    def forward(self, batch: Batch, generator: torch.Generator | None = None) -> torch.Tensor:
        """CTC log-probs (B, T, V) or class logits (B, C)."""
        x = self.features(batch)
        if self.spec.normalize == "stats":
            x = (x.float() - self.norm_mean) / self.norm_std
        if self.training and self.augment.active:
            x = self.augment.apply(x, batch.lengths, generator)
        h = self.body(x, batch.lengths)
        return self.head(h) if self.is_ctc else self.head(h, batch.lengths)

    def loss(self, out: torch.Tensor, batch: Batch) -> torch.Tensor:
        if self.is_ctc:
            return self.head.loss(out, batch.lengths, batch.targets, batch.target_lengths)
        return self.head.loss(out, batch.targets)

    def predict(self, out: torch.Tensor, batch: Batch) -> list[Any]:
        """Greedy CTC symbol ids per utterance, or the class id per utterance."""
        if self.is_ctc:
            return self.head.greedy_decode(out, batch.lengths)
        return out.argmax(-1).tolist()

    def trainable_parameters(self) -> int:
        return count_parameters(self)

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters split as the papers count them: encoder (adapters included) vs fusion+head."""
        from hff_cache.model.adapters import encoder_parameter_counts

        enc = encoder_parameter_counts(self.encoder)
        total = count_parameters(self)
        return {"trainable_params": total, "trainable_encoder_params": enc["trainable_encoder_params"],
                "trainable_fusion_head_params": total - enc["trainable_encoder_params"],
                "encoder_params": enc["encoder_params"], "adapter_params": enc["adapter_params"]}

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """``state_dict`` without the encoder's frozen weights and buffers: they come from the encoder the
        run names (checked by file hash when loading), so a checkpoint holds fusion, head, adapters and
        the encoder weights the method trained -- not a copy of the whole foundation model."""
        state = self.state_dict()
        if self.encoder is None:
            return state
        keep = {f"encoder.{n}" for n, p in self.encoder.named_parameters() if p.requires_grad}
        if self.encoder.layer_transforms is not None:
            keep |= {f"encoder.layer_transforms.{k}" for k in self.encoder.layer_transforms.state_dict()}
        return {k: v for k, v in state.items() if not k.startswith("encoder.") or k in keep}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of ``checkpoint_state``: every key it would save must be present, nothing else."""
        expected, got = set(self.checkpoint_state()), set(state)
        if expected != got:
            missing, extra = sorted(expected - got), sorted(got - expected)
            raise ValueError(f"checkpoint does not fit the model: missing {missing[:5]} ({len(missing)}), "
                             f"unexpected {extra[:5]} ({len(extra)}); was it trained with another method?")
        self.load_state_dict(state, strict=self.encoder is None)

    def layer_weights(self) -> dict[str, Any]:
        w = self.body.layer_weights()
        return {**w, "layer": [float(v) for v in w["layer"]], "hidden_states": list(self.spec.layers)}
