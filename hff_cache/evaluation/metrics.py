"""Metrics: corpus WER/CER (jiwer), phone error rate, accuracy."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jiwer


def error_rates(refs: Sequence[str], hyps: Sequence[str]) -> dict[str, float]:
    """Corpus WER and CER in percent (jiwer: edit operations summed over all utterances)."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    if not refs:
        return {"wer": math.nan, "cer": math.nan}
    refs, hyps = list(refs), list(hyps)
    return {"wer": 100.0 * jiwer.wer(refs, hyps), "cer": 100.0 * jiwer.cer(refs, hyps)}


def accuracy(refs: Sequence[Any], hyps: Sequence[Any]) -> float:
    """Percent of exact matches."""
    if not refs:
        return math.nan
    return 100.0 * sum(r == h for r, h in zip(refs, hyps, strict=True)) / len(refs)


def task_metrics(task_name: str, refs: Sequence[str], hyps: Sequence[str]) -> dict[str, float]:
    """asr: wer + cer; phones: per (WER over phone tokens); classify: accuracy."""
    if task_name == "asr":
        return error_rates(refs, hyps)
    if task_name == "phones":
        return {"per": error_rates(refs, hyps)["wer"]}
    return {"accuracy": accuracy(refs, hyps)}
