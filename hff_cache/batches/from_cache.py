"""Batches from a feature cache: length-bucketed, shuffled by whole blocks, decoded ahead in threads.

Reading pattern (why it is fast): the labelled utterances of each part are cut into *blocks* of
consecutive utterances (about ``block_frames`` frames, a few Zarr chunks). An epoch shuffles blocks,
pools blocks into windows of about ``shuffle_frames`` frames, sorts each window by length and cuts it into
batches of at most ``batch_frames`` padded frames, then shuffles the batch order. Every block is fetched
with one ``CacheReader.read_many`` call (one contiguous range per layer), so each compressed chunk is
decoded once per epoch -- never one random utterance per chunk decode -- and its rows are copied once, straight
into the window's padded batches. ``num_workers`` threads read a window's blocks. Where the training step
leaves a core free (``loader_thread``: a GPU, or fewer torch threads than CPUs), a producer thread reads the
next window while the model trains on the current one, and a bounded queue of ``prefetch`` batches limits
memory; where the step's threads fill every core, the windows are read between steps instead (a thread beside
an OpenMP team that fills the cores stalls it). Windows are float16 and capped at ``WINDOW_BYTES``.

``in_memory`` loads every labelled frame once and then only copies batches from RAM. It holds the stored
codes (compressed residency: int8, packed 4-bit, tpca's codes, with their scales; the entropy-coded codecs'
levels bit-packed, ``PackedLevels``) when the codec has a torch decoder (``device_decode.DECODERS``): the
producer gathers a batch's codes with numpy, the consumer decodes them with torch on ``device`` (where the
model runs), equal bit for bit to the numpy decoder. fp16 caches,
codecs without a decoder and ``resident="fp16"`` hold decoded float16 instead (2 bytes a value). The plan of
an epoch depends only on (seed, epoch), never on thread timing, so a resumed run sees the same batches as an
uninterrupted one.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from typing import Any

import numpy as np
import torch

from hff_cache.batches import device_decode
from hff_cache.batches.common import collate_targets, memory_available
from hff_cache.batches.packed_levels import PackedLevels
from hff_cache.cache.block_reads import BlockReads, read_blocks
from hff_cache.cache.codecs import MAIN, Codec
from hff_cache.cache.format import CHUNK_FRAMES, is_url
from hff_cache.cache.reader import StoredCodes
from hff_cache.config import TrainConfig
from hff_cache.model.batch import Batch
from hff_cache.runtime.distributed import balanced_assignment
from hff_cache.runtime.planning import plan_batches
from hff_cache.runtime.threads import usable_cpus

__all__ = ["CacheBatches", "hours_per_gib", "resident_frame_bytes"]

_DONE = object()
# Decoded features one shuffle window may hold (float16). The next window fills while the current one empties
# (each batch's utterances are freed once collated), so up to two are alive. 384 MiB keeps a 25 x 1024 cache's
# streamed run near a quarter of full fine-tuning's memory and leaves tiny.en's windows whole (100,000 frames).
WINDOW_BYTES = 384 << 20


class CacheBatches:
    """A ``BatchSource`` over one cache and the labelled utterances of a task (``TaskData``)."""

    # The batching defaults are TrainConfig's (the one source); callers pass the run's values.
    def __init__(self, reader: Any, data: Any, *, ctc: bool, layers: Sequence[int] | None = None,
                 batch_frames: int = TrainConfig.batch_frames, max_batch_utts: int = TrainConfig.max_batch_utts,
                 shuffle: bool = True, seed: int = 0, in_memory: bool | str = TrainConfig.in_memory,
                 shuffle_frames: int = TrainConfig.shuffle_frames, block_frames: int = 8192,
                 num_workers: int = TrainConfig.num_workers, prefetch: int = TrainConfig.prefetch,
                 loader_thread: bool | str = TrainConfig.loader_thread, rank: int = 0,
                 world_size: int = 1, local_world_size: int = 1, resident: str = "codes",
                 device: torch.device | str | None = None) -> None:
        self.reader = reader
        self.data = data
        self.ctc = ctc
        self.layers = list(layers) if layers is not None else None
        self.num_layers = len(self.layers) if self.layers is not None else len(reader.meta.layers)
        self.hidden_size = int(reader.meta.encoder.hidden_size)
        self.batch_frames, self.max_batch_utts = int(batch_frames), int(max_batch_utts)
        self.shuffle, self.seed = shuffle, int(seed)
        self.shuffle_frames = int(shuffle_frames)
        self.num_workers, self.prefetch = max(1, int(num_workers)), max(1, int(prefetch))
        self.loader_thread = loader_thread
        self.indices = np.asarray(data.indices, dtype=np.int64)
        self.lengths = np.asarray(reader.lengths, dtype=np.int64)[self.indices]
        # Decoded windows are float16 and at most WINDOW_BYTES, whatever ``shuffle_frames`` says: wide
        # encoders (25 x 1024 values a frame) would otherwise hold gigabytes per window. Blocks shrink with
        # the window (not below a chunk) so a window still pools several places of the cache.
        frame_bytes = self.num_layers * self.hidden_size * 2
        self.shuffle_frames = max(1, min(self.shuffle_frames, WINDOW_BYTES // frame_bytes))
        block_frames = min(int(block_frames), max(CHUNK_FRAMES, self.shuffle_frames // 8))
        if world_size > 1:  # enough blocks for every rank to get a balanced share of whole blocks
            block_frames = max(1, min(int(block_frames), int(self.lengths.sum()) // (8 * world_size)))
        self.blocks = self._make_blocks(int(block_frames))
        if world_size > 1:
            # Under torchrun this rank owns a fixed, frame-balanced share of the blocks and never reads
            # another rank's (hff_cache.distributed). Fixed, so --in-memory holds only the share.
            owner = balanced_assignment([int(self.lengths[b].sum()) for b in self.blocks], world_size)
            self.blocks = [b for b, r in zip(self.blocks, owner, strict=True) if r == rank]
        self.nbytes_fp16 = self.num_frames * self.num_layers * self.hidden_size * 2
        if resident not in ("codes", "fp16"):
            raise ValueError(f"resident must be 'codes' or 'fp16', not {resident!r}")
        codec: Codec = reader.codec
        self.resident = "codes" if resident == "codes" and device_decode.can_decode(codec) else "fp16"
        self.device = torch.device(device if device is not None else "cpu")  # where codes are decoded
        # an estimate until loaded; a chained codec's codes hold every stored layer up to the top one asked
        held = len(self._resident_layers()[1]) if self.resident == "codes" else self.num_layers
        self.resident_nbytes = self.num_frames * resident_frame_bytes(codec, held, self.hidden_size, self.resident)
        if in_memory == "auto":
            # half of what is free leaves room for the batches, the model and a second (valid) cache;
            # the ranks of one node share that memory
            in_memory = self.resident_nbytes < 0.5 * memory_available() / max(1, local_world_size)
        self.in_memory = bool(in_memory)
        self._mem: np.ndarray | None = None
        self._mem_offsets: np.ndarray | None = None
        self._codes: list[_ResidentLayer] | None = None
        self._slots: list[list[int]] = []  # per resident layer, the batch's layer slots it fills

    # -- planning --

    def _make_blocks(self, block_frames: int) -> list[np.ndarray]:
        """Positions (into ``data``) of consecutive utterances of one part, about ``block_frames`` long."""
        part_of = np.empty(len(self.indices), dtype=np.int64)
        for k, info in enumerate(self.reader.parts()):
            part_of[(self.indices >= info.start) & (self.indices < info.stop)] = k
        blocks: list[np.ndarray] = []
        cur: list[int] = []
        frames = 0
        for p in range(len(self.indices)):
            if cur and (part_of[p] != part_of[cur[-1]] or frames >= block_frames):
                blocks.append(np.asarray(cur))
                cur, frames = [], 0
            cur.append(p)
            frames += int(self.lengths[p])
        if cur:
            blocks.append(np.asarray(cur))
        return blocks

    def plan(self, epoch: int) -> list[tuple[list[np.ndarray], list[list[int]]]]:
        """[(blocks of a window, batches of positions)] for ``epoch``; a pure function of (seed, epoch)."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.blocks)) if self.shuffle else np.arange(len(self.blocks))
        windows: list[list[np.ndarray]] = [[]]
        frames = 0
        for b in order:
            if windows[-1] and frames >= self.shuffle_frames:
                windows.append([])
                frames = 0
            windows[-1].append(self.blocks[b])
            frames += int(self.lengths[self.blocks[b]].sum())
        out = []
        for blocks in windows:
            if not blocks:
                continue
            positions = np.concatenate(blocks).tolist()
            batches = plan_batches(positions, self.lengths, self.batch_frames, self.max_batch_utts)
            if self.shuffle:
                batches = [batches[i] for i in rng.permutation(len(batches))]
            out.append((blocks, batches))
        return out

    def __len__(self) -> int:
        return sum(len(b) for _, b in self.plan(0))

    @property
    def num_frames(self) -> int:
        """Frames this source delivers per epoch (under torchrun: this rank's share)."""
        return int(sum(int(self.lengths[b].sum()) for b in self.blocks))

    @property
    def num_utterances(self) -> int:
        return int(sum(len(b) for b in self.blocks))

    # -- reading --

    def _own_offsets(self) -> np.ndarray:
        """Rows of every position in RAM; positions outside this source's blocks (another rank's share) get
        empty ranges."""
        own = np.zeros(len(self.indices), dtype=bool)
        for b in self.blocks:
            own[b] = True
        offsets = np.zeros(len(self.indices) + 1, dtype=np.int64)
        np.cumsum(np.where(own, self.lengths, 0), out=offsets[1:])
        return offsets

    def load(self) -> None:
        """Read every labelled frame once into RAM (``in_memory``): the stored codes, or decoded float16."""
        if self._mem is not None or self._codes is not None:
            return
        if self.resident == "codes":
            self._load_codes()
            return
        offsets = self._own_offsets()
        mem = np.empty((int(offsets[-1]), self.num_layers, self.hidden_size), dtype=np.float16)
        outs = [[mem[offsets[p]: offsets[p + 1]] for p in b] for b in self.blocks]  # views: decoded into place
        for _ in read_blocks(self.reader, [self.indices[b] for b in self.blocks], self.layers, codes=False,
                             workers=self.num_workers, outs=outs):
            pass
        self._mem, self._mem_offsets = mem, offsets
        self.resident_nbytes = mem.nbytes

    def _load_codes(self) -> None:
        """Compressed residency: every block's stored codes (``CacheReader.read_codes``) in one array per
        layer and per-frame array; each part's side arrays (or worker's fit) once, as a group."""
        offsets = self._own_offsets()
        layers, self._slots = self._resident_layers()
        if not self.blocks:
            self._codes, self._mem_offsets = [], offsets
            return
        reads = read_blocks(self.reader, [self.indices[b] for b in self.blocks], layers, codes=True,
                            workers=self.num_workers)
        packed = self.reader.codec.packed_residency
        res: list[_ResidentLayer] = []
        for block, codes in zip(self.blocks, reads, strict=True):  # each block's codes placed, then let go
            if not res:  # the first block's arrays give the shapes (and choose the packed widths)
                res = [_ResidentLayer.allocate(c, int(offsets[-1]), len(self.indices), packed) for c in codes]
            lo, hi = int(offsets[block[0]]), int(offsets[block[-1] + 1])  # a block's positions are consecutive
            for r, c in zip(res, codes, strict=True):
                for name, arr in c.rows.items():
                    r.rows[name][lo:hi] = arr
                r.add_groups(block, c)  # in this one thread, in the blocks' order
        for r in res:
            r.to_device(self.reader.codec, self.device)
        self._codes, self._mem_offsets = res, offsets
        self.resident_nbytes = sum(r.nbytes for r in res)

    def _resident_layers(self) -> tuple[list[int] | None, list[list[int]]]:
        """The stored layers compressed residency holds, and for each the batch slots it fills. A chained
        codec's layer decodes from the ones below it, so it holds every stored layer up to the top one asked."""
        stored = list(self.reader.meta.layers)
        asked = self.layers if self.layers is not None else stored
        if not self.reader.codec.chained:
            return self.layers, [[j] for j in range(len(asked))]
        chain = stored[:max(stored.index(k) for k in asked) + 1] if asked else []
        return chain, [[j for j, k in enumerate(asked) if k == s] for s in chain]

    def _padded(self, batch: list[int]) -> np.ndarray:
        # float16 like the cache (the model's first op casts per layer; half the bytes to copy and move).
        # numpy, not torch: a torch op in this thread would start a second OpenMP team beside the training
        # step's: on 2 cores an epoch from RAM took 2.08x the steps alone with torch here, 0.88x with numpy
        # (benchmarks/training_cost.py, docs/results.md).
        t = max(int(self.lengths[p]) for p in batch)
        return np.zeros((len(batch), t, self.num_layers, self.hidden_size), dtype=np.float16)

    def _copy_block(self, block: np.ndarray, out: list[np.ndarray]) -> None:
        """A block's features copied from the float16 held in RAM into ``out`` (as a streamed read fills them)."""
        mem, off = self._mem, self._mem_offsets
        assert mem is not None and off is not None
        for p, dest in zip(block.tolist(), out, strict=True):
            dest[...] = mem[off[p]: off[p + 1]]

    def _collate(self, batch: list[int], x: np.ndarray) -> Batch:
        targets, target_lengths = collate_targets([self.data.targets[p] for p in batch], self.ctc)
        return Batch(ids=[self.data.ids[p] for p in batch],
                     lengths=torch.tensor([int(self.lengths[p]) for p in batch], dtype=torch.long),
                     targets=targets, target_lengths=target_lengths, feats=torch.from_numpy(x))

    def _collate_codes(self, batch: list[int]) -> _CodesBatch:
        """A batch's stored codes gathered from RAM (numpy, in the producer thread); the consumer decodes."""
        assert self._codes is not None and self._mem_offsets is not None
        off = self._mem_offsets
        lens = np.asarray([int(self.lengths[p]) for p in batch], dtype=np.int64)
        rows = np.concatenate([np.arange(off[p], off[p + 1]) for p in batch]) if batch else np.zeros(0, np.int64)
        layers = [({n: a[rows] for n, a in r.rows.items()}, r.utt_group[batch]) for r in self._codes]
        targets, target_lengths = collate_targets([self.data.targets[p] for p in batch], self.ctc)
        return _CodesBatch([self.data.ids[p] for p in batch], lens, targets, target_lengths, layers)

    def _decode_batch(self, item: _CodesBatch) -> Batch:
        """Decode a gathered batch with torch on ``device`` (in the consumer's thread, where the model runs:
        a torch op in the producer thread would start a second OpenMP team beside the training step's)."""
        assert self._codes is not None
        codec, dev = self.reader.codec, self.device
        n, t = len(item.lengths), int(item.lengths.max()) if len(item.lengths) else 0
        x = torch.zeros((n, t, self.num_layers, self.hidden_size), dtype=torch.float16, device=dev)
        dest = np.concatenate([i * t + np.arange(m) for i, m in enumerate(item.lengths.tolist())]) if n else []
        dest_t = torch.as_tensor(np.asarray(dest, dtype=np.int64), device=dev)
        flat = x.view(n * t, self.num_layers, self.hidden_size)
        below = None  # a chained codec: the layer below, decoded (float32), in layer order
        for slots, r, (rows, utt_group) in zip(self._slots, self._codes, item.layers, strict=True):
            codes = device_decode.DeviceCodes({k: torch.from_numpy(v).to(dev) for k, v in rows.items()},
                                              item.lengths, utt_group, r.groups_t, r.groups, below)
            decoded = device_decode.decode(codec, codes)
            for j in slots:
                flat[dest_t, j] = decoded.to(torch.float16)
            below = decoded if codec.chained else None
        return Batch(ids=item.ids, lengths=torch.from_numpy(item.lengths), targets=item.targets,
                     target_lengths=item.target_lengths, feats=x)

    def _window(self, batches: list[list[int]], blocks: list[np.ndarray], pool: Any) -> Any:
        """Future-like: .result() -> per batch, its padded features, every frame copied once, straight into them:
        read from the cache (streamed; a block per task of ``num_workers`` threads, or processes where the
        codec's decoder holds the GIL) or copied from RAM (threads); or None per batch under compressed
        residency (``_item`` gathers and decodes the codes per batch)."""
        if self._codes is not None:
            return _Done([None] * len(batches))
        assert pool is not None
        xs = [self._padded(b) for b in batches]
        rows = {p: x[i, : int(self.lengths[p])] for x, b in zip(xs, batches, strict=True) for i, p in enumerate(b)}
        if self.in_memory:
            futures = [pool.submit(self._copy_block, b, [rows[p] for p in b.tolist()]) for b in blocks]
        else:
            futures = [pool.submit(self.indices[b], self.layers, out=[rows[p] for p in b.tolist()]) for b in blocks]
        return _Gather(futures, xs)

    def _read_pool(self) -> Any:
        """The pool of one epoch's reads: none under compressed residency, threads copying from RAM, or a
        ``BlockReads`` pool streaming from the cache."""
        if self._codes is not None:
            return None
        if self.in_memory:
            return ThreadPoolExecutor(self.num_workers)
        return BlockReads(self.reader, self.num_workers, len(self.blocks))

    def _item(self, batch: list[int], x: np.ndarray | None) -> Batch | _CodesBatch:
        return self._collate_codes(batch) if x is None else self._collate(batch, x)

    def _items(self, epoch: int, ahead: bool) -> Iterator[Batch | _CodesBatch]:
        """The items of ``epoch`` in order. ``ahead``: the next window's reads start before this window's
        batches are handed out (in the pool's threads, beside the training step)."""
        pool = self._read_pool()
        try:
            windows = [(batches, blocks) for blocks, batches in self.plan(epoch)]
            pending = self._window(*windows[0], pool) if windows else None
            for w, (batches, _) in enumerate(windows):
                xs = pending.result()
                nxt = windows[w + 1] if w + 1 < len(windows) else None
                pending = self._window(*nxt, pool) if nxt and ahead else None
                for k, batch in enumerate(batches):
                    item = self._item(batch, xs[k])
                    xs[k] = None  # handed out: this window shrinks while the next one fills
                    yield item
                del xs
                if nxt and not ahead:
                    pending = self._window(*nxt, pool)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def _produce(self, epoch: int, out: queue.Queue, stop: threading.Event) -> None:
        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            items = self._items(epoch, ahead=True)
            for item in items:
                if not put(item):
                    items.close()  # the consumer stopped: shut the pool down now
                    return
            put(_DONE)
        except BaseException as exc:  # hand any failure to the consumer, which re-raises it
            put(exc)

    def _in_thread(self) -> bool:
        """Decode in a thread beside the step? Where the step leaves a core free, or where reading is mostly
        waiting (a cache behind a URL: an object store). On 2 CPU cores that the step's two torch threads fill, a
        loader thread beside them stalls their OpenMP team (a streamed raw epoch of the 25 x 1024 shape: 1.26x the
        steps alone, 1.07x between steps; benchmarks/training_cost.py, docs/results.md)."""
        if self.loader_thread != "auto":
            return bool(self.loader_thread)
        remote = is_url(self.reader.url)
        return remote or self.device.type != "cpu" or torch.get_num_threads() < usable_cpus()

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """The batches of ``epoch``: decoded ahead in a background thread, or on demand in the caller's thread
        between training steps (``loader_thread``)."""
        if self.in_memory:
            self.load()
        items = self._from_thread(epoch) if self._in_thread() else self._items(epoch, ahead=False)
        with closing(items):  # stopped early: the producer is released and the read pool shut down at once
            for item in items:
                yield self._decode_batch(item) if isinstance(item, _CodesBatch) else item

    def _from_thread(self, epoch: int) -> Iterator[Batch | _CodesBatch]:
        """The items of ``epoch`` from a producer thread, up to ``prefetch`` ahead."""
        out: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        worker = threading.Thread(target=self._produce, args=(epoch, out, stop), daemon=True,
                                  name=f"hff-loader-{epoch}")
        worker.start()
        try:
            while True:
                item = out.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()  # the consumer stopped early (or finished): release the producer
            worker.join()


