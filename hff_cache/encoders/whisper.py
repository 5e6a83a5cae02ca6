"""Whisper's encoder at the real input length.

transformers' `WhisperEncoder.forward` insists on 30 s of (mostly padded) log-mel input.
Here the same modules run on the real length: the log-mel is computed per utterance, the
position embeddings are sliced to the real frame count, and padded frames are masked out
of attention and zeroed between the two convolutions, so a batch gives exactly what each
utterance alone gives. On ~12 s utterances that is several times faster than padding.

Hidden states: h_0 = conv output + positions, h_k = output of layer k, and h_L = the final
LayerNorm of the last layer (as in transformers' `hidden_states`).

`set_window("30s")` runs Whisper as it was trained instead: every input padded to 30 s (log-mel of the
zero-padded audio, as its feature extractor computes it), all 1500 positions attended, and the output
trimmed to the real frames afterwards (`frame_lengths`). It costs the full window whatever the length;
`hff-cache extract --whisper-window 30s` records it as the encoder's `input_window`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from hff_cache.cache.format import EncoderInfo
from hff_cache.encoders.base import EncoderBatch, SpeechEncoder, key_padding_bias, pad_stack, weights_fingerprint
from hff_cache.runtime.tensors import length_mask

SAMPLE_RATE = 16000
HOP = 160
N_FFT = 400
WINDOWS = ("real", "30s")


class WhisperSpeechEncoder(SpeechEncoder):
    def __init__(self, encoder: nn.Module, name: str, *, revision: str = "", file_hash: str = "") -> None:
        super().__init__()
        self.input_window = "real"
        self.encoder = encoder.eval()
        cfg = encoder.config
        self.n_mels = int(cfg.num_mel_bins)
        self.max_frames = int(cfg.max_source_positions)
        from transformers import WhisperFeatureExtractor

        fe = WhisperFeatureExtractor(feature_size=self.n_mels)
        self.register_buffer("mel_filters", torch.tensor(np.asarray(fe.mel_filters), dtype=torch.float32).T,
                             persistent=False)  # (n_mels, n_fft/2+1)
        self.register_buffer("window", torch.hann_window(N_FFT), persistent=False)
        self.info = EncoderInfo(
            name=name,
            model_class="WhisperEncoder",
            revision=revision,
            file_hash=file_hash or weights_fingerprint(encoder),
            sample_rate=SAMPLE_RATE,
            frame_rate=SAMPLE_RATE / (2 * HOP),
            hidden_size=int(cfg.d_model),
            num_hidden_states=int(cfg.encoder_layers) + 1,
        )

    @property
    def layers(self) -> nn.ModuleList:
        return self.encoder.layers

    @property
    def partial_support(self) -> str:  # type: ignore[override]
        # A 30 s-window cache is trimmed to the real frames, but its layers attended all 1500 positions
        return "" if self.input_window == "real" else "its layers attended the whole 30 s window, the cache " \
            "holds the real frames only; extract at --whisper-window real"

    def _release_front_end(self) -> None:
        self.encoder.conv1 = self.encoder.conv2 = nn.Identity()

    def set_window(self, window: str) -> None:
        """``real`` (default) or ``30s``: see the module docstring."""
        if window not in WINDOWS:
            raise ValueError(f"unknown Whisper input window {window!r}; choose one of {', '.join(WINDOWS)}")
        self.input_window = window
        self.info.input_window = "" if window == "real" else window

    def num_frames(self, num_samples: int) -> int:
        return (num_samples // HOP + 1) // 2

    def log_mel(self, wave: torch.Tensor) -> torch.Tensor:
        """Whisper's log-mel of one waveform (n_mels, n_samples // 160), as its feature extractor."""
        stft = torch.stft(wave, N_FFT, HOP, window=self.window.to(wave.device), return_complex=True)
        power = stft[..., :-1].abs() ** 2
        mel = self.mel_filters.to(wave.device) @ power
        log_spec = torch.clamp(mel, min=1e-10).log10()
        log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
        return (log_spec + 4.0) / 4.0

    def prepare(self, waves: Sequence[np.ndarray]) -> EncoderBatch:
        max_samples = self.max_frames * 2 * HOP
        too_long = [len(w) for w in waves if len(w) > max_samples]
        if too_long:
            raise ValueError(f"Whisper's encoder takes at most 30 s; got {max(too_long) / SAMPLE_RATE:.1f} s "
                             "(segment long recordings first)")
        real = torch.tensor([len(w) // HOP for w in waves], dtype=torch.long)  # mel frames of the real audio
        if self.input_window == "30s":  # the trained window: zero-padded audio, log-mel over all of it
            waves = [np.pad(np.asarray(w, dtype=np.float32), (0, max_samples - len(w))) for w in waves]
        with torch.no_grad():
            mels = [self.log_mel(torch.from_numpy(np.asarray(w, dtype=np.float32))).T.numpy() for w in waves]
        feats, mel_lengths = pad_stack(mels)  # (B, T_mel, n_mels)
        # attended frames: the real ones, or the whole window; the stored (trimmed) frames are always the real
        attended = (mel_lengths + 1) // 2
        frames = (real + 1) // 2 if self.input_window == "30s" else attended
        return EncoderBatch({"input_features": feats.transpose(1, 2).contiguous(), "mel_lengths": mel_lengths,
                             "attended_frames": attended}, frames)

    def _forward(self, batch: EncoderBatch, upto: int) -> list[torch.Tensor]:
        enc = self.encoder
        x = batch.inputs["input_features"].to(enc.conv1.weight.dtype)
        mel_mask = length_mask(batch.inputs["mel_lengths"].to(x.device), x.shape[-1])
        x = nn.functional.gelu(enc.conv1(x))
        x = x * mel_mask[:, None, :].to(x.dtype)  # keep padding out of the strided conv's last frame
        x = nn.functional.gelu(enc.conv2(x)).transpose(1, 2)
        t = x.shape[1]
        if t > enc.embed_positions.weight.shape[0]:
            raise ValueError(f"{t} frames exceed Whisper's {enc.embed_positions.weight.shape[0]} positions")
        hidden = x + enc.embed_positions.weight[:t].to(x.dtype)
        hidden = nn.functional.dropout(hidden, p=enc.config.dropout, training=self.training)
        attended = batch.inputs.get("attended_frames", batch.frame_lengths).to(x.device)
        return [hidden, *self._run_layers(hidden, attended, 0, upto)]

    def _forward_from(self, hidden: torch.Tensor, frame_lengths: torch.Tensor, start: int,
                      upto: int) -> list[torch.Tensor]:
        return self._run_layers(hidden.to(self.encoder.layer_norm.weight.dtype), frame_lengths, start, upto)

    def _run_layers(self, hidden: torch.Tensor, attended: torch.Tensor, start: int,
                    upto: int) -> list[torch.Tensor]:
        """h_start+1..h_upto from h_start; attention over the first ``attended`` frames of each item."""
        enc = self.encoder
        attn = key_padding_bias(attended, hidden.shape[1], hidden.dtype)
        states = []
        n_layers = len(enc.layers)
        for i in range(start, upto):
            out = enc.layers[i](hidden, attn)
            hidden = out[0] if isinstance(out, tuple) else out
            hidden = self.transform_layer_output(i, hidden)
            states.append(enc.layer_norm(hidden) if i == n_layers - 1 else hidden)
        return states
