"""Typed configuration: the one source of defaults for the library, the CLI and recipes.

Every run directory and cache stores the resolved config (`to_dict`) next to the versions
that made it (`environment`).
"""

from __future__ import annotations

import dataclasses
import platform
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ExtractConfig:
    """`hff-cache extract`: run a frozen encoder once and write the feature cache."""

    model: str  # faster-whisper:base, a CTranslate2 folder, a transformers folder/hub id, tiny-random:<family>
    data: str  # manifest (.jsonl/.csv/.tsv), LibriSpeech folder, audio folder or saved HF dataset
    out: str  # cache path or fsspec URL (s3://bucket/prefix)
    layers: list[int] | None = None  # hidden-state indices to store; None = all (embedding + every layer)
    codec: str = "fp16"  # fp16 | int8 | int4
    batch_seconds: float = 60.0  # padded audio seconds per encoder batch
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    on_error: str = "raise"  # raise | skip (record the item in the cache's report and go on)
    max_seconds: float = 600.0  # longer audio is an error (segment it first)
    part_frames: int = 30_000  # frames buffered per committed part
    num_shards: int = 1  # split the work into shards balanced by duration (SLURM arrays, torchrun)
    shard_index: int = 0
    loader_threads: int = 2  # audio decoding/resampling threads ahead of the encoder
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options for remote caches
    progress: bool = True

    def __post_init__(self) -> None:
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', not {self.on_error!r}")
        if not 0 <= self.shard_index < self.num_shards:
            raise ValueError(f"shard_index {self.shard_index} outside 0..{self.num_shards - 1}")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (nested) config dataclass."""
    return dataclasses.asdict(cfg)


def environment() -> dict[str, str]:
    """Versions that made an artefact, stored beside its config."""
    import numpy
    import torch
    import transformers
    import zarr

    from hff_cache import __version__

    return {
        "hff_cache": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "zarr": zarr.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
    }


def parse_layers(spec: str | None) -> list[int] | None:
    """'all' / None -> None; '0,3,6' or '0-4' or '0-4,8' -> sorted unique indices."""
    if spec is None or spec.strip().lower() in ("", "all"):
        return None
    out: set[int] = set()
    for piece in spec.split(","):
        piece = piece.strip()
        if "-" in piece[1:]:
            lo, hi = piece.split("-", 1)
            out.update(range(int(lo), int(hi) + 1))
        else:
            out.add(int(piece))
    return sorted(out)
