"""transformers speech encoders: wav2vec 2.0, HuBERT, WavLM, data2vec-audio,
Wav2Vec2-Conformer and w2v-BERT 2.0.

Hidden states are captured with hooks (h_0 = input of the first layer, h_k = output of
layer k, h_L = the encoder's final output, so a final LayerNorm is included as in
transformers' own `hidden_states`). That works across transformers versions and lets the
forward pass stop after the last layer that is needed.

Exact batching: the models get an attention mask, which keeps padding out of attention.
Two places still leak padding in transformers and are masked here:
- the group-normalised first CNN layer of wav2vec2-base-style models normalises over time,
  padding included: replaced by a normalisation over the real samples only;
- convolutions over time inside the encoder (data2vec-audio's stacked positional convs, the
  Conformer depthwise convs) see padded frames: zeroed before each, as a single utterance's
  zero padding would be.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hff_cache.cache.format import EncoderInfo
from hff_cache.encoders.base import EncoderBatch, SpeechEncoder, key_padding_bias, pad_stack, weights_fingerprint
from hff_cache.runtime.tensors import length_mask


class _StopForward(Exception):
    """Raised from a hook once the last requested layer has run."""


# Families whose layers take only (hidden states, attention mask), so the top layers can run from a cached h_K.
PARTIAL_FAMILIES = ("wav2vec2", "hubert", "data2vec-audio")


class HFSpeechEncoder(SpeechEncoder):
    """A transformers audio model whose `.encoder.layers` hold the transformer layers."""

    def __init__(self, model: nn.Module, name: str, *, revision: str = "", do_normalize: bool = True,
                 feature_extractor: object | None = None) -> None:
        super().__init__()
        self.model = model.eval()
        self.config = model.config
        self.do_normalize = do_normalize
        self.feature_extractor = feature_extractor  # w2v-BERT's fbank front-end; None for waveform models
        self.uses_features = self.config.model_type == "wav2vec2-bert"
        self._mask: torch.Tensor | None = None  # (B, T) frame mask of the running batch
        self._sample_lengths: torch.Tensor | None = None
        sample_rate = 16000
        self.info = EncoderInfo(
            name=name,
            model_class=type(model).__name__,
            revision=revision,
            file_hash=weights_fingerprint(model),
            sample_rate=sample_rate,
            frame_rate=sample_rate / self._stride(),
            hidden_size=int(self.config.hidden_size),
            num_hidden_states=int(self.config.num_hidden_layers) + 1,
        )
        self._install_padding_fixes()

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.encoder.layers

    # ---- front end -------------------------------------------------------------------------
    def _stride(self) -> int:
        if self.uses_features:
            return 320  # 10 ms fbank hop, two frames stacked
        return int(np.prod(self.config.conv_stride))

    def num_frames(self, num_samples: int) -> int:
        if self.uses_features:
            return max(0, (1 + (num_samples - 400) // 160) // 2)
        n = num_samples
        for k, s in zip(self.config.conv_kernel, self.config.conv_stride, strict=True):
            n = (n - k) // s + 1
        return max(0, n)

    def prepare(self, waves: Sequence[np.ndarray]) -> EncoderBatch:
        if self.uses_features:
            assert self.feature_extractor is not None
            out = self.feature_extractor(list(waves), sampling_rate=16000, padding=True,
                                         return_attention_mask=True, return_tensors="pt")
            mask = out["attention_mask"]
            return EncoderBatch({"input_features": out["input_features"], "attention_mask": mask},
                                mask.sum(-1).long())
        if self.do_normalize:
            waves = [(w - w.mean()) / np.sqrt(w.var() + 1e-7) for w in waves]
        values, lengths = pad_stack(waves)
        frames = torch.tensor([self.num_frames(int(n)) for n in lengths], dtype=torch.long)
        return EncoderBatch({"input_values": values, "sample_lengths": lengths}, frames)

    # ---- padding fixes ---------------------------------------------------------------------
    def _install_padding_fixes(self) -> None:
        fe = getattr(self.model, "feature_extractor", None)
        first = fe.conv_layers[0] if fe is not None and hasattr(fe, "conv_layers") else None
        if first is not None and isinstance(getattr(first, "layer_norm", None), nn.GroupNorm):
            first.layer_norm.register_forward_hook(self._masked_group_norm)
        # Every time convolution after the CNN (positional convs, Conformer depthwise convs) must see
        # zeros past the end, as a lone utterance's zero padding would give.
        for module in self.model.encoder.modules():
            if isinstance(module, nn.Conv1d):
                module.register_forward_pre_hook(self._zero_padded_frames)

    def _masked_group_norm(self, gn: nn.GroupNorm, args: tuple, out: torch.Tensor) -> torch.Tensor:
        if self._sample_lengths is None:
            return out
        x = args[0]  # (B, C, T) conv output; per-channel stats over real frames only
        k, s = self.config.conv_kernel[0], self.config.conv_stride[0]
        valid = ((self._sample_lengths - k) // s + 1).clamp(min=1).to(x.device)
        m = length_mask(valid, x.shape[-1])[:, None, :].to(x.dtype)
        n = valid[:, None, None].to(x.dtype)
        mean = (x * m).sum(-1, keepdim=True) / n
        var = (((x - mean) * m) ** 2).sum(-1, keepdim=True) / n
        y = (x - mean) / torch.sqrt(var + gn.eps)
        return y * gn.weight[None, :, None] + gn.bias[None, :, None]

    def _zero_padded_frames(self, conv: nn.Module, args: tuple) -> tuple | None:
        if self._mask is None or args[0].shape[-1] != self._mask.shape[1]:
            return None
        return (args[0] * self._mask[:, None, :].to(args[0].dtype),)

    # ---- forward ---------------------------------------------------------------------------
    def _forward(self, batch: EncoderBatch, upto: int) -> list[torch.Tensor]:
        n_layers = len(self.layers)
        inputs = dict(batch.inputs)
        frames = batch.frame_lengths
        states: list[torch.Tensor | None] = [None] * (n_layers + 1)
        if not self.uses_features:
            self._sample_lengths = inputs.pop("sample_lengths")
            values = inputs["input_values"]
            sample_mask = length_mask(self._sample_lengths.to(values.device), values.shape[1])
            inputs["attention_mask"] = sample_mask.long()
        max_frames = int(frames.max())
        self._mask = length_mask(frames.to(next(self.parameters()).device), max_frames)

        def pre_first(module: nn.Module, args: tuple, kwargs: dict) -> None:
            states[0] = args[0] if args else kwargs["hidden_states"]
            if upto == 0:
                raise _StopForward

        def make_post(i: int):
            def post(module: nn.Module, args: tuple, out: object) -> object:
                hidden = out[0] if isinstance(out, tuple) else out
                hidden = self.transform_layer_output(i, hidden)
                states[i + 1] = hidden
                if i + 1 == upto and upto < n_layers:
                    raise _StopForward
                return (hidden, *out[1:]) if isinstance(out, tuple) else hidden
            return post

        def encoder_out(module: nn.Module, args: tuple, out: object) -> None:
            states[n_layers] = out[0] if isinstance(out, tuple) else out.last_hidden_state

        hooks = [self.layers[0].register_forward_pre_hook(pre_first, with_kwargs=True),
                 self.model.encoder.register_forward_hook(encoder_out)]
        hooks += [layer.register_forward_hook(make_post(i)) for i, layer in enumerate(self.layers)]
        try:
            self.model(**inputs)
        except _StopForward:
            pass
        finally:
            for h in hooks:
                h.remove()
            self._mask = self._sample_lengths = None
        return [s[:, :max_frames] if s is not None else None for s in states[: upto + 1]]

    @property
    def partial_support(self) -> str:  # type: ignore[override]
        if self.config.model_type in PARTIAL_FAMILIES:
            return ""
        return (f"{self.config.model_type} layers need more than the hidden states and a padding mask (shared "
                f"position bias or relative positions); partial caching supports {', '.join(PARTIAL_FAMILIES)} "
                "and Whisper")

    def _forward_from(self, hidden: torch.Tensor, frame_lengths: torch.Tensor, start: int,
                      upto: int) -> list[torch.Tensor]:
        hidden = hidden.to(self.model.encoder.layer_norm.weight.dtype)
        attn = key_padding_bias(frame_lengths, hidden.shape[1], hidden.dtype)
        n_layers = len(self.layers)
        states = []
        for i in range(start, upto):
            out = self.layers[i](hidden, attention_mask=attn)
            hidden = self.transform_layer_output(i, out[0] if isinstance(out, tuple) else out)
            states.append(hidden)
        if upto == n_layers and getattr(self.config, "do_stable_layer_norm", False):
            states[-1] = self.model.encoder.layer_norm(hidden)  # the encoder's output, as h_L is stored
        return states

    def _release_front_end(self) -> None:
        for name in ("feature_extractor", "feature_projection"):
            if hasattr(self.model, name):
                setattr(self.model, name, nn.Identity())
        self.model.encoder.pos_conv_embed = nn.Identity()

    def frozen_feature_encoder_parameters(self) -> list[nn.Parameter]:
        fe = getattr(self.model, "feature_extractor", None)
        return list(fe.parameters()) if fe is not None else []


def load_hf_encoder(name_or_path: str, *, local_files_only: bool = True) -> SpeechEncoder:
    """Load a transformers checkpoint (local folder or hub id already in the local HF cache)."""
    from transformers import AutoConfig, AutoFeatureExtractor, AutoModel

    try:
        config = AutoConfig.from_pretrained(name_or_path, local_files_only=local_files_only)
    except OSError as exc:
        raise FileNotFoundError(
            f"cannot load model {name_or_path!r}: not a local model folder and not in the Hugging Face cache "
            f"(no network here). Download it elsewhere and pass its folder. ({exc})") from None
    if config.model_type == "whisper":
        from transformers import WhisperModel

        from hff_cache.encoders.whisper import WhisperSpeechEncoder

        model = WhisperModel.from_pretrained(name_or_path, local_files_only=local_files_only)
        return WhisperSpeechEncoder(model.encoder, name_or_path, revision=_revision(name_or_path))
    model = AutoModel.from_pretrained(name_or_path, local_files_only=local_files_only)
    do_normalize, fe = True, None
    try:
        fe = AutoFeatureExtractor.from_pretrained(name_or_path, local_files_only=local_files_only)
        do_normalize = bool(getattr(fe, "do_normalize", True))
    except OSError:
        pass
    return HFSpeechEncoder(model, name_or_path, revision=_revision(name_or_path), do_normalize=do_normalize,
                           feature_extractor=fe if config.model_type == "wav2vec2-bert" else None)


def _revision(name_or_path: str) -> str:
    # Hub snapshots live in .../snapshots/<commit>/: the commit is the revision.
    parts = Path(name_or_path).resolve().parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else ""
