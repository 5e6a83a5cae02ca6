"""Reading many blocks of utterances at once: in threads, or in processes where decoding holds the GIL.

zstd, zarr's fetches and numpy release the GIL, so threads decode blocks in parallel. The entropy coder of
the tpcae/tpcape codecs (constriction's ANS) does not: two threads loaded a tpcape cache 1.56x slower than two
processes (benchmarks/loader.py). Those codecs set ``Codec.holds_gil``, and their blocks go to worker
processes, each with its own copy of the reader (a reader pickles without its opened arrays); what a process
decodes is copied once more, into the caller's arrays. Results come back in the order asked either way.
"""

from __future__ import annotations

import multiprocessing
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np

from .reader import CacheReader, StoredCodes

__all__ = ["BlockReads", "read_blocks", "uses_processes"]

_reader: CacheReader | None = None  # a worker process's reader (set once by ``_adopt``)


def uses_processes(reader: CacheReader, workers: int, blocks: int) -> bool:
    """Whether ``BlockReads`` starts processes: only for a GIL-holding codec, with several workers and blocks
    (starting a process costs ~0.5 s of imports, a block of such a codec ~1 s of decoding)."""
    return bool(reader.codec.holds_gil) and workers > 1 and blocks > 1


class BlockReads:
    """A pool of ``workers`` that read blocks of ``reader``: threads, or processes (``uses_processes``).
    ``blocks``: about how many blocks it will read (one block does not pay for a process)."""

    def __init__(self, reader: CacheReader, workers: int, blocks: int) -> None:
        self.reader, self.workers = reader, max(1, workers)
        self.processes = uses_processes(reader, workers, blocks)
        if self.processes:
            # spawn, not fork: the parent runs torch's OpenMP threads, and a forked child that touches them can
            # hang
            self._pool: Any = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=_adopt, initargs=(reader,))
        else:
            self._pool = ThreadPoolExecutor(self.workers)

    def submit(self, ids: Sequence[int], layers: Sequence[int] | None, *, codes: bool = False,
               out: Sequence[np.ndarray] | None = None) -> _Read:
        """Start reading ``ids``: ``reader.read_codes`` (``codes``) or ``reader.read_many`` as float16 (into
        ``out`` when given). ``.result()`` waits and returns what was read."""
        ids, layers = [int(i) for i in ids], None if layers is None else list(layers)
        read = _codes if codes else _fp16
        if self.processes:
            return _Read(self._pool.submit(_in_worker, read, ids, layers), out,
                         lambda: self._without_processes(read, ids, layers))
        if codes:
            return _Read(self._pool.submit(self.reader.read_codes, ids, layers), None)
        return _Read(self._pool.submit(self.reader.read_many, ids, layers, dtype=np.float16, out=out), None)

    def _without_processes(self, read: Callable[..., Any], ids: list[int], layers: list[int] | None) -> Any:
        """A worker process died (killed, or it could not start: a script that starts reading at import,
        without ``if __name__ == "__main__":``, re-runs itself in a spawned child): read here instead, and the
        rest by threads."""
        if self.processes:
            self.processes = False
            warnings.warn(f"{self.reader.url}: a block-reading process failed, so the blocks are read by threads "
                          "instead (one core's speed for this codec). A script that reads a cache at import time "
                          "needs `if __name__ == \"__main__\":` around it to use processes.", RuntimeWarning,
                          stacklevel=4)
            broken, self._pool = self._pool, ThreadPoolExecutor(self.workers)
            broken.shutdown(wait=False, cancel_futures=True)
        return read(self.reader, ids, layers)

    def map(self, id_lists: Sequence[Sequence[int]], layers: Sequence[int] | None, *, codes: bool,
            outs: Sequence[Sequence[np.ndarray]] | None = None) -> Iterator[Any]:
        """What ``submit`` reads for each list of ids (into ``outs[i]`` when given), in order, every read started
        at once."""
        outs = outs if outs is not None else [None] * len(id_lists)
        reads = deque(self.submit(ids, layers, codes=codes, out=out) for ids, out in zip(id_lists, outs, strict=True))
        while reads:  # each read let go once handed over, so what was read is not held twice
            yield reads.popleft().result()

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=cancel_futures)

    def __enter__(self) -> BlockReads:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown(cancel_futures=True)


def read_blocks(reader: CacheReader, id_lists: Sequence[Sequence[int]], layers: Sequence[int] | None, *,
                codes: bool, workers: int, outs: Sequence[Sequence[np.ndarray]] | None = None
                ) -> Iterator[list[StoredCodes] | list[np.ndarray]]:
    """For each list of utterance indices, in order: ``reader.read_codes`` (``codes``) or ``reader.read_many``
    as float16 (into ``outs[i]`` when given), by a ``BlockReads`` pool of ``workers``."""
    with BlockReads(reader, workers, len(id_lists)) as pool:
        yield from pool.map(id_lists, layers, codes=codes, outs=outs)


class _Read:
    """A started read; ``result()`` copies a process's arrays into ``out`` where the caller gave one, and reads
    in this thread (``fallback``) if the process pool broke."""

    def __init__(self, future: Future, out: Sequence[np.ndarray] | None,
                 fallback: Callable[[], Any] | None = None) -> None:
        self.future, self.out, self.fallback = future, out, fallback

    def result(self) -> Any:
        try:
            got = self.future.result()
        except BrokenProcessPool:
            if self.fallback is None:
                raise
            got = self.fallback()
        if self.out is None:
            return got
        for dest, arr in zip(self.out, got, strict=True):
            dest[...] = arr
        return list(self.out)


def _adopt(reader: CacheReader) -> None:
    global _reader
    _reader = reader


def _in_worker(read: Callable[..., Any], ids: list[int], layers: list[int] | None) -> Any:
    assert _reader is not None, "a block-reading process without its reader"
    return read(_reader, ids, layers)


def _codes(reader: CacheReader, ids: list[int], layers: list[int] | None) -> list[StoredCodes]:
    return reader.read_codes(ids, layers)


def _fp16(reader: CacheReader, ids: list[int], layers: list[int] | None) -> list[np.ndarray]:
    return reader.read_many(ids, layers, dtype=np.float16)