class _Done:
    def __init__(self, value: Any) -> None:
        self.value = value

    def result(self) -> Any:
        return self.value


class _Gather:
    def __init__(self, futures: list[Any], value: Any) -> None:
        self.futures, self.value = futures, value

    def result(self) -> Any:
        for fut in self.futures:
            fut.result()  # re-raises a read's failure
        return self.value


class _CodesBatch:
    """A batch before decoding: its labels and, per layer, the gathered rows and utterance groups."""

    def __init__(self, ids: list[str], lengths: np.ndarray, targets: torch.Tensor,
                 target_lengths: torch.Tensor | None, layers: list[tuple[dict[str, np.ndarray], np.ndarray]]) -> None:
        self.ids, self.lengths, self.targets, self.target_lengths = ids, lengths, targets, target_lengths
        self.layers = layers


class _ResidentLayer:
    """One layer's codes in RAM: per-frame arrays of every own frame, each position's group, and the groups
    (per-part arrays, in numpy and on the decode device)."""

    def __init__(self, rows: dict[str, np.ndarray], positions: int) -> None:
        self.rows = rows
        self.utt_group = np.zeros(positions, dtype=np.int64)
        self.groups: list[dict[str, np.ndarray]] = []
        self.keys: list[tuple[str | None, str | None]] = []
        self.groups_t: list[dict[str, torch.Tensor]] = []

    @classmethod
    def allocate(cls, sample: StoredCodes, frames: int, positions: int, packed: bool = False) -> _ResidentLayer:
        """Empty arrays for ``frames`` rows shaped like ``sample``'s; ``packed``: the levels bit-packed (filled
        with ``sample``'s block first, which chooses the widths)."""
        rows: dict[str, Any] = {n: PackedLevels(frames, a.shape[1]) if packed and n == MAIN
                                else np.empty((frames, *a.shape[1:]), dtype=a.dtype) for n, a in sample.rows.items()}
        return cls(rows, positions)

    def add_groups(self, block: np.ndarray, codes: StoredCodes) -> None:
        """Record the groups of a block's codes (one part's: usually one group) under global ids."""
        for key, arrays in zip(codes.group_keys, codes.groups, strict=True):
            if key not in self.keys:
                self.keys.append(key)
                self.groups.append(arrays)
        local = np.asarray([self.keys.index(k) for k in codes.group_keys], dtype=np.int64)
        self.utt_group[block] = local[codes.group]

    def to_device(self, codec: Codec, device: torch.device) -> None:
        self.groups_t = device_decode.device_groups(codec, self.groups, device)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.rows.values()) + sum(a.nbytes for g in self.groups for a in g.values())


def resident_frame_bytes(codec: Codec, num_layers: int, hidden_size: int, resident: str = "codes") -> float:
    """Bytes of RAM per frame (all ``num_layers`` layers) that ``in_memory`` holds: the stored codes when the
    codec has a torch decoder and ``resident`` is "codes", else decoded float16."""
    if resident == "codes" and device_decode.can_decode(codec):
        return num_layers * codec.frame_nbytes(hidden_size)
    return num_layers * hidden_size * 2.0


def hours_per_gib(codec: Codec, num_layers: int, hidden_size: int, frame_rate: float = 50.0,
                  resident: str = "codes") -> float:
    """Hours of audio one GiB of RAM holds in ``in_memory`` residency (the per-part arrays left out: they
    are a few KiB a part, and a tpca fit is ~1 MiB a layer per worker)."""
    return 2**30 / resident_frame_bytes(codec, num_layers, hidden_size, resident) / frame_rate / 3600
