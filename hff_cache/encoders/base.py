"""The one interface over frozen speech encoders.

An encoder turns a batch of waveforms into `num_hidden_states` tensors (the embedding
output h_0 and every layer output h_1..h_L, each (B, T, D)) plus the real frame count of
each item. Batched output equals running each utterance alone: padding never leaks into
real frames (see each family's notes), so the cache never depends on batch composition.

`layer_transforms` (one module per transformer layer, or None) are applied to each layer's
output inside the forward pass; online mode puts bottleneck adapters there.

`forward_from` is the top of the same forward pass: transformer layers K+1..L run on a given h_K (read
from a cache) instead of on audio. Partial caching (`train --online --from-layer K`) trains adapters in the
top layers that way while the frozen bottom is never recomputed. Families whose layers need more than h_K
and a padding mask (WavLM's shared position bias, the Conformers' relative positions) say so with
`partial_support`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from hff_cache.cache.format import EncoderInfo
from hff_cache.runtime.tensors import length_mask


@dataclass
class EncoderBatch:
    """Model inputs for one padded batch, built on CPU by `SpeechEncoder.prepare`."""

    inputs: dict[str, torch.Tensor]
    frame_lengths: torch.Tensor  # (B,) real output frames per item

    def to(self, device: torch.device | str) -> EncoderBatch:
        return EncoderBatch({k: v.to(device) for k, v in self.inputs.items()}, self.frame_lengths.to(device))


class SpeechEncoder(nn.Module):
    """Base class: subclasses implement `prepare`, `_forward`, `num_frames` and `layers`."""

    info: EncoderInfo

    def __init__(self) -> None:
        super().__init__()
        self.layer_transforms: nn.ModuleList | None = None

    @property
    def num_hidden_states(self) -> int:
        return self.info.num_hidden_states

    @property
    def layers(self) -> nn.ModuleList:
        """The transformer layers, in order (adapters attach to their outputs)."""
        raise NotImplementedError

    def prepare(self, waves: Sequence[np.ndarray]) -> EncoderBatch:
        """Waveforms at `info.sample_rate` -> padded model inputs (CPU tensors)."""
        raise NotImplementedError

    def num_frames(self, num_samples: int) -> int:
        """Output frames for an utterance of `num_samples` samples."""
        raise NotImplementedError

    def _forward(self, batch: EncoderBatch, upto: int) -> list[torch.Tensor]:
        """Hidden states h_0..h_upto (each (B, T, D)); may stop early after layer `upto`."""
        raise NotImplementedError

    def forward(self, batch: EncoderBatch, layers: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Return the requested hidden states (all when `layers` is None), each (B, T, D)."""
        if self.released_below is not None:
            raise RuntimeError(f"{self.info.name}: the weights below layer {self.released_below} were released "
                               "(partial caching); load the encoder again to run it on audio")
        wanted = list(range(self.num_hidden_states)) if layers is None else list(layers)
        bad = [k for k in wanted if not 0 <= k < self.num_hidden_states]
        if bad:
            raise ValueError(f"layers {bad} out of range: {self.info.name} has hidden states "
                             f"0..{self.num_hidden_states - 1}")
        states = self._forward(batch, max(wanted))
        return [states[k] for k in wanted]

    def transform_layer_output(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Apply the adapter (if any) that follows transformer layer `index` (0-based)."""
        if self.layer_transforms is None:
            return hidden
        return self.layer_transforms[index](hidden)

    # ---- partial forward (the top layers from a cached h_K) ------------------------------------------
    partial_support: str = ""  # empty: forward_from works; else why this family cannot run from h_K

    def forward_from(self, hidden: torch.Tensor, frame_lengths: torch.Tensor, start: int,
                     layers: Sequence[int]) -> list[torch.Tensor]:
        """Hidden states ``layers`` (each > ``start``) computed from h_``start`` (B, T, D) of real length
        ``frame_lengths``: the same values the full forward gives on the audio, frames past each length
        aside. Adapters (``layer_transforms``) apply as in ``forward``."""
        if self.partial_support:
            raise ValueError(f"{self.info.name}: cannot run from a cached hidden state ({self.partial_support})")
        n = self.num_hidden_states - 1
        wanted = list(layers)
        if not 0 <= start <= n or any(not start < k <= n for k in wanted):
            raise ValueError(f"forward_from({start}) computes hidden states {start + 1}..{n}, not {wanted}")
        if not wanted:
            return []
        states = self._forward_from(hidden, frame_lengths.to(hidden.device), start, max(wanted))
        return [states[k - start - 1] for k in wanted]

    def _forward_from(self, hidden: torch.Tensor, frame_lengths: torch.Tensor, start: int,
                      upto: int) -> list[torch.Tensor]:
        """Hidden states h_start+1..h_upto from h_start."""
        raise NotImplementedError

    def release_below(self, k: int) -> None:
        """Free the weights partial caching never runs from h_k: the front end and transformer layers 1..k.
        ``forward`` is refused afterwards; ``forward_from(j)`` for j >= k still works."""
        before = sum(p.numel() for p in self.encoder_parameters())
        for i in range(k):
            self.layers[i] = nn.Identity()
        self._release_front_end()
        self.released_below = k
        self.released_params = before - sum(p.numel() for p in self.encoder_parameters())

    released_below: int | None = None
    released_params: int = 0  # still counted as the encoder's (parameter counts describe the model, not RAM)

    def _release_front_end(self) -> None:
        """Drop the modules before the first transformer layer (subclasses; default: keep them)."""

    def encoder_parameters(self) -> list[nn.Parameter]:
        """The encoder's own weights (not the layer transforms)."""
        skip = {id(p) for p in self.layer_transforms.parameters()} if self.layer_transforms else set()
        return [p for p in self.parameters() if id(p) not in skip]

    def frozen_feature_encoder_parameters(self) -> list[nn.Parameter]:
        """Parameters that full fine-tuning keeps frozen by convention (the wav2vec2 CNN)."""
        return []


def weights_fingerprint(module: nn.Module) -> str:
    """sha256 of the state dict's bytes: identifies random-weight and converted models alike."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def key_padding_bias(frame_lengths: torch.Tensor, frames: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive attention mask (B, 1, T, T): 0 on real keys, the dtype's minimum on padded ones; None when no item
    is padded (SDPA then takes its fused kernels, as transformers does for an unpadded batch).

    Eager and SDPA attention both take it, so padded frames never reach real ones."""
    if bool((frame_lengths >= frames).all()):
        return None
    keep = length_mask(frame_lengths, frames)
    bias = torch.zeros(keep.shape[0], 1, frames, frames, dtype=dtype, device=frame_lengths.device)
    return bias.masked_fill(~keep[:, None, None, :], torch.finfo(dtype).min)


def pad_stack(arrays: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D (or (T, F)) arrays with zeros to one tensor; return it and the lengths."""
    lengths = torch.tensor([len(a) for a in arrays], dtype=torch.long)
    out = torch.zeros((len(arrays), int(lengths.max()), *arrays[0].shape[1:]), dtype=torch.float32)
    for i, a in enumerate(arrays):
        out[i, : len(a)] = torch.from_numpy(np.asarray(a, dtype=np.float32))
    return out, lengths
