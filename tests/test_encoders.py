"""Every encoder family: batched output equals each utterance alone; frame counts follow the stride."""

import numpy as np
import pytest
import torch

from hff_cache.encoders.tiny import FAMILIES, tiny_encoder
from hff_cache.testing import synthetic_waves

DURATIONS = [1.0, 0.63, 1.37, 0.4]


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_equals_single(family: str) -> None:
    enc = tiny_encoder(family)
    waves = synthetic_waves(DURATIONS)
    batch = enc.prepare(waves)
    with torch.inference_mode():
        batched = enc(batch)
        assert len(batched) == enc.num_hidden_states == 4
        for i, w in enumerate(waves):
            single = enc(enc.prepare([w]))
            n = int(batch.frame_lengths[i])
            assert single[0].shape[1] == n == enc.num_frames(len(w))
            for k in range(enc.num_hidden_states):
                torch.testing.assert_close(batched[k][i, :n], single[k][0], atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["wav2vec2", "whisper"])
def test_frame_rate_is_50hz(family: str) -> None:
    enc = tiny_encoder(family)
    assert enc.info.frame_rate == 50.0
    # 50 Hz: one frame per 320 samples, minus the CNN's (or STFT's) edge.
    for seconds in (1, 2, 5):
        assert abs(enc.num_frames(16000 * seconds) - 50 * seconds) <= 1


def test_subset_of_layers_stops_early_and_matches() -> None:
    enc = tiny_encoder("wav2vec2")
    batch = enc.prepare(synthetic_waves([0.8, 1.1]))
    calls = []
    hook = enc.layers[-1].register_forward_hook(lambda *a: calls.append(1))
    with torch.inference_mode():
        full = enc(batch)
        calls.clear()
        part = enc(batch, [0, 1])
    hook.remove()
    assert not calls, "the last layer ran although only h_0, h_1 were asked for"
    torch.testing.assert_close(part[1], full[1])
    with pytest.raises(ValueError, match="out of range"):
        enc(batch, [9])


def test_layer_transforms_change_outputs_after_their_layer() -> None:
    enc = tiny_encoder("wavlm")
    batch = enc.prepare(synthetic_waves([0.9]))
    with torch.inference_mode():
        before = enc(batch)
    enc.layer_transforms = torch.nn.ModuleList([torch.nn.Identity(), _AddOne(), torch.nn.Identity()])
    with torch.inference_mode():
        after = enc(batch)
    torch.testing.assert_close(after[1], before[1])
    assert not torch.allclose(after[2], before[2])


class _AddOne(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1


def test_weights_fingerprint_tracks_weights() -> None:
    a, b = tiny_encoder("hubert", seed=0), tiny_encoder("hubert", seed=1)
    assert a.info.file_hash != b.info.file_hash
    assert a.info.file_hash == tiny_encoder("hubert", seed=0).info.file_hash
    assert np.isfinite(a.info.frame_rate)


def test_whisper_30s_window_equals_transformers_padded_forward_trimmed() -> None:
    """--whisper-window 30s: what transformers' WhisperEncoder computes on its 30 s input, cut to the real frames,
    batched or alone; and the real-length default differs from it (the drift the option lets users measure)."""
    from transformers import WhisperFeatureExtractor

    enc = tiny_encoder("whisper")
    waves = synthetic_waves([1.0, 2.3])
    real = enc(enc.prepare(waves), [0, 3])
    enc.set_window("30s")
    assert enc.info.input_window == "30s"
    batch = enc.prepare(waves)
    padded = enc(batch, [0, 3])
    fe = WhisperFeatureExtractor(feature_size=80)
    for i, wave in enumerate(waves):
        n = int(batch.frame_lengths[i])
        assert n == enc.num_frames(len(wave))
        mel = fe(wave, sampling_rate=16000, return_tensors="pt").input_features
        with torch.no_grad():
            ref = enc.encoder(mel, output_hidden_states=True).hidden_states
        torch.testing.assert_close(padded[1][i, :n], ref[-1][0, :n], atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(padded[0][i, :n], ref[0][0, :n], atol=2e-4, rtol=1e-4)
        assert not torch.allclose(padded[1][i, :n], real[1][i, :n], atol=1e-3)


def test_whisper_window_is_for_whisper_only() -> None:
    from hff_cache.encoders import set_input_window

    with pytest.raises(ValueError, match="for Whisper encoders"):
        set_input_window(tiny_encoder("wav2vec2"), "30s")
    with pytest.raises(ValueError, match="choose one of real, 30s"):
        tiny_encoder("whisper").set_window("10s")
