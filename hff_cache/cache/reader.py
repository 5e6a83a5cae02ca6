"""Read a feature cache: the index of committed parts, features by utterance, statistics, info."""

from __future__ import annotations

import asyncio
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

from .codecs import MAIN, Codec, recorded_codec
from .format import (
    FORMAT_VERSION,
    INDEX_ARRAYS,
    PARTS,
    ROOT_KEY,
    SHARDS,
    STATS_ARRAYS,
    CacheFormatError,
    CacheMeta,
    cache_id,
    is_url,
    layer_name,
    parse_part_id,
    side_name,
)
from .rows import features_array, open_array

# --- store helpers (shared with the writer) -------------------------------------------------------------


def open_store(url: str, storage_options: dict | None = None, read_only: bool = True) -> Store:
    """FsspecStore for URLs (``s3://bucket/prefix``), LocalStore for plain paths."""
    url = os.fspath(url)
    if is_url(url):
        return FsspecStore.from_url(url, storage_options=storage_options or {}, read_only=read_only)
    if storage_options:
        raise ValueError(f"storage_options given for a local path {url!r}; they apply only to URLs")
    if read_only and not os.path.isdir(url):
        raise FileNotFoundError(f"no feature cache at {url!r} (directory does not exist)")
    return LocalStore(url, read_only=read_only)


async def _get_json(store: Store, key: str) -> dict | None:
    # Missing or unreadable metadata both mean "not there": an interrupted write must not break readers.
    try:
        buf = await store.get(key, prototype=default_buffer_prototype())
        return None if buf is None else json.loads(buf.to_bytes())
    except (OSError, ValueError):
        return None


def read_json(store: Store, key: str) -> dict | None:
    return sync(_get_json(store, key))


def read_part_attrs(store: Store, pids: Sequence[str]) -> list[dict | None]:
    """Attributes of each part group (fetched concurrently), None where zarr.json is missing/unreadable."""

    async def _all() -> list[dict | None]:
        docs = await asyncio.gather(*(_get_json(store, f"{PARTS}/{p}/zarr.json") for p in pids))
        return [d.get("attributes", {}) if isinstance(d, dict) else None for d in docs]

    return sync(_all())


def list_part_ids(store: Store) -> list[str]:
    """Names under ``parts/`` that look like part ids, sorted. Includes uncommitted parts."""
    fs = getattr(store, "fs", None)
    if fs is not None and hasattr(fs, "invalidate_cache"):
        fs.invalidate_cache()  # fsspec listings are cached per filesystem instance; parts appear over time

    async def _ls() -> list[str]:
        return [name.rstrip("/") async for name in store.list_dir(PARTS)]

    return sorted(n for n in sync(_ls()) if parse_part_id(n) is not None)


def store_bytes(store: Store) -> int:
    """Total bytes stored under the cache root (every key, metadata included)."""
    if isinstance(store, FsspecStore):
        try:  # one listing call instead of one HEAD per key
            return int(sync(store.fs._du(store.path, total=True)))
        except (AttributeError, NotImplementedError):
            pass
    return int(sync(store.getsize_prefix("")))



# --- reader ----------------------------------------------------------------------------------------------


@dataclass
class PartInfo:
    part_id: str
    worker: str
    start: int  # first utterance index in the global order
    stop: int  # one past the last
    num_frames: int
    num_utterances: int


@dataclass
class StoredCodes:
    """One stored layer of some utterances as its codec wrote it, not decoded: what compressed residency
    keeps in RAM. Utterance i owns rows ``offsets[i]:offsets[i+1]`` of every array in ``rows`` (``layer_kk``
    under ``"layer"``, and the per-frame side arrays) and decodes with the per-part arrays
    ``groups[group[i]]`` (side arrays without a frame axis, the worker's fit). ``group_keys`` name each group
    (part id, fit part id; None where it does not matter) so codes of several reads can share them."""

    layer: int
    rows: dict[str, np.ndarray]
    lengths: np.ndarray
    group: np.ndarray
    groups: list[dict[str, np.ndarray]]
    group_keys: list[tuple[str | None, str | None]]

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)


