"""What the cached and the online set-ups share: the labels a run reads, and the model built from a seed.

Both modes build the same ``HFFModel`` (seeded right before it, so for one seed every method's fusion and head
start from the same weights: ``hff-frozen`` is then the cached model exactly, and a CTC head's escape from the
all-blank plateau depends strongly on its initial weights at small data sizes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from hff_cache.config import TrainConfig, to_dict
from hff_cache.model.augment import SpecAugment
from hff_cache.model.fusion import FusionConfig, layers_to_read
from hff_cache.model.hff import HFFModel, ModelSpec
from hff_cache.runs.document import RunError
from hff_cache.tasks.task import Task, load_labels, report_label_ids

__all__ = ["Labels", "build_model", "load_run_labels", "read_layers"]

Labels = dict[str, dict[str, Any]]


def load_run_labels(cfg: TrainConfig, train: Any, valid: Any | None) -> tuple[Labels | None, Labels | None]:
    """(train labels, valid labels) from ``--labels`` / ``--valid-labels``; ids the sources lack are reported.

    ``train`` and ``valid`` are the sources' indexes (a ``CacheReader`` or an intake index). With
    ``--valid-labels`` each file is a split of its own and is checked against its own source."""
    labels = load_labels(cfg.labels) if cfg.labels else None
    valid_labels = load_labels(cfg.valid_labels) if cfg.valid_labels else labels
    if cfg.valid_labels:
        for rows, source in ((labels, train), (valid_labels, valid)):
            if rows is not None and source is not None:
                report_label_ids(rows, [source])
    elif labels is not None:
        report_label_ids(labels, [s for s in (train, valid) if s is not None])
    return labels, valid_labels


def read_layers(fusion: FusionConfig, available: Sequence[int]) -> tuple[list[int], FusionConfig]:
    """``model.fusion.layers_to_read`` with its refusal as a ``RunError`` (names the fusion and the layers)."""
    try:
        return layers_to_read(fusion, available)
    except ValueError as exc:
        raise RunError(str(exc)) from None


def build_model(cfg: TrainConfig, task: Task, fusion: FusionConfig, layers: list[int], hidden_size: int,
                encoder: torch.nn.Module | None = None) -> tuple[ModelSpec, HFFModel]:
    """The run's model spec and its model, seeded with ``cfg.seed`` right before the weights are made."""
    spec = ModelSpec(fusion=to_dict(fusion), num_layers=len(layers), hidden_size=int(hidden_size),
                     head="ctc" if task.kind == "ctc" else "classify", vocab_size=task.tokenizer.vocab_size,
                     layers=list(layers), pooling=cfg.pooling, normalize=cfg.normalize, from_layer=cfg.from_layer)
    augment = SpecAugment(cfg.spec_time_masks, cfg.spec_time_width, cfg.spec_feat_masks, cfg.spec_feat_width)
    torch.manual_seed(cfg.seed)
    return spec, HFFModel(spec, encoder=encoder, augment=augment)
