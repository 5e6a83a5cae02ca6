"""Optimiser parameter groups and the learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any

import torch

from hff_cache.config import TrainConfig


def _param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    # Layer-weight logits get their own LR (few numbers that must move far) and, like biases and
    # norms, no weight decay (decay would pull the softmax back to uniform).
    # Online full/bitfit: the encoder's own weights take ``encoder_lr`` (adapters, being new, take ``lr``).
    fusion, decay, no_decay, enc_decay, enc_no_decay = [], [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("fusion.logits"):
            fusion.append(p)
        elif name.startswith("encoder.") and not name.startswith("encoder.layer_transforms."):
            (enc_decay if p.dim() >= 2 else enc_no_decay).append(p)
        elif p.dim() >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
              {"params": no_decay, "weight_decay": 0.0, "base_lr": cfg.lr},
              {"params": fusion, "weight_decay": 0.0, "base_lr": cfg.fusion_lr}]
    enc_lr = cfg.encoder_lr if cfg.encoder_lr is not None else cfg.lr
    groups += [{"params": enc_decay, "weight_decay": cfg.weight_decay, "base_lr": enc_lr},
               {"params": enc_no_decay, "weight_decay": 0.0, "base_lr": enc_lr}]
    return [dict(g, lr=g["base_lr"]) for g in groups if g["params"]]


def lr_factor(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from 1 to ``min_lr_ratio`` over training."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
    if cfg.lr_schedule == "constant":
        return warm
    cos = 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    return warm * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cos)
