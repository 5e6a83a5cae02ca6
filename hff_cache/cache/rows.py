"""Row ranges of a part's ``layer_kk`` array, read and decoded by the cache itself where it knows the layout.

The writer makes every features array 2-D with whole rows per chunk and one of two pipelines (bytes,
optionally a byte shuffle, then zstd -- or raw bytes), unsharded or inside zarr's sharding codec. For those,
``features_array`` returns ``ChunkedRows`` / ``ShardedRows``, which fetch what a row range needs and decode it
with numcodecs; anything else is zarr's array, unchanged. Values always equal zarr's (tests/test_cache.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import google_crc32c
import numpy as np
import zarr
from zarr.abc.store import RangeByteRequest, Store, SuffixByteRequest
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ShardingCodecIndexLocation, ZstdCodec
from zarr.codecs.bytes import Endian
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import MemoryStore

__all__ = ["ChunkedRows", "ShardedRows", "chunk_decoder", "features_array", "open_array"]


def open_array(store: Store, path: str) -> zarr.Array:
    return zarr.open_array(store=store, path=path, mode="r", zarr_format=3)  # zarr_format: no v2 probing


_EMPTY = 2**64 - 1  # a shard index entry of an inner chunk that was never written


def chunk_decoder(codecs: Sequence[Any], dtype: Any, chunk_shape: Sequence[int]) -> Any | None:
    """A function from one stored chunk's bytes to its (chunk_shape) array, or None when the pipeline is not
    one the writer makes (bytes, optionally a numcodecs byte shuffle, then zstd; or bytes then tpcae's
    entropy coder), which zarr then decodes.

    Why not zarr: its asynchronous codec pipeline costs as much again as the decompression itself on a
    loader's chunk (benchmarks/training_cost.py, docs/results.md); the bytes and the values are zarr's."""
    import numcodecs

    from .codecs.ans import LaplaceANSCodec, decode_levels

    if not codecs or not isinstance(codecs[0], BytesCodec) or codecs[0].endian not in (Endian.little, None):
        return None
    steps = []
    for codec in codecs[1:]:
        config = getattr(codec, "codec_config", None)
        if isinstance(codec, ZstdCodec):
            steps.append(numcodecs.Zstd().decode)
        elif getattr(codec, "codec_name", "") == "numcodecs.shuffle" and config and config.get("elementsize"):
            steps.append(numcodecs.Shuffle(elementsize=int(config["elementsize"])).decode)
        elif isinstance(codec, LaplaceANSCodec):  # tpcae's entropy-coded levels
            rows, cols = int(chunk_shape[0]), int(np.prod(chunk_shape[1:], dtype=np.int64))
            steps.append(lambda data, r=rows, c=cols: decode_levels(data, r, c).astype("<i2"))
        else:
            return None
    dt, shape = np.dtype(dtype).newbyteorder("<"), tuple(int(n) for n in chunk_shape)

    def decode(data: Any) -> np.ndarray:
        for step in reversed(steps):
            data = step(data)
        return np.frombuffer(data, dt).reshape(shape)

    return decode


class _Rows:
    """What both row readers share: zarr's array for anything but a non-empty contiguous row slice, which
    ``pieces(lo, hi)`` reads."""

    def __init__(self, arr: zarr.Array, store: Store, path: str, decode: Any | None) -> None:
        self.arr, self.store, self.path, self.decode = arr, store, path, decode
        self.shape, self.dtype, self.chunks, self.shards = arr.shape, arr.dtype, arr.chunks, arr.shards

    def __getitem__(self, rows: Any) -> np.ndarray:
        if not isinstance(rows, slice):
            return np.asarray(self.arr[rows])
        lo, hi, step = rows.indices(int(self.shape[0]))
        if step != 1 or hi <= lo:
            return np.asarray(self.arr[rows])
        out = np.empty((hi - lo, *self.shape[1:]), dtype=self.dtype)
        for start, piece in self.pieces(lo, hi):
            out[start - lo:start - lo + len(piece)] = piece
        return out

    def pieces(self, lo: int, hi: int) -> list[tuple[int, np.ndarray]]:
        """Rows lo..hi as (first row, rows) pieces in order, each a stored chunk's decoded rows (for raw chunks a
        view of the fetched bytes, read-only): what a reader copies straight to where the rows go, with no
        assembled copy between (``Codec.decode_pieces``)."""
        raise NotImplementedError

    def _key(self, i: int) -> str:
        """The stored object of chunk (unsharded) or shard (sharded) ``i`` along the frame axis."""
        return f"{self.path}/{self.arr.metadata.encode_chunk_key((i, 0))}"


class ChunkedRows(_Rows):
    """Row ranges of an unsharded 2-D features array: the chunks a slice needs fetched concurrently (one GET
    each, as zarr does) and decoded by ``chunk_decoder``. Anything else, or a chunk never written (zarr fills
    it), goes to zarr."""

    def pieces(self, lo: int, hi: int) -> list[tuple[int, np.ndarray]]:
        if hi <= lo:
            return []
        size = int(self.chunks[0])
        first = lo // size
        keys = [self._key(k) for k in range(first, (hi - 1) // size + 1)]

        async def fetch() -> list[Any]:
            return await asyncio.gather(*(self.store.get(key, default_buffer_prototype()) for key in keys))

        out = []
        for k, buf in enumerate(sync(fetch()), start=first):
            a, z = max(lo, k * size), min(hi, (k + 1) * size)
            if buf is None:
                out.append((a, np.asarray(self.arr[a:z])))  # never written: zarr's fill value
            else:
                out.append((a, self.decode(buf.as_numpy_array())[a - k * size:z - k * size]))  # no copy
        return out


class ShardedRows(_Rows):
    """Row ranges of a sharded features array (a ``layer_kk`` of a part written with ``shard_frames``) in two
    GETs per shard touched: its index (kept), then one byte range spanning the inner chunks the rows need.
    zarr itself issues one GET per inner chunk; here the fetched inner chunks are decoded by ``chunk_decoder``
    (or, for a pipeline it does not know, by zarr from memory), so the values are zarr's. Anything but a
    contiguous row slice goes to zarr unchanged."""

    def __init__(self, arr: zarr.Array, store: Store, path: str, decode: Any | None = None) -> None:
        super().__init__(arr, store, path, decode)
        self._per_shard = int(self.shards[0]) // int(self.chunks[0])  # inner chunks along the frame axis
        self._index: dict[int, bytes] = {}
        self._meta = arr.metadata.to_buffer_dict(default_buffer_prototype())["zarr.json"]

    def pieces(self, lo: int, hi: int) -> list[tuple[int, np.ndarray]]:
        if hi <= lo:
            return []
        size = int(self.shards[0])
        return [p for s in range(lo // size, (hi - 1) // size + 1)
                for p in self._rows(s, max(lo, s * size), min(hi, (s + 1) * size))]

    def _rows(self, shard: int, lo: int, hi: int) -> list[tuple[int, np.ndarray]]:
        key = self._key(shard)
        index = self._shard_index(shard, key)
        entries = np.frombuffer(index[:-4], "<u8").reshape(-1, 2)
        chunk, base = int(self.chunks[0]), shard * int(self.shards[0])
        first = (lo - base) // chunk
        need = entries[first:(hi - 1 - base) // chunk + 1]
        if (need[:, 0] == _EMPTY).any():
            return [(lo, np.asarray(self.arr[lo:hi]))]  # an unwritten inner chunk: zarr fills it
        a, z = int(need[:, 0].min()), int((need[:, 0] + need[:, 1]).max())
        span = sync(self.store.get(key, default_buffer_prototype(), RangeByteRequest(a, z)))
        if span is None:
            raise FileNotFoundError(f"{key} vanished while it was read")
        data = span.as_numpy_array()  # a view: each inner chunk is decoded from its slice of it
        if self.decode is None:
            blob = bytearray(z) + index  # the shard as far as needed: the span at its offsets, the index at the end
            blob[a:z] = data.tobytes()
            return [(lo, self._decode(shard, bytes(blob), lo, hi))]
        out = []
        for k, (o, n) in enumerate(need):  # each inner chunk decoded from its slice of the span, trimmed to lo..hi
            start = base + (first + k) * chunk
            rows = self.decode(data[int(o) - a:int(o + n) - a])
            out.append((max(lo, start), rows[max(lo, start) - start:min(hi, start + chunk) - start]))
        return out

    def _decode(self, shard: int, blob: bytes, lo: int, hi: int) -> np.ndarray:
        mem = MemoryStore()
        proto = default_buffer_prototype().buffer
        sync(mem.set("zarr.json", self._meta))
        sync(mem.set(self.arr.metadata.encode_chunk_key((shard, 0)), proto.from_bytes(blob)))
        return np.asarray(zarr.open_array(store=mem, mode="r", zarr_format=3)[lo:hi])

    def _shard_index(self, shard: int, key: str) -> bytes:
        if shard not in self._index:
            buf = sync(self.store.get(key, default_buffer_prototype(), SuffixByteRequest(16 * self._per_shard + 4)))
            if buf is None:
                raise FileNotFoundError(f"{key} is missing")
            index = buf.to_bytes()
            # zarr checks the index's crc32c; so must we: a damaged offset could otherwise point into the
            # wrong chunk's bytes, and raw chunks would decode to wrong values without an error
            if np.uint32(google_crc32c.value(index[:-4])).tobytes() != index[-4:]:
                raise ValueError(f"{key}: the shard index is damaged (crc32c mismatch); `hff-cache verify` locates "
                                 "the damage, and deleting the part and rerunning the extraction repairs it")
            self._index[shard] = index
        return self._index[shard]


def features_array(store: Store, path: str) -> zarr.Array | ShardedRows | ChunkedRows:
    """``layer_kk`` of a part, opened: as ``ChunkedRows`` (unsharded) or ``ShardedRows`` (sharded, with the shard
    index at the end, as the writer stores it) where the array is 2-D with whole rows per chunk; else zarr's."""
    arr = open_array(store, path)
    if arr.metadata.zarr_format != 3 or arr.ndim != 2 or int(arr.chunks[1]) != int(arr.shape[1]):
        return arr
    codecs = arr.metadata.codecs
    sharding = codecs[0] if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec) else None
    if sharding is None:
        decode = chunk_decoder(codecs, arr.dtype, arr.chunks)
        return arr if decode is None else ChunkedRows(arr, store, path, decode)
    if arr.shards is None or not _plain_index(sharding) or int(arr.shards[1]) != int(arr.chunks[1]):
        return arr
    return ShardedRows(arr, store, path, chunk_decoder(sharding.codecs, arr.dtype, arr.chunks))


def _plain_index(sharding: ShardingCodec) -> bool:
    """The shard index as zarr writes it by default: at the end, little-endian uint64 pairs, then a crc32c."""
    codecs = sharding.index_codecs
    return (sharding.index_location == ShardingCodecIndexLocation.end and len(codecs) == 2
            and isinstance(codecs[0], BytesCodec) and codecs[0].endian in (Endian.little, None)
            and isinstance(codecs[1], Crc32cCodec))
