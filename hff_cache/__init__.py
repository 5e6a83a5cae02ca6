"""hff-cache: extract a frozen speech encoder once, train hierarchical feature fusion from the cache."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """``hff_cache.Transcriber``, imported on first use: ``import hff_cache`` stays free of torch.

    Through importlib, because modules of every layer import this package (for ``__version__``) and the
    lazy import never runs for them; a static import here would read as all of them importing evaluation.
    """
    if name == "Transcriber":
        return importlib.import_module("hff_cache.evaluation.transcribe").Transcriber
    raise AttributeError(f"module 'hff_cache' has no attribute {name!r}")
