"""``hff-cache transcribe``: a trained run (cached or online) applied to new audio.

The run is loaded with its encoder (``hff_cache.runs.loading.load_run``: the encoder the run names, checked
against the file hash recorded at training time, its method set up again, the checkpoint's weights), then
fusion, head and greedy decoding run on length-sorted batches of audio.

A cached run sees features computed at full precision here, while it trained on the cache's codec
(fp16 by default): the difference is the codec's rounding, far below what changes a greedy decode.
Per-layer statistics normalisation (``--normalize stats``) lives in the weights (``norm_mean``/``norm_std``
buffers), so it is applied here exactly as in training.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from hff_cache.config import TRANSCRIBE_BATCH_SECONDS
from hff_cache.intake.manifests import Utterance, load_intake
from hff_cache.runs.loading import load_run

__all__ = ["audio_utterances", "transcribe"]


def audio_utterances(paths: Sequence[str | Path]) -> list[Utterance]:
    """One utterance per audio file; id = file stem (the path where two stems collide)."""
    from hff_cache.intake.audio import audio_duration

    stems = [Path(p).stem for p in paths]
    dup = {s for s in stems if stems.count(s) > 1}
    return [Utterance(id=str(p) if s in dup else s, audio=str(p), duration=audio_duration(p))
            for p, s in zip(paths, stems, strict=True)]


@torch.no_grad()
def transcribe(run: str | Path, audio: Sequence[str | Path] = (), data: str | None = None,
               checkpoint: str = "best", device: str = "auto", batch_seconds: float = TRANSCRIBE_BATCH_SECONDS,
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
    loaded = load_run(run, checkpoint, with_encoder=True, encoder_name=encoder_name, device=dev)
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
