"""Reading many blocks of utterances at once: in threads, or in processes where decoding holds the GIL.

zstd, zarr's fetches and numpy release the GIL, so threads decode blocks in parallel. The entropy coder of
the tpcae/tpcape codecs (constriction's ANS) does not: two threads took the wall time of one (25.5 against
26.8 s for 150 utterances), so loading such a cache was one core's work. Those codecs set
``Codec.holds_gil``, and their blocks go to worker processes, each with its own copy of the reader (a reader
pickles without its opened arrays). Results come back in the blocks' order either way.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from itertools import repeat
from typing import Any

import numpy as np

from .reader import CacheReader, StoredCodes

__all__ = ["read_blocks", "uses_processes"]

_reader: CacheReader | None = None  # a worker process's reader (set once by ``_adopt``)


def uses_processes(reader: CacheReader, workers: int, blocks: int) -> bool:
    """Whether ``read_blocks`` would start processes: only for a GIL-holding codec, with several workers and
    blocks (starting a process costs ~0.5 s of imports, a block of such a codec ~1 s of decoding)."""
    return bool(reader.codec.holds_gil) and workers > 1 and blocks > 1


def read_blocks(reader: CacheReader, id_lists: Sequence[Sequence[int]], layers: Sequence[int] | None, *,
                codes: bool, workers: int) -> Iterator[list[StoredCodes] | list[np.ndarray]]:
    """For each list of utterance indices, in order: ``reader.read_codes`` (``codes``) or ``reader.read_many``
    as float16, read by ``workers`` threads or, for a GIL-holding codec, processes."""
    read = _codes if codes else _fp16
    lists = [list(map(int, ids)) for ids in id_lists]
    with _executor(reader, workers, len(lists)) as pool:
        yield from pool.map(_call, repeat(read), lists, repeat(layers if layers is None else list(layers)),
                            repeat(None if uses_processes(reader, workers, len(lists)) else reader))


def _executor(reader: CacheReader, workers: int, blocks: int) -> Executor:
    if not uses_processes(reader, workers, blocks):
        return ThreadPoolExecutor(max(1, workers))
    # spawn, not fork: the parent runs torch's OpenMP threads, and a forked child that touches them can hang
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_adopt,
                               initargs=(reader,))


def _adopt(reader: CacheReader) -> None:
    global _reader
    _reader = reader


def _call(read: Callable[..., Any], ids: list[int], layers: list[int] | None, reader: CacheReader | None) -> Any:
    return read(reader if reader is not None else _reader, ids, layers)


def _codes(reader: CacheReader, ids: list[int], layers: list[int] | None) -> list[StoredCodes]:
    return reader.read_codes(ids, layers)


def _fp16(reader: CacheReader, ids: list[int], layers: list[int] | None) -> list[np.ndarray]:
    return reader.read_many(ids, layers, dtype=np.float16)
