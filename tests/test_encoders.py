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
