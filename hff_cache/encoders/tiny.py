"""Random-weight encoders built in code, no weights downloaded: tiny ones of every supported family
(``tiny-random:<family>``, for tests and smoke runs) and real shapes (``random:<shape>``, for cost benchmarks:
speed and memory do not depend on the weights)."""

from __future__ import annotations

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


def _whisper_base() -> SpeechEncoder:
    import transformers as tf

    from hff_cache.encoders.whisper import WhisperSpeechEncoder

    cfg = tf.WhisperConfig(d_model=512, encoder_layers=6, encoder_attention_heads=8, encoder_ffn_dim=2048,
                           num_mel_bins=80, max_source_positions=1500, dropout=0.0)
    return WhisperSpeechEncoder(tf.models.whisper.modeling_whisper.WhisperEncoder(cfg), "random:whisper-base")


def _wav2vec2_large() -> SpeechEncoder:
    import transformers as tf

    from hff_cache.encoders.hf import HFSpeechEncoder

    # the LV-60 layout: stable layer norm, layer-normalised CNN
    cfg = tf.Wav2Vec2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                            do_stable_layer_norm=True, feat_extract_norm="layer", conv_bias=True, hidden_dropout=0.0,
                            attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0,
                            mask_time_prob=0.0)
    return HFSpeechEncoder(tf.Wav2Vec2Model(cfg), "random:wav2vec2-large")


SHAPES = {"whisper-base": _whisper_base, "wav2vec2-large": _wav2vec2_large}


def random_shape(shape: str, seed: int = 0) -> SpeechEncoder:
    """A real encoder's dimensions with random weights (``random:whisper-base``, ``random:wav2vec2-large``)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown random shape {shape!r}; choose one of {', '.join(SHAPES)}")
    torch.manual_seed(seed)
    return SHAPES[shape]()
