"""The codec interface: one part's (N, D) float32 layer to stored arrays and back (see the package)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from zarr.codecs import ZstdCodec

from ..format import ZSTD_LEVEL

MAIN = "layer"


def _zstd_pipeline(level: int, shuffle_bytes: int = 0) -> list[Any]:
    if level == 0:
        # stored raw: reading a chunk is a copy, no decompression -- the loader's CPU time is zstd's on a
        # CPU that also trains, for 1.2-1.25x the bytes (docs/results.md, "streaming")
        return []
    if not shuffle_bytes:
        return [ZstdCodec(level=level)]
    # Byte shuffle groups the high (sign/exponent) bytes of float16 values, which zstd compresses much
    # better than the noisy mantissa bytes: ~6-8% smaller on encoder-like data (see docs/cache_format.md).
    from zarr.codecs.numcodecs import Shuffle

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "not in the Zarr v3 spec": our reader reads it
        return [Shuffle(elementsize=shuffle_bytes), ZstdCodec(level=level)]


class Codec:
    """Base class. Subclasses set ``name``, ``dtype`` and ``bytes_per_value`` (nominal, before zstd)."""

    name: str = ""
    dtype: np.dtype = np.dtype("float32")
    bytes_per_value: float = 4.0
    # Largest magnitude the codec can store; the writer rejects larger inputs per utterance.
    max_abs: float = float("inf")
    # Buffering float16 is lossless only when the codec stores float16 anyway.
    buffer_dtype: np.dtype = np.dtype("float32")
    # Per-part side arrays written next to each layer (``<suffix>_kk``), read whole by the reader.
    side_suffixes: tuple[str, ...] = ()
    # Those of the side arrays that have a frame axis (decode slices their rows like ``layer_kk``'s).
    frame_suffixes: tuple[str, ...] = ()
    # Statistics fitted once per writer (``fit``) and stored once, in that worker's fit part, not per part.
    fit_suffixes: tuple[str, ...] = ()
    # encode/decode need the part's utterance offsets (decode finds them as ``stored["starts"]``).
    needs_starts: bool = False
    # Decoding a stored layer needs the same rows of the stored layer below it decoded (``stored["below"]``,
    # float32): readers decode a chained codec's layers in order, from the first stored one.
    chained: bool = False
    # Stated bound of the relative RMS error ||decode(encode(x)) - x|| / ||x|| on Gaussian frames with
    # per-dimension spread and a few huge outlier dimensions, as Whisper's hidden states have
    # (tests/test_codecs_v2.py checks it on such data).
    rel_error: float = 0.0
    # What ``transcode``'s sample check accepts as ||dst - src|| / ||src|| per layer on real hidden states: a
    # generous multiple of the errors measured in docs/cache_format.md ("Codecs"), to catch a broken transcode,
    # not a codec's ordinary rounding. A codec of unknown precision keeps this loose default.
    transcode_tolerance: float = 0.5
    # Parameters added after caches of this codec were written, with the value the behaviour had before
    # (``recorded_codec`` fills them in for a cache whose params lack them).
    legacy_params: dict[str, Any] = {}
    # A torch decoder (hff_cache/batches/device_decode.py) can decode this configuration bit for bit.
    torch_decodable: bool = True
    # Compressed residency holds ``layer_kk``'s integer levels bit-packed (hff_cache/batches/packed_levels.py),
    # not as stored: an entropy coder's bytes cannot be gathered by rows.
    packed_residency: bool = False
    # Each row decodes from its own stored row and the per-part side arrays alone (no per-frame side arrays, no
    # time groups, no layer below): ``decode_pieces`` then decodes a range chunk by chunk, with no assembly.
    rowwise: bool = False
    # Decoding holds the GIL (a coder in native code that does not release it): readers of many blocks use
    # processes, not threads (hff_cache/cache/block_reads.py).
    holds_gil: bool = False

    def __init__(self, level: int = ZSTD_LEVEL) -> None:
        self.level = int(level)

    @property
    def params(self) -> dict[str, Any]:
        return {"level": self.level}

    def compressors(self) -> list[Any]:
        """zarr compressors for the per-frame array."""
        return _zstd_pipeline(self.level)

    def row_shape(self, dim: int) -> tuple[int, ...]:
        return (dim,)

    def check_dim(self, dim: int) -> None:
        pass

    def frame_nbytes(self, dim: int) -> float:
        """Stored bytes per frame of one layer before zstd: the ``layer_kk`` row plus per-frame side arrays
        (what compressed residency holds in RAM per frame and layer)."""
        return float(np.prod(self.row_shape(dim))) * self.dtype.itemsize

    def fit(self, x: np.ndarray, starts: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Statistics of a sample of frames (``fit_suffixes``); codecs without any return {}."""
        return {}

    def fit_layers(self, layer: Callable[[int], np.ndarray], n: int,
                   starts: np.ndarray | None = None) -> list[dict[str, np.ndarray]]:
        """The fit of each of ``n`` stored layers, ``layer(j)`` giving one at a time (what writers and transcode
        call: a chained codec fits each layer on what the one below it leaves)."""
        return [self.fit(layer(j), starts) for j in range(n)]

    def encode_layers(self, layer: Callable[[int], np.ndarray], n: int, starts: np.ndarray | None,
                      fits: list[dict[str, np.ndarray]] | None) -> Iterator[dict[str, np.ndarray]]:
        """``encode_part`` of each of ``n`` stored layers in order, ``layer(j)`` read one at a time."""
        for j in range(n):
            yield self.encode_part(layer(j), starts, fits[j] if fits is not None else None)

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def encode_part(self, x: np.ndarray, starts: np.ndarray | None = None,
                    fit: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """What the writer calls: ``encode`` with the part's utterance offsets and the worker's fit, for the
        codecs that use them."""
        return self.encode(x)

    def decode(self, stored: dict[str, Any], rows: slice, dtype: Any = np.float32) -> np.ndarray:
        """Rows ``rows`` of the layer as ``dtype`` (float32, or float16 for the training loader)."""
        raise NotImplementedError

    def decode_pieces(self, stored: dict[str, Any], rows: slice, dtype: Any = np.float32
                      ) -> Iterator[tuple[int, np.ndarray]]:
        """Rows ``rows`` (a slice with a start) as (first row, decoded rows) pieces in order: chunk by chunk from
        the row reader's ``pieces`` where the codec is ``rowwise`` (fp16 then copies nothing before its reader
        does), else one piece. The pieces may be read-only views; callers copy them out."""
        main = stored[MAIN]
        if not self.rowwise or not hasattr(main, "pieces"):
            yield int(rows.start), self.decode(stored, rows, dtype)
            return
        for start, block in main.pieces(int(rows.start), int(rows.stop)):
            yield start, self.decode({**stored, MAIN: block}, slice(None), dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params})"
