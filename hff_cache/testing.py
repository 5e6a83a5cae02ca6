"""Fixtures shared by the tests and by users who want a smoke run without weights:
tiny random-weight encoders of every supported family, synthetic audio, and a tiny cache.

`hff-cache extract --model tiny-random:wav2vec2 ...` uses the same builders.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from hff_cache.encoders.base import SpeechEncoder

FAMILIES = ("wav2vec2", "wav2vec2-stable", "hubert", "wavlm", "data2vec-audio", "wav2vec2-conformer",
            "wav2vec2-bert", "whisper")

_TRANSFORMER = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                    hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
                    layerdrop=0.0, mask_time_prob=0.0)
# The real 320x CNN stride (50 Hz frames) with few channels, so frame counts are realistic.
_CNN = dict(conv_dim=(16,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)


def tiny_encoder(family: str = "wav2vec2", seed: int = 0) -> SpeechEncoder:
    """A random-weight encoder of `family` (3 layers, width 32), deterministic for a seed."""
    import transformers as tf

    from hff_cache.encoders.hf import HFSpeechEncoder
    from hff_cache.encoders.whisper import WhisperSpeechEncoder

    torch.manual_seed(seed)
    name = f"tiny-random:{family}"
    if family == "whisper":
        cfg = tf.WhisperConfig(d_model=32, encoder_layers=3, encoder_attention_heads=2, encoder_ffn_dim=64,
                               decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64, num_mel_bins=80,
                               max_source_positions=1500, dropout=0.0)
        return WhisperSpeechEncoder(tf.WhisperModel(cfg).encoder, name)
    if family == "wav2vec2-bert":
        cfg = tf.Wav2Vec2BertConfig(**{k: v for k, v in _TRANSFORMER.items() if k != "feat_proj_dropout"},
                                    feature_projection_input_dim=160, conv_depthwise_kernel_size=5,
                                    position_embeddings_type="relative_key", left_max_position_embeddings=8,
                                    right_max_position_embeddings=8)
        fe = tf.SeamlessM4TFeatureExtractor(feature_size=80, num_mel_bins=80, stride=2)
        return HFSpeechEncoder(tf.Wav2Vec2BertModel(cfg), name, feature_extractor=fe)
    builders = {
        "wav2vec2": (tf.Wav2Vec2Config, tf.Wav2Vec2Model, dict(feat_extract_norm="group")),
        "wav2vec2-stable": (tf.Wav2Vec2Config, tf.Wav2Vec2Model,
                            dict(feat_extract_norm="layer", do_stable_layer_norm=True)),
        "hubert": (tf.HubertConfig, tf.HubertModel, dict(feat_extract_norm="group")),
        "wavlm": (tf.WavLMConfig, tf.WavLMModel, dict(feat_extract_norm="group", num_buckets=16,
                                                       max_bucket_distance=64)),
        "data2vec-audio": (tf.Data2VecAudioConfig, tf.Data2VecAudioModel,
                           dict(conv_pos_kernel_size=5, num_conv_pos_embeddings=3)),
        "wav2vec2-conformer": (tf.Wav2Vec2ConformerConfig, tf.Wav2Vec2ConformerModel,
                               dict(feat_extract_norm="layer", do_stable_layer_norm=True,
                                    conv_depthwise_kernel_size=5, position_embeddings_type="rotary")),
    }
    if family not in builders:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {', '.join(FAMILIES)}")
    config_cls, model_cls, extra = builders[family]
    cfg = config_cls(**{**_TRANSFORMER, **_CNN, **extra})
    return HFSpeechEncoder(model_cls(cfg), name)


def synthetic_waves(durations: list[float], rate: int = 16000, seed: int = 0) -> list[np.ndarray]:
    """Speech-like test signals: harmonic tones with a moving pitch plus a little noise."""
    rng = np.random.default_rng(seed)
    waves = []
    for d in durations:
        t = np.arange(int(d * rate)) / rate
        f0 = 120 + 60 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t)
        phase = 2 * np.pi * np.cumsum(f0) / rate
        w = sum(np.sin(k * phase) / k for k in range(1, 6)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2)
        waves.append((0.2 * w + 0.01 * rng.standard_normal(t.size)).astype(np.float32))
    return waves


def write_corpus(folder: str | Path, durations: list[float], texts: list[str] | None = None,
                 rate: int = 16000, seed: int = 0) -> Path:
    """Write WAV files and a JSONL manifest (id, audio, text, speaker); return the manifest path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "manifest.jsonl"
    with manifest.open("w", encoding="utf-8") as f:
        for i, w in enumerate(synthetic_waves(durations, rate, seed)):
            utt_id = f"utt{i:03d}"
            sf.write(folder / f"{utt_id}.wav", w, rate)
            text = texts[i] if texts else ""
            row = {"id": utt_id, "audio": f"{utt_id}.wav", "text": text, "speaker": f"spk{i % 2}"}
            f.write(json.dumps(row) + "\n")
    return manifest


def tiny_cache(folder: str | Path, durations: list[float] | None = None, texts: list[str] | None = None,
               family: str = "wav2vec2", codec: str = "fp16", seed: int = 0) -> Path:
    """Make a small corpus and extract it with a tiny random encoder; return the cache path."""
    from hff_cache.config import ExtractConfig
    from hff_cache.extract import extract

    folder = Path(folder)
    durations = durations or [1.0, 1.5, 0.7, 2.0, 1.2, 0.9]
    manifest = write_corpus(folder / "audio", durations, texts, seed=seed)
    out = folder / "cache.zarr"
    cfg = ExtractConfig(model=f"tiny-random:{family}", data=str(manifest), out=str(out), codec=codec,
                        progress=False, batch_seconds=4.0)
    extract(cfg, encoder=tiny_encoder(family, seed=seed))
    return out


def parts_on_disk(out: str | Path) -> tuple[set[str], int]:
    """(part directories, committed parts) of a local cache as they are on disk right now: what a watcher
    (the fault-injection benchmark and tests) sees while an extraction runs, without opening the cache."""
    import os

    out = Path(out)
    try:
        names = {e.name for e in os.scandir(out / "parts") if e.is_dir()}
    except FileNotFoundError:
        return set(), 0
    committed = 0
    for n in names:
        try:
            doc = json.loads((out / "parts" / n / "zarr.json").read_text())
            committed += doc["attributes"]["committed"] is True
        except (OSError, ValueError, KeyError):
            pass
    return names, committed
