"""What every batch source shares: the protocol, length-bucketed planning, target collation."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch

from hff_cache.model.batch import Batch


class BatchSource(Protocol):
    """What the training loop consumes: a deterministic sequence of batches per epoch."""

    def epoch(self, epoch: int) -> Iterator[Batch]: ...

    def __len__(self) -> int: ...




def collate_targets(targets: Sequence[Any], ctc: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not ctc:
        return torch.tensor([int(t) for t in targets], dtype=torch.long), None
    tl = torch.tensor([len(t) for t in targets], dtype=torch.long)
    out = torch.zeros(len(targets), max(1, int(tl.max()) if len(targets) else 1), dtype=torch.long)
    for i, t in enumerate(targets):
        out[i, : len(t)] = torch.as_tensor(t, dtype=torch.long)
    return out, tl


def memory_available() -> int:
    """Bytes of RAM available now (MemAvailable on Linux; total physical memory elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
