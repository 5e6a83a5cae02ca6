"""``--tensorboard``: the scalars of ``log.csv`` as TensorBoard event files in ``RUN/tensorboard/``.

An optional extra (``pip install 'hff-cache[tensorboard]'``): log.csv stays the record; this is for people who
watch their runs in TensorBoard. One point per epoch, at the optimizer step the epoch ended on, one tag per
log.csv column (``train_loss``, ``valid_loss``, ``wer``, ``lr``, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hff_cache.runs.directory import LOG_FIELDS
from hff_cache.runs.document import RunError

__all__ = ["MISSING", "TensorBoardScalars", "require_tensorboard"]

MISSING = "--tensorboard needs the tensorboard package: pip install 'hff-cache[tensorboard]'"


def require_tensorboard() -> None:
    """Refuse ``--tensorboard`` before training starts when the package is missing."""
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard imports it too, with a less helpful error)
    except ImportError:
        raise RunError(MISSING) from None


class TensorBoardScalars:
    """Appends each epoch's row to the event files of ``folder``."""

    def __init__(self, folder: str | Path, resume_step: int = 0) -> None:
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        # A resumed run rewrites the epochs after its checkpoint: purge_step drops the points a killed
        # run logged past it, so TensorBoard shows each step once (as log.csv does).
        self._writer = SummaryWriter(str(folder), purge_step=resume_step + 1 if resume_step else None)

    def write(self, row: dict[str, Any]) -> None:
        step = int(row["step"])
        for key in LOG_FIELDS:
            value = row.get(key)
            if key != "step" and isinstance(value, (int, float)):
                self._writer.add_scalar(key, float(value), global_step=step)
        self._writer.flush()  # a killed run keeps every epoch it finished, as log.csv does

    def close(self) -> None:
        self._writer.close()
