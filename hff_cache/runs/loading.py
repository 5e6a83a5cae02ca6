"""One way to load a run: its document, task and model with a checkpoint's weights, with or without the encoder.

Without the encoder (``evaluate`` on a cache) the model reads cached features; only cached runs load so.
With it (``transcribe``) the run's encoder is loaded frozen and checked against the file hash recorded at
training time -- online runs record it in ``config.json``'s ``encoder`` section, cached runs in the training
cache's metadata -- and an online run's method is set up again (adapters attached; the checkpoint then
brings the encoder weights the method trained).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hff_cache.config import TrainConfig
from hff_cache.model.hff import HFFModel
from hff_cache.runs.directory import RunDir
from hff_cache.runs.document import RunDocument, RunError
from hff_cache.tasks.task import Task

__all__ = ["LoadedRun", "load_run"]


@dataclass
class LoadedRun:
    """A run ready to decode: its directory, document, task and model (eval mode) with loaded weights."""

    run: RunDir
    doc: RunDocument
    task: Task
    model: HFFModel
    encoder_name: str | None = None  # the encoder loaded (with_encoder), as named or overridden

    @property
    def config(self) -> TrainConfig:
        return self.doc.config


def load_run(run: str | Path | RunDir, checkpoint: str = "best", *, with_encoder: bool = False,
             encoder_name: str | None = None, device: str | torch.device = "cpu") -> LoadedRun:
    """Load ``run`` with the weights of ``checkpoint`` (best | last); every refusal is a one-line RunError.

    ``with_encoder`` rebuilds the full model (encoder + method + fusion + head); ``encoder_name`` overrides the
    recorded name (e.g. a local copy of the same model), whose weights must still hash as the run recorded.
    """
    rd = run if isinstance(run, RunDir) else RunDir(run)
    doc = rd.read_document()
    encoder, name = None, None
    if with_encoder or doc.model.from_layer is not None:  # partial caching: the top layers read cached h_K
        encoder, name = _rebuild_encoder(doc, encoder_name)
    elif doc.mode == "online":
        raise RunError(f"{rd} is an online run (method {doc.method}): its model includes the encoder and reads "
                       "audio, not a cache; use `hff-cache transcribe` (hff_cache.runs.loading.load_run with "
                       "with_encoder=True)")
    task = doc.task.build()
    model = HFFModel(doc.model, encoder=encoder)
    rd.load_weights(model, checkpoint, task.tokenizer.fingerprint())
    return LoadedRun(rd, doc, task, model.to(device).eval(), name)


def _rebuild_encoder(doc: RunDocument, override: str | None) -> tuple[Any, str]:
    """The run's encoder, frozen, identical (by file hash) to the one it trained on, its method set up."""
    from hff_cache.encoders import load_encoder
    from hff_cache.model.adapters import setup_method

    name, info = doc.encoder_identity()
    name = override or name
    # a cache extracted on Whisper's 30 s window trained the head on those features: run the encoder the same way
    encoder = load_encoder(name, "cpu", whisper_window=info.get("input_window") or "real")
    recorded = info.get("file_hash")
    if recorded and encoder.info.file_hash != recorded:
        raise RunError(f"encoder {name} has weights {encoder.info.file_hash[:12]}, but the run was trained on "
                       f"{recorded[:12]}: its fusion and head would read other features")
    if doc.encoder is not None:
        # the method decides which encoder weights the checkpoint holds (adapters, biases, all)
        setup_method(encoder, doc.encoder.method, int(doc.encoder.bottleneck or 64), doc.model.from_layer)
    return encoder, name