def decode_codes(codec: Codec, codes: StoredCodes, dtype: Any = np.float32,
                 below: np.ndarray | None = None) -> np.ndarray:
    """``codes`` decoded with the numpy codec: (rows, D), equal to ``read_many``'s frames of the same
    utterances concatenated. Runs of utterances of one group decode together. ``below``: for a chained codec,
    the same rows of the stored layer below, decoded (float32; None for the first stored layer)."""
    offsets, out = codes.offsets, []
    i, n = 0, len(codes.lengths)
    while i < n:
        j = i + 1
        while j < n and codes.group[j] == codes.group[i]:
            j += 1
        lo, hi = int(offsets[i]), int(offsets[j])
        stored = {s: a[lo:hi] for s, a in codes.rows.items()}
        stored.update(codes.groups[int(codes.group[i])])
        stored["starts"] = offsets[i:j] - lo
        if codec.chained:
            stored["below"] = None if below is None else below[lo:hi]
        out.append(codec.decode(stored, slice(0, hi - lo), dtype=dtype))
        i = j
    return np.concatenate(out) if out else np.zeros((0, 0), dtype)


def load_root_meta(store: Store, url: str) -> CacheMeta:
    doc = read_json(store, "zarr.json")
    if doc is None:
        raise CacheFormatError(f"{url} is not a feature cache: no zarr.json at its root")
    attrs = doc.get("attributes", {})
    if doc.get("node_type") != "group" or ROOT_KEY not in attrs:
        raise CacheFormatError(f"{url} is a Zarr node but not an hff-cache (no '{ROOT_KEY}' attribute)")
    raw = attrs[ROOT_KEY]
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if not isinstance(version, int):
        raise CacheFormatError(f"{url}: '{ROOT_KEY}' attribute has no integer format_version")
    if version > FORMAT_VERSION:
        raise CacheFormatError(
            f"{url} uses cache format {version}, newer than this hff-cache reads ({FORMAT_VERSION}); "
            "upgrade hff-cache to read it"
        )
    return CacheMeta.from_dict(raw)


