"""``hff-cache transcribe``: a trained run (cached or online) applied to new audio.

The run names its encoder: online runs in ``config.json``'s ``encoder`` section, cached runs in the
training cache's metadata. The encoder is loaded frozen and checked against the file hash recorded at
training time; the run's method is set up again (adapters attached, trained encoder weights loaded from
the checkpoint), then fusion, head and greedy decoding run on length-sorted batches of audio.

A cached run sees features computed at full precision here, while it trained on the cache's codec
(fp16 by default): the difference is the codec's rounding, far below what changes a greedy decode.
Per-layer statistics normalisation (``--normalize stats``) lives in the weights (``norm_mean``/``norm_std``
buffers), so it is applied here exactly as in training.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hff_cache.intake.manifests import Utterance, load_intake

__all__ = ["LoadedRun", "audio_utterances", "load_for_inference", "transcribe"]


@dataclass
class LoadedRun:
    model: Any  # HFFModel with its encoder
    task: Any  # Task (tokenizer)
    doc: dict[str, Any]  # the run's config.json
    encoder_name: str


def _encoder_identity(doc: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(encoder name, EncoderInfo dict) recorded by the run."""
    if doc.get("mode") == "online":
        return doc["encoder"]["name"], doc["encoder"]["info"]
    try:
        info = doc["caches"]["train"]["meta"]["encoder"]
    except KeyError:
        from hff_cache.runs.directory import RunError

        raise RunError("the run's config.json names no encoder (no cache metadata)") from None
    return info["name"], info


def load_for_inference(run: str | Path, checkpoint: str = "best", device: str | torch.device = "cpu",
                       encoder_name: str | None = None) -> LoadedRun:
    """Rebuild a run's full model (encoder + method + fusion + head) with ``checkpoint`` weights.

    ``encoder_name`` overrides the recorded name (e.g. a local copy of the same model); the weights must
    still hash to what the run recorded.
    """
    from hff_cache.encoders import load_encoder
    from hff_cache.model.adapters import setup_method
    from hff_cache.model.hff import HFFModel, ModelSpec
    from hff_cache.runs.directory import CONFIG, RunError, load_weights
    from hff_cache.tasks.task import Task
    from hff_cache.tasks.tokenizers import tokenizer_from_dict

    run = Path(run)
    if not (run / CONFIG).exists():
        raise RunError(f"{run} is not a run directory (no {CONFIG})")
    doc = json.loads((run / CONFIG).read_text())
    name, info = _encoder_identity(doc)
    encoder = load_encoder(encoder_name or name, "cpu")
    recorded = info.get("file_hash")
    if recorded and encoder.info.file_hash != recorded:
        raise RunError(f"encoder {encoder_name or name} has weights {encoder.info.file_hash[:12]}, but the run "
                       f"was trained on {recorded[:12]}: its fusion and head would read other features")
    if doc.get("mode") == "online":
        # the method decides which encoder weights the checkpoint holds (adapters, biases, all)
        setup_method(encoder, doc["encoder"]["method"], int(doc["encoder"].get("bottleneck") or 64))
    task = Task(doc["task"]["name"], tokenizer_from_dict(doc["task"]["tokenizer"]))
    model = HFFModel(ModelSpec.from_dict(doc["model"]), encoder=encoder)
    path = run / "checkpoints" / f"{checkpoint}.safetensors"
    if not path.exists():
        raise RunError(f"{run}: no checkpoint {path.name}")
    load_weights(model, path, task.tokenizer.fingerprint())
    return LoadedRun(model.to(device).eval(), task, doc, encoder_name or name)


def audio_utterances(paths: Sequence[str | Path]) -> list[Utterance]:
    """One utterance per audio file; id = file stem (the path where two stems collide)."""
    from hff_cache.intake.audio import audio_duration

    stems = [Path(p).stem for p in paths]
    dup = {s for s in stems if stems.count(s) > 1}
    return [Utterance(id=str(p) if s in dup else s, audio=str(p), duration=audio_duration(p))
            for p, s in zip(paths, stems, strict=True)]


@torch.no_grad()
def transcribe(run: str | Path, audio: Sequence[str | Path] = (), data: str | None = None,
               checkpoint: str = "best", device: str = "auto", batch_seconds: float = 120.0,
               num_workers: int = 2, encoder_name: str | None = None) -> list[tuple[str, str]]:
    """[(id, text)] for ``audio`` files and/or a ``data`` manifest, in input order.

    For a classification run the "text" is the predicted class label.
    """
    from hff_cache.batches.from_audio import AudioBatches
    from hff_cache.runtime.distributed import resolve_device

    utts = audio_utterances(list(audio)) + (load_intake(data) if data else [])
    if not utts:
        raise ValueError("nothing to transcribe: give audio files or --data")
    dev = resolve_device(device)
    loaded = load_for_inference(run, checkpoint, dev, encoder_name)
    model, tok = loaded.model, loaded.task.tokenizer
    source = AudioBatches(utts, model.encoder, batch_seconds=batch_seconds, shuffle=False,
                          num_workers=num_workers, max_batch_utts=64)
    texts: dict[int, str] = {}
    order = source.plan(0)
    for positions, batch in zip(order, source.epoch(0), strict=True):
        batch = batch.to(dev)
        out = model(batch)
        for p, pred in zip(positions, model.predict(out, batch), strict=True):
            texts[p] = tok.decode(pred)
    return [(u.id, texts[i]) for i, u in enumerate(utts)]
