"""Feature codecs: how one part's (N, D) float32 layer becomes stored arrays, and back.

A codec's ``encode`` returns ``{suffix: array}``; the key ``"layer"`` is the per-frame array (stored as
``layer_kk``, chunked along frames), every other key is a small per-part side array (stored as
``<suffix>_kk``). ``decode`` reads only the frames in ``rows`` from the per-frame array, so the reader can
pass zarr arrays and decompress only the chunks it needs. Codecs are looked up by name, so adding one never
requires rewriting existing caches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..format import CacheFormatError
from .base import MAIN, Codec
from .scalar import FP16Codec, Int4BlockCodec, Int4Codec, Int8Codec, NF4BlockCodec
from .tpca import TPCACodec, frame_layout, tpca_decode_blobs, tpca_segments
from .tpcae import TPCAECodec
from .tpcap import TPCAPCodec
from .tpcape import TPCAPECodec

__all__ = ["CODECS", "MAIN", "Codec", "FP16Codec", "Int4BlockCodec", "Int4Codec", "Int8Codec", "NF4BlockCodec",
           "TPCACodec", "TPCAECodec", "TPCAPCodec", "TPCAPECodec", "frame_layout", "get_codec", "recorded_codec",
           "recorded_params", "register_codec", "tpca_decode_blobs", "tpca_segments"]

# The registry. A new codec is one file in this package plus one line here (docs/contributing.md).
CODECS: dict[str, Callable[..., Codec]] = {
    "fp16": FP16Codec,
    "int8": Int8Codec,
    "int4": Int4Codec,
    "int4b": Int4BlockCodec,
    "nf4b": NF4BlockCodec,
    "tpca": TPCACodec,
    "tpcap": TPCAPCodec,
    "tpcae": TPCAECodec,
    "tpcape": TPCAPECodec,
}


def register_codec(name: str, factory: Callable[..., Codec]) -> None:
    """Add a codec. Existing caches keep decoding with the codec they name, so nothing is rewritten."""
    CODECS[name] = factory


def get_codec(name: str, **params: Any) -> Codec:
    """Codec by registry name; ``params`` are the ones recorded in the cache's ``codec.params``."""
    if name not in CODECS:
        raise CacheFormatError(
            f"unknown codec {name!r} (known: {', '.join(sorted(CODECS))}); "
            "a cache written with a newer codec needs a newer hff-cache to read it"
        )
    try:
        return CODECS[name](**params)
    except TypeError as e:
        raise CacheFormatError(f"bad parameters for codec {name!r}: {params} ({e})") from e
    except ImportError as e:  # an optional library the codec needs: say which extra installs it
        raise CacheFormatError(str(e)) from e


def recorded_codec(name: str, params: dict[str, Any]) -> Codec:
    """The codec a cache records: a parameter added after the cache was written (absent from its ``params``)
    takes the value that behaviour had then (the codec's ``legacy_params``), not today's default, so old
    caches decode unchanged. Readers use this; writers of new caches use ``get_codec``."""
    return get_codec(name, **recorded_params(name, params))


def recorded_params(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """A cache's recorded ``params`` with the ones added since filled in as it was written (``legacy_params``):
    what a writer resuming the cache compares the requested settings with."""
    return {**getattr(CODECS.get(name), "legacy_params", {}), **params}