class CacheReader:
    """Committed parts of a cache, as one index of utterances (parts sorted by id, then in part order)."""

    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        self.url = os.fspath(url)
        self.storage_options = storage_options
        try:
            self.store = open_store(self.url, storage_options, read_only=True)
        except FileNotFoundError as e:
            raise CacheFormatError(str(e)) from e
        self.meta: CacheMeta = load_root_meta(self.store, self.url)
        self.codec: Codec = recorded_codec(self.meta.codec.name, self.meta.codec.params)
        self._arrays: dict[tuple[int, int], dict[str, Any]] = {}
        self._load_index()

    def __getstate__(self) -> dict:
        # Opened arrays are a cache; dropping them keeps the reader cheap to send to DataLoader workers.
        state = self.__dict__.copy()
        state["_arrays"] = {}
        return state

    # -- index --

    def _load_index(self) -> None:
        pids = list_part_ids(self.store)
        attrs = read_part_attrs(self.store, pids)
        committed = [(p, a) for p, a in zip(pids, attrs, strict=True) if a and a.get("committed") is True]
        self._part_ids = [p for p, _ in committed]
        self._part_attrs = [a for _, a in committed]

        def load(pid: str) -> dict[str, np.ndarray]:
            return {n: open_array(self.store, f"{PARTS}/{pid}/{n}")[...] for n in INDEX_ARRAYS}

        with ThreadPoolExecutor(max_workers=8) as pool:  # overlap remote requests
            index = list(pool.map(load, self._part_ids))

        self.ids: list[str] = []
        self.texts: list[str] = []
        self.metas: list[dict] = []
        part_of, offsets, lengths, samples = [], [], [], []
        self._parts: list[PartInfo] = []
        self._pos: dict[str, int] = {}
        self.duplicates: list[str] = []
        for pi, (pid, arrs) in enumerate(zip(self._part_ids, index, strict=True)):
            start = len(self.ids)
            for j, uid in enumerate(arrs["ids"].tolist()):
                if uid in self._pos:
                    # Two workers given overlapping input: keep the first copy, report the rest.
                    self.duplicates.append(uid)
                    warnings.warn(f"{self.url}: utterance {uid!r} appears again in part {pid}; "
                                  "using the first copy", stacklevel=2)
                    continue
                self._pos[uid] = len(self.ids)
                self.ids.append(uid)
                self.texts.append(str(arrs["text"][j]))
                self.metas.append(json.loads(str(arrs["meta"][j]) or "{}"))
                part_of.append(pi)
                offsets.append(int(arrs["offsets"][j]))
                lengths.append(int(arrs["lengths"][j]))
                samples.append(int(arrs["num_samples"][j]))
            worker = (parse_part_id(pid) or ("", 0))[0]
            nframes = int(self._part_attrs[pi].get("num_frames", int(arrs["lengths"].sum())))
            self._parts.append(PartInfo(pid, worker, start, len(self.ids), nframes, len(self.ids) - start))
        self._part_starts = [np.asarray(arrs["offsets"], dtype=np.int64) for arrs in index]
        self._fit_of: list[str | None] = [a.get("codec_fit") for a in self._part_attrs]
        self._check_fit_parts()
        self._part_of = np.asarray(part_of, dtype=np.int64)
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self.lengths: np.ndarray = np.asarray(lengths, dtype=np.int64)
        self.num_samples: np.ndarray = np.asarray(samples, dtype=np.int64)

    def _check_fit_parts(self) -> None:
        """A codec with fitted statistics decodes a part with the fit part it names: that one must be there."""
        if not self.codec.fit_suffixes:
            return
        have = set(self._part_ids)
        lost = [(pid, ref) for pid, ref, info in zip(self._part_ids, self._fit_of, self._parts, strict=True)
                if info.num_frames and ref not in have]
        if lost:
            pid, ref = lost[0]
            raise CacheFormatError(
                f"{self.url}: {len(lost)} part(s) cannot be decoded, e.g. part {pid}: its codec fit "
                + (f"is in part {ref}, which is missing or uncommitted" if ref else "is not named")
                + "; delete those parts and rerun the same extract (or transcode) to redo them")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def cache_id(self) -> str:
        return cache_id(self.meta)

    @property
    def layers(self) -> list[int]:
        return list(self.meta.layers)

    def index_of(self, utt_id: str) -> int:
        try:
            return self._pos[utt_id]
        except KeyError:
            raise KeyError(f"utterance {utt_id!r} is not in the feature cache {self.url} "
                           f"({len(self.ids)} utterances)") from None

    def parts(self) -> list[PartInfo]:
        return list(self._parts)

    # -- features --

    def _layer_positions(self, layers: Sequence[int] | None) -> list[int]:
        stored = self.meta.layers
        if layers is None:
            return list(range(len(stored)))
        missing = [k for k in layers if k not in stored]
        if missing:
            raise ValueError(f"hidden-state layer(s) {missing} are not stored in {self.url}; "
                             f"stored layers: {stored}")
        return [stored.index(k) for k in layers]

    def _stored(self, part: int, pos: int) -> dict[str, Any]:
        """What ``codec.decode`` takes for one part and layer: ``layer_kk`` (opened, read by rows), the side
        arrays (read whole), and for the codecs that need them the utterance offsets (``starts``) and the
        arrays of the worker's fit (read once per fit part)."""
        key = (part, pos)
        if key not in self._arrays:
            base = f"{PARTS}/{self._part_ids[part]}"
            k = self.meta.layers[pos]
            arrs: dict[str, Any] = {MAIN: features_array(self.store, f"{base}/{layer_name(k)}")}
            for suffix in self.codec.side_suffixes:
                arrs[suffix] = open_array(self.store, f"{base}/{side_name(suffix, k)}")[...]
            if self.codec.needs_starts:
                arrs["starts"] = self._part_starts[part]
            if self.codec.fit_suffixes:
                arrs.update(self._fit_arrays(self._fit_of[part], k))
            self._arrays[key] = arrs
        return self._arrays[key]

    def _fit_arrays(self, fit_part: str | None, k: int) -> dict[str, np.ndarray]:
        if fit_part is None:  # a part of no frames, written before any fit: never decoded
            return {}
        key = (-1 - self._part_ids.index(fit_part), k)  # negative: never a (part, position) key
        if key not in self._arrays:
            self._arrays[key] = {s: open_array(self.store, f"{PARTS}/{fit_part}/{side_name(s, k)}")[...]
                                 for s in self.codec.fit_suffixes}
        return self._arrays[key]

    def read(self, utt_id: str, layers: Sequence[int] | None = None) -> np.ndarray:
        """Features of one utterance, (T, n_layers, D) float32; ``layers`` are hidden-state indices."""
        return self.read_many([self.index_of(utt_id)], layers)[0]

    def read_many(self, indices: Sequence[int], layers: Sequence[int] | None = None,
                  dtype: Any = np.float32, out: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
        """Features of many utterances by global index, in the order asked, as ``dtype`` arrays (T, L, D)
        (float16 halves the memory and, for fp16 caches, skips every conversion: the training loader's).
        ``out``: arrays (T, L, D) to fill instead, one per index (the loader's rows of its padded batches, so
        the decoded rows are copied once, straight to where the model reads them).

        Per part, nearby utterances are merged into one contiguous frame range per layer (utterances
        closer than a chunk always merge), so every chunk is fetched and decompressed at most once.
        """
        positions = self._layer_positions(layers)
        D = self.meta.encoder.hidden_size
        idx = self._checked(indices)
        shapes = [(int(self.lengths[i]), len(positions), D) for i in idx]
        if out is None:
            out = [np.empty(shape, dtype=dtype) for shape in shapes]
        elif [tuple(o.shape) for o in out] != shapes:
            raise ValueError(f"read_many: out must be one array per index shaped {shapes[:3]}..., not "
                             f"{[tuple(o.shape) for o in out][:3]}...")
        for part, ns in self._by_part(idx).items():
            chunk = int(self._stored(part, positions[0])[MAIN].chunks[0]) if positions else 1
            for run in self._runs(chunk, ns, idx):
                starts = [int(self._offsets[idx[n]]) for n in run]
                stops = [a + int(self.lengths[idx[n]]) for a, n in zip(starts, run, strict=True)]
                for j, first, block in self._decoded(part, positions, slice(starts[0], max(stops)), dtype):
                    last = first + len(block)
                    for n, a, z in zip(run, starts, stops, strict=True):  # the overlap of utterance and piece
                        lo, hi = max(a, first), min(z, last)
                        if lo < hi:
                            out[n][lo - a:hi - a, j, :] = block[lo - first:hi - first]
        return list(out)

    def _decoded(self, part: int, positions: list[int], rows: slice, dtype: Any
                 ) -> Iterator[tuple[int, int, np.ndarray]]:
        """(j, first row, decoded rows from it) of stored layer ``positions[j]`` within ``rows``, for one part: in
        pieces as the codec decodes them (``Codec.decode_pieces``). A chained codec decodes from the first
        stored layer up, each from the one below (in float32, as its encoder predicted)."""
        if not self.codec.chained:
            for j, pos in enumerate(positions):
                for first, block in self.codec.decode_pieces(self._stored(part, pos), rows, dtype=dtype):
                    yield j, first, block
            return
        below = None
        for pos in range(max(positions, default=-1) + 1):
            below = self.codec.decode({**self._stored(part, pos), "below": below}, rows)
            for j in (j for j, p in enumerate(positions) if p == pos):
                yield j, int(rows.start), below.astype(dtype, copy=False)

    def _checked(self, indices: Sequence[int]) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self.ids)):
            raise IndexError(f"utterance index out of range 0..{len(self.ids) - 1} in {self.url}")
        return idx

    def _by_part(self, idx: np.ndarray) -> dict[int, list[int]]:
        """Positions n of ``idx`` by part, each list in frame order."""
        by_part: dict[int, list[int]] = {}
        for n, i in enumerate(idx):
            by_part.setdefault(int(self._part_of[i]), []).append(n)
        for ns in by_part.values():
            ns.sort(key=lambda n: self._offsets[idx[n]])
        return by_part

    def read_codes(self, indices: Sequence[int], layers: Sequence[int] | None = None) -> list[StoredCodes]:
        """The stored arrays of utterances by global index, undecoded: one ``StoredCodes`` per layer (in
        ``layers`` order), utterances in the order asked. Reads like ``read_many`` (one contiguous range per
        run of nearby utterances); ``decode_codes`` (numpy) or a torch decoder (hff_cache/batches) decode it."""
        positions = self._layer_positions(layers)
        idx = self._checked(indices)
        lengths = self.lengths[idx] if len(idx) else np.zeros(0, np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        by_part = self._by_part(idx)
        return [self._layer_codes(pos, idx, by_part, offsets) for pos in positions]

    def _layer_codes(self, pos: int, idx: np.ndarray, by_part: dict[int, list[int]],
                     offsets: np.ndarray) -> StoredCodes:
        frame = (MAIN, *self.codec.frame_suffixes)
        sides = [s for s in self.codec.side_suffixes if s not in frame]
        per_part = sides + list(self.codec.fit_suffixes)
        rows: dict[str, np.ndarray] = {}
        group = np.zeros(len(idx), np.int64)
        keys: list[tuple[str | None, str | None]] = []
        groups: list[dict[str, np.ndarray]] = []
        for part, ns in by_part.items():
            stored = self._stored(part, pos)
            # parts that share every per-part array share a group: all parts of a worker for tpca's fit
            key = (self._part_ids[part] if sides else None, self._fit_of[part] if self.codec.fit_suffixes else None)
            if key not in keys:
                keys.append(key)
                groups.append({s: np.asarray(stored[s]) for s in per_part})
            group[ns] = keys.index(key)
            for run in self._runs(int(stored[MAIN].chunks[0]), ns, idx):
                lo = int(self._offsets[idx[run[0]]])
                hi = max(int(self._offsets[idx[n]] + self.lengths[idx[n]]) for n in run)
                for s in frame:
                    block = np.asarray(stored[s][lo:hi])
                    if s not in rows:
                        rows[s] = np.empty((int(offsets[-1]), *block.shape[1:]), dtype=block.dtype)
                    for n in run:
                        o = int(self._offsets[idx[n]]) - lo
                        rows[s][offsets[n]:offsets[n + 1]] = block[o:o + int(self.lengths[idx[n]])]
        if MAIN not in rows:
            rows[MAIN] = np.zeros((0, *self.codec.row_shape(self.meta.encoder.hidden_size)), self.codec.dtype)
        return StoredCodes(self.meta.layers[pos], rows, np.diff(offsets), group, groups, keys)

    def _runs(self, chunk: int, ns: list[int], idx: np.ndarray) -> list[list[int]]:
        runs: list[list[int]] = []
        end = 0
        for n in ns:
            start = int(self._offsets[idx[n]])
            stop = start + int(self.lengths[idx[n]])
            if runs and start - end < chunk:
                runs[-1].append(n)
                end = max(end, stop)
            else:
                runs.append([n])
                end = stop
        return runs

    # -- statistics and provenance --

    def layer_stats(self, layers: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray] | None:
        """Per-layer mean and std over all frames, (n_layers, D) float32, from the per-part sums."""
        positions = self._layer_positions(layers)
        total = 0
        s = ss = None
        for pi, pid in enumerate(self._part_ids):
            n = self._parts[pi].num_frames
            if n == 0:
                continue
            ps, pss = (open_array(self.store, f"{PARTS}/{pid}/{name}")[...] for name in STATS_ARRAYS)
            s = ps if s is None else s + ps
            ss = pss if ss is None else ss + pss
            total += n
        if total == 0 or s is None or ss is None:
            return None
        mean = s / total
        var = np.maximum(ss / total - mean**2, 0.0)  # float64 sums: cancellation is negligible here
        return mean[positions].astype(np.float32), np.sqrt(var[positions]).astype(np.float32)

    def skipped(self) -> list[dict]:
        """Skip records of all committed parts: {"id", "audio", "reason", "part"}."""
        return [dict(rec, part=pid) for pid, a in zip(self._part_ids, self._part_attrs, strict=True)
                for rec in a.get("skipped", [])]

    def shard_records(self) -> list[dict[str, Any]]:
        """Completion records ``shards/<worker>.json`` of extraction shards (read fresh on every call)."""
        fs = getattr(self.store, "fs", None)
        if fs is not None and hasattr(fs, "invalidate_cache"):
            fs.invalidate_cache()  # records appear while other shards finish

        async def _ls() -> list[str]:
            return [n async for n in self.store.list_dir(SHARDS)]

        try:
            names = sorted(n for n in sync(_ls()) if n.endswith(".json"))
        except (FileNotFoundError, OSError):
            return []
        docs = [read_json(self.store, f"{SHARDS}/{n}") for n in names]
        return [d for d in docs if isinstance(d, dict) and isinstance(d.get("num_shards"), int)]

    def completion(self) -> dict[str, Any]:
        """``complete``: every shard of one extraction (same shard count and intake) recorded completion.

        Records are grouped by (num_shards, dataset fingerprint); the group with most shards done is
        reported. A cache with no records (written before records existed, or still running) is not complete.
        """
        groups: dict[tuple[int, str], set[int]] = {}
        for r in self.shard_records():
            groups.setdefault((r["num_shards"], str(r.get("dataset_fingerprint"))), set()).add(
                int(r["shard_index"]))
        if not groups:
            return {"complete": False, "num_shards": None, "shards_done": 0, "shards_missing": None}
        (n, _), done = max(groups.items(), key=lambda kv: (len(kv[1]) / kv[0][0], len(kv[1])))
        missing = sorted(set(range(n)) - done)
        return {"complete": not missing, "num_shards": n, "shards_done": len(done & set(range(n))),
                "shards_missing": missing}

    def info(self) -> dict[str, Any]:
        e = self.meta.encoder
        frames = int(self.lengths.sum())
        nbytes = store_bytes(self.store)
        n_values = frames * len(self.meta.layers) * e.hidden_size
        return {
            "url": self.url,
            "format_version": self.meta.format_version,
            "cache_id": self.cache_id,
            "model": e.name,
            "model_class": e.model_class,
            "utterances": len(self.ids),
            "frames": frames,
            "audio_seconds": float(self.num_samples.sum()) / e.sample_rate if e.sample_rate else 0.0,
            "layers": list(self.meta.layers),
            "hidden_size": e.hidden_size,
            "frame_rate": e.frame_rate,
            "codec": self.meta.codec.to_dict(),
            "bytes": nbytes,
            "bytes_per_value": nbytes / n_values if n_values else None,
            "parts": len(self._part_ids),
            "skipped": len(self.skipped()),
            "duplicates": len(self.duplicates),
            "tool_version": self.meta.tool_version,
            "batching": self.meta.batching,
            "intake_fingerprints": list(self.meta.intake_fingerprints),
            **self.completion(),
        }
