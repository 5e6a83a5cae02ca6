"""Versions that made an artefact, stored beside its config."""

from __future__ import annotations

import platform


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
