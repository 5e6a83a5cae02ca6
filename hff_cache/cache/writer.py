"""Write a feature cache: buffer utterances, write each part, commit it last, resume after interruption."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import IO, Any

import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.codecs import ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.errors import ContainsArrayError, ContainsGroupError
from zarr.storage import LocalStore, MemoryStore

from .. import __version__
from .codecs import MAIN, Codec, get_codec, recorded_params
from .format import (
    CHECKSUM_ALGORITHM,
    CHUNK_FRAMES,
    FORMAT_VERSION,
    LOCKS,
    PARTS,
    ROOT_KEY,
    SHARD_FRAMES,
    ZSTD_LEVEL,
    CacheFormatError,
    CacheLockedError,
    CacheMeta,
    CacheMismatchError,
    CacheWriteError,
    CodecSpec,
    array_checksum,
    check_compatible,
    chunk_checksums,
    layer_name,
    now_iso,
    parse_part_id,
    part_id,
    shard_record_key,
    shard_rows,
    side_name,
)
from .reader import list_part_ids, open_array, open_store, read_json, read_part_attrs

try:  # POSIX only; elsewhere local caches go unlocked like remote ones
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

_STR = np.dtypes.StringDType()


class CacheWriter:
    """Appends utterances to a cache as parts owned by one worker.

    Resume: opening an existing cache checks it was made with the same encoder/layers/codec, deletes this
    worker's uncommitted parts, and ``done_ids()`` tells the caller what to skip. Parts of other workers
    are never touched, so several workers may write into one cache at once (distinct ``worker`` labels).
    """

    def __init__(
        self,
        url: str,
        meta: CacheMeta,
        worker: str = "w000",
        part_frames: int = 30_000,
        intake_fingerprint: str | None = None,
        storage_options: dict | None = None,
        chunk_frames: int = CHUNK_FRAMES,
        shard_frames: int = SHARD_FRAMES,
    ) -> None:
        if not worker or "/" in worker or parse_part_id(part_id(worker, 0)) != (worker, 0):
            raise ValueError(f"invalid worker label {worker!r}: use letters, digits, '_' or '-', no '/'")
        if part_frames < 1 or chunk_frames < 1:
            raise ValueError("part_frames and chunk_frames must be positive")
        self.url = os.fspath(url)
        self.worker = worker
        self.part_frames = int(part_frames)
        self.chunk_frames = int(chunk_frames)
        # Resolve codec defaults so the recorded params are complete and compare equal across runs.
        self.codec: Codec = get_codec(meta.codec.name, **meta.codec.params)
        requested = replace(
            meta,
            codec=CodecSpec(self.codec.name, self.codec.params),
            layers=[int(k) for k in meta.layers],
            format_version=FORMAT_VERSION,
            tool_version=__version__,
            created=meta.created or now_iso(),
            intake_fingerprints=list(meta.intake_fingerprints),
            layout={"chunk_frames": self.chunk_frames,
                    "shard_frames": shard_rows(shard_frames, self.chunk_frames)},
        )
        if intake_fingerprint and intake_fingerprint not in requested.intake_fingerprints:
            requested.intake_fingerprints.append(intake_fingerprint)
        self._validate(requested)
        self.store = open_store(self.url, storage_options, read_only=False)
        self.meta = self._open_root(requested, intake_fingerprint)
        # The cache's recorded layout wins over the requested one, so all parts of a cache share one layout
        # (a cache written before layouts were recorded is unsharded).
        self.chunk_frames = int(self.meta.layout.get("chunk_frames", self.chunk_frames))
        self.shard_frames = int(self.meta.layout.get("shard_frames", 0))
        if read_json(self.store, f"{PARTS}/zarr.json") is None:
            with contextlib.suppress(ContainsGroupError):  # another worker may win the race: same content
                zarr.create_group(store=self.store, path=PARTS)  # Zarr v3 has no implicit groups

        self._done: set[str] = set()  # ids with features in committed parts
        self._skipped_done: set[str] = set()
        self._seq = 0
        # A codec with fitted statistics (``codec.fit_suffixes``): the worker's fit, one dict per stored layer,
        # committed once in a part of its own (no utterances) that every later part of the worker names.
        self._fit: list[dict[str, np.ndarray]] | None = None
        self._fit_part: str | None = None
        self._offered_fit: list[dict[str, np.ndarray]] | None = None
        self._writing: str | None = None  # the part being written, removed again if its write fails
        # Lock before the scan: the scan deletes this worker's uncommitted parts, which must not be the
        # in-progress part of a live twin process started with the same worker label.
        self._lock: IO[str] | None = self._acquire_lock()
        try:
            self._scan_parts()
        except BaseException:
            self._release_lock()
            raise
        self._reset_buffer()
        self._pending_skips: list[dict[str, str]] = []
        self._closed = False

    # -- setup --

    def _validate(self, m: CacheMeta) -> None:
        e = m.encoder
        if not m.layers or len(set(m.layers)) != len(m.layers):
            raise ValueError(f"layers must be distinct hidden-state indices (non-empty), got {m.layers}")
        if e.hidden_size <= 0:
            raise ValueError("encoder.hidden_size must be set")
        if e.num_hidden_states and not all(0 <= k < e.num_hidden_states for k in m.layers):
            raise ValueError(f"layers {m.layers} out of range for {e.num_hidden_states} hidden states")
        self.codec.check_dim(e.hidden_size)

    def _open_root(self, requested: CacheMeta, fingerprint: str | None) -> CacheMeta:
        doc = read_json(self.store, "zarr.json")
        if doc is None:
            if self._store_has_keys():
                raise CacheFormatError(
                    f"{self.url} exists and is not empty but holds no feature cache; choose another --out"
                )
            try:
                # Not mode="w": that would wipe a root another worker created a moment ago.
                zarr.create_group(store=self.store, attributes={ROOT_KEY: requested.to_dict()})
                return requested
            except (ContainsGroupError, ContainsArrayError):
                doc = read_json(self.store, "zarr.json") or {}
        attrs = doc.get("attributes", {})
        if ROOT_KEY not in attrs:
            raise CacheFormatError(f"{self.url} is a Zarr group but not an hff-cache; choose another --out")
        raw = attrs[ROOT_KEY]
        existing = CacheMeta.from_dict(raw)
        if existing.format_version > FORMAT_VERSION:
            raise CacheFormatError(f"{self.url} uses cache format {existing.format_version}, newer than this "
                                   f"hff-cache writes ({FORMAT_VERSION}); upgrade hff-cache")
        diffs = check_compatible(as_recorded(existing), requested)
        if diffs:
            raise CacheMismatchError(
                f"the feature cache at {self.url} was written with other settings:\n  "
                + "\n  ".join(diffs)
                + "\nChoose another --out for these settings, or rerun with settings that match the cache."
            )
        if fingerprint and fingerprint not in existing.intake_fingerprints:
            # Read-modify-write of the raw dict keeps keys a newer minor revision may have added.
            raw = dict(raw, intake_fingerprints=[*existing.intake_fingerprints, fingerprint])
            zarr.open_group(store=self.store, mode="r+").attrs[ROOT_KEY] = raw
            existing.intake_fingerprints = list(raw["intake_fingerprints"])
        return existing

    def _acquire_lock(self) -> IO[str] | None:
        """Exclusive ``flock`` on ``.locks/<worker>.lock`` of a local cache, held until close; the OS drops it
        when the process dies, so a crash or SIGKILL never leaves a stale lock. fsspec stores get no lock."""
        if fcntl is None or not isinstance(self.store, LocalStore):
            return None
        path = os.path.join(str(self.store.root), LOCKS, f"{self.worker}.lock")
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            f = open(path, "a+", encoding="utf-8")  # held open (and locked) for the writer's lifetime
        except OSError as e:
            raise CacheWriteError(e.errno, f"cannot create the lock file {path}: {e.strerror}. Committed parts "
                                  "are intact; fix the cause (free space?) and rerun the same command.") from e
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.seek(0)
            holder = f.read().strip() or "unknown process"
            f.close()
            raise CacheLockedError(
                errno.EWOULDBLOCK,
                f"the feature cache {self.url} is being written by another process with worker label "
                f"{self.worker!r} ({holder}). Wait for it to finish, or give this run another shard "
                "(--num-shards/--shard-index) so the two write different parts.") from e
        with contextlib.suppress(OSError):  # who holds it, for the message above; best effort (disk full)
            f.truncate(0)
            f.write(f"pid {os.getpid()} on {socket.gethostname()} since {now_iso()}\n")
            f.flush()
        return f

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the descriptor releases the flock
            self._lock = None

    def _store_has_keys(self) -> bool:
        async def _any() -> bool:
            async for name in self.store.list_dir(""):
                # A root zarr.json whose write was killed leaves only a temp file (zarr.<uuid>.partial):
                # still an empty cache, so rerunning the same command creates it.
                if not name.endswith(".partial"):
                    return True
            return False

        return bool(sync(_any()))

    def _scan_parts(self) -> None:
        pids = list_part_ids(self.store)
        attrs = read_part_attrs(self.store, pids)
        committed = []
        for pid, a in zip(pids, attrs, strict=True):
            worker, seq = parse_part_id(pid)  # type: ignore[misc]
            if a is not None and a.get("committed") is True:
                committed.append(pid)
                self._skipped_done.update(r["id"] for r in a.get("skipped", []))
            elif worker == self.worker:
                # Our own interrupted part: nobody else writes it, so it is safe to remove and redo.
                sync(self.store.delete_dir(f"{PARTS}/{pid}"))
            if worker == self.worker:
                self._seq = max(self._seq, seq + 1)
                if a is not None and a.get("committed") is True and a.get("codec_fit") == pid \
                        and self._fit_part is None:
                    self._fit_part = pid  # this worker's fit, from before the interruption: keep using it
        if self._fit_part is not None and self.codec.fit_suffixes:
            self._fit = [{s: open_array(self.store, f"{PARTS}/{self._fit_part}/{side_name(s, k)}")[...]
                          for s in self.codec.fit_suffixes} for k in self.meta.layers]

        def ids(pid: str) -> list[str]:
            return [str(x) for x in open_array(self.store, f"{PARTS}/{pid}/ids")[...].tolist()]

        with ThreadPoolExecutor(max_workers=8) as pool:
            for got in pool.map(ids, committed):
                self._done.update(got)

    def _reset_buffer(self) -> None:
        n_layers, dim = len(self.meta.layers), self.meta.encoder.hidden_size
        self._feats: list[np.ndarray] = []
        self._ids: list[str] = []
        self._texts: list[str] = []
        self._metas: list[str] = []
        self._samples: list[int] = []
        self._frames = 0
        self._sum = np.zeros((n_layers, dim), np.float64)
        self._sumsq = np.zeros((n_layers, dim), np.float64)

    # -- public API --

    def done_ids(self) -> set[str]:
        """Ids in committed parts of all workers (as of opening, plus own commits) and skipped ids."""
        return self._done | self._skipped_done

    def add(self, utt_id: str, feats: np.ndarray, *, text: str = "", meta: dict | None = None,
            num_samples: int = 0) -> None:
        """Buffer one utterance: ``feats`` is (n_stored_layers, T, D), real frames only."""
        self._check_open()
        if not isinstance(utt_id, str) or not utt_id:
            raise ValueError(f"utterance id must be a non-empty string, got {utt_id!r}")
        if utt_id in self._done or utt_id in self._ids:
            raise ValueError(f"duplicate utterance id {utt_id!r}: it is already in the cache {self.url}")
        if any(r["id"] == utt_id for r in self._pending_skips):
            raise ValueError(f"utterance {utt_id!r} was already recorded as skipped in this run")
        x = np.asarray(feats)
        n_layers, dim = len(self.meta.layers), self.meta.encoder.hidden_size
        if x.ndim != 3 or x.shape[0] != n_layers or x.shape[2] != dim:
            raise ValueError(f"features of {utt_id!r} have shape {x.shape}; expected ({n_layers}, T, {dim}) "
                             f"for layers {self.meta.layers}")
        if x.dtype.kind != "f":
            raise ValueError(f"features of {utt_id!r} must be floating point, got {x.dtype}")
        if x.dtype != np.float16:
            x = x.astype(np.float32, copy=False)
        if x.size:
            if not np.isfinite(x).all():
                raise ValueError(f"features of {utt_id!r} contain NaN or infinity")
            peak = float(np.abs(x).max())
            if peak > self.codec.max_abs:
                raise ValueError(f"features of {utt_id!r} reach {peak:.4g}, beyond what codec "
                                 f"{self.codec.name!r} stores ({self.codec.max_abs:.4g}); use codec int8")
        # Statistics of the features as given (before any codec rounding), accumulated in float64.
        self._sum += x.sum(axis=1, dtype=np.float64)
        self._sumsq += np.square(x, dtype=np.float64).sum(axis=1)
        buf_dtype = np.float16 if x.dtype == np.float16 else self.codec.buffer_dtype
        self._feats.append(np.ascontiguousarray(x, dtype=buf_dtype))
        self._ids.append(utt_id)
        self._texts.append(text or "")
        self._metas.append(json.dumps(meta or {}, ensure_ascii=False, sort_keys=True))
        self._samples.append(int(num_samples))
        self._frames += x.shape[1]
        if self._frames >= self.part_frames:
            self.flush()

    @property
    def codec_fit(self) -> list[dict[str, np.ndarray]] | None:
        """The worker's committed fit (one dict per stored layer), or None (none yet, or the codec has none)."""
        return self._fit

    def offer_codec_fit(self, fits: list[dict[str, np.ndarray]]) -> bool:
        """Use ``fits`` (``codec.fit`` of each stored layer, e.g. from a first pass over all the data) instead
        of fitting on the first part's frames. False when the worker already has a committed fit (a resume):
        that one stays, so all its parts decode with one fit."""
        if len(fits) != len(self.meta.layers):
            raise ValueError(f"one fit per stored layer ({len(self.meta.layers)}) is needed, got {len(fits)}")
        if self._fit is not None:
            return False
        self._offered_fit = [dict(f) for f in fits]
        return True

    def skip(self, utt_id: str, audio: str, reason: str) -> None:
        """Record an input that will not be extracted; it is committed with the next part."""
        self._check_open()
        if utt_id in self._done or utt_id in self._ids:
            raise ValueError(f"cannot skip {utt_id!r}: its features are already in the cache {self.url}")
        self._pending_skips.append({"id": str(utt_id), "audio": str(audio), "reason": str(reason)})

    def flush(self, stats: tuple[np.ndarray, np.ndarray] | None = None) -> str | None:
        """Write and commit the buffered utterances and skip records as one part; returns its id.

        ``stats`` ((L, D) sums and sums of squares) replaces the part's statistics of the buffered values when
        the caller knows better ones: transcode keeps a source part's sums of the encoder output itself, not
        of its decode after the source codec's rounding."""
        self._check_open()
        if not self._ids and not self._pending_skips:
            return None
        if stats is not None:
            self._sum, self._sumsq = (np.asarray(s, dtype=np.float64) for s in stats)
        try:
            if self.codec.fit_suffixes and self._fit is None and self._frames:
                self._write_fit_part()  # before the first part with frames, which names it
            pid = self._writing = part_id(self.worker, self._seq)
            self._seq += 1
            self._write_part(pid)
        except OSError as e:
            pid = self._writing or "(none)"
            try:  # best effort: a half-written part would be removed on resume anyway
                if self._writing:
                    sync(self.store.delete_dir(f"{PARTS}/{pid}"))
            except Exception:  # noqa: BLE001 - the original error is the one to report
                pass
            what = "the disk is full" if e.errno == errno.ENOSPC else f"{type(e).__name__}: {e}"
            msg = (f"writing part {pid} of the feature cache {self.url} failed: {what}. Committed parts are "
                   "intact; free space (or fix the cause) and rerun the same command to resume.")
            # The writer is done: its buffer is redone on resume, and the lock must not outlive it (a later
            # close() would only retry into the same full disk).
            self._closed = True
            self._release_lock()
            raise (CacheWriteError(e.errno, msg) if e.errno is not None else CacheWriteError(msg)) from e
        self._writing = None
        self._done.update(self._ids)
        self._skipped_done.update(r["id"] for r in self._pending_skips)
        self._pending_skips = []
        self._reset_buffer()
        return pid

    def close(self) -> None:
        """Flush what is buffered (and pending skip records). Idempotent."""
        if not self._closed:
            try:
                self.flush()
            finally:  # a failed final flush (disk full) must still free the lock for the rerun
                self._closed = True
                self._release_lock()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            # Leaving on an error discards the buffer: those utterances are redone on resume.
            self._closed = True
            self._release_lock()

    # -- internals --

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"CacheWriter for {self.url} is closed")

    def _write_fit_part(self) -> None:
        """Commit the worker's fit (offered, or fitted on the buffered frames) as a part of no utterances."""
        fits = self._offered_fit
        if fits is None:
            lengths = [f.shape[1] for f in self._feats]
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
            fits = self.codec.fit_layers(lambda j: np.concatenate([f[j] for f in self._feats]).astype(np.float32),
                                         len(self.meta.layers), starts)
        pid = self._writing = part_id(self.worker, self._seq)
        self._seq += 1
        self._write(pid, fits)
        self._fit, self._fit_part, self._offered_fit = fits, pid, None

    def _write_part(self, pid: str) -> None:
        """Write the buffered utterances as part ``pid`` and commit it."""
        self._write(pid, None)

    def _write(self, pid: str, fits: list[dict[str, np.ndarray]] | None) -> None:
        # Protocol: 1. part zarr.json with committed=false, 2. arrays, 3. zarr.json with committed=true.
        # ``fits``: the worker's fit part instead: no utterances, the codec's fitted statistics per layer.
        stage = _Stage(self.store, f"{PARTS}/{pid}", self.shard_frames)
        own = fits is None
        feats = self._feats if own else []
        lengths = np.asarray([f.shape[1] for f in feats], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(lengths) else lengths
        n_layers, dim = len(self.meta.layers), self.meta.encoder.hidden_size
        none = np.zeros((n_layers, dim), np.float64)
        stage.put([
            ("ids", np.asarray(self._ids if own else [], dtype=_STR), None, None),
            ("offsets", offsets, None, None),
            ("lengths", lengths, None, None),
            ("num_samples", np.asarray(self._samples if own else [], dtype=np.int64), None, None),
            ("text", np.asarray(self._texts if own else [], dtype=_STR), None, None),
            ("meta", np.asarray(self._metas if own else [], dtype=_STR), None, None),
            ("stats_sum", self._sum if own else none, None, None),
            ("stats_sumsq", self._sumsq if own else none, None, None),
        ])
        def layer(j: int) -> np.ndarray:  # one layer's frames at a time: all of them could be large
            return np.concatenate([f[j] for f in feats]) if feats else np.zeros((0, dim), self.codec.buffer_dtype)

        use = fits if fits is not None else self._fit  # a part decodes with its worker's fit
        encoded = self.codec.encode_layers(layer, n_layers, offsets, use)
        for j, (k, arrays) in enumerate(zip(self.meta.layers, encoded, strict=True)):
            stage.put(self._layer_arrays(k, arrays, fits[j] if fits else None))
        marker = {
            "committed": True,
            "num_utterances": len(lengths),
            "num_frames": int(lengths.sum()),
            "checksum_algorithm": CHECKSUM_ALGORITHM,
            "checksums": stage.checksums,
            "chunk_checksums": stage.chunk_checksums,
            "skipped": list(self._pending_skips) if own else [],
            "created": now_iso(),
        }
        if fits is not None or self._fit_part is not None:
            marker["codec_fit"] = pid if fits is not None else self._fit_part  # where the fit of this part is
        stage.commit(marker)

    def _layer_arrays(self, k: int, encoded: dict[str, np.ndarray], fit: dict[str, np.ndarray] | None
                      ) -> list[tuple[str, np.ndarray, tuple[int, ...] | None, list[Any] | None]]:
        """(name, data, chunks, compressors) of stored layer ``k``: the codec's arrays (and ``fit``, in a fit
        part)."""
        batch: list[tuple[str, np.ndarray, tuple[int, ...] | None, list[Any] | None]] = []
        for suffix, data in encoded.items():
            if suffix == MAIN:
                batch.append((layer_name(k), data, (self.chunk_frames, *data.shape[1:]), self.codec.compressors()))
            else:
                batch.append((side_name(suffix, k), data, None, None))
        for suffix, data in (fit or {}).items():
            batch.append((side_name(suffix, k), np.asarray(data), None, None))
        return batch


class _Stage:
    """One part's arrays, encoded into an in-memory zarr store and uploaded a batch at a time, with their
    checksums. Uploading keys concurrently beats zarr's create_array on S3 (a dozen round trips of parent
    checks per array; an upload is one per key)."""

    def __init__(self, store: Store, path: str, shard_frames: int = 0) -> None:
        self.store, self.path, self.shard_frames = store, path, shard_frames
        self.mem = MemoryStore()
        self.group = zarr.create_group(store=self.mem, path=path, attributes={"committed": False})
        self.checksums: dict[str, str] = {}
        self.chunk_checksums: dict[str, dict[str, Any]] = {}  # chunked arrays: {"rows": R, "crc32": [...]}
        _upload(self.mem, self.store, [f"{path}/zarr.json"])

    def put(self, items: list[tuple[str, np.ndarray, tuple[int, ...] | None, list[Any] | None]]) -> None:
        for name, data, chunks, compressors in items:
            if chunks:  # per chunk of rows too (inner chunks when sharded): verify locates damage with them
                self.checksums[name], per_chunk = chunk_checksums(data, chunks[0])
                self.chunk_checksums[name] = {"rows": int(chunks[0]), "crc32": per_chunk}
            else:
                self.checksums[name] = array_checksum(data)
            arr = self.group.create_array(
                name, shape=data.shape, dtype=data.dtype,
                chunks=chunks or tuple(max(1, s) for s in data.shape),  # small arrays: one chunk
                shards=self._shards(chunks),
                compressors=compressors if compressors is not None else [ZstdCodec(level=ZSTD_LEVEL)],
            )
            if data.size:
                arr[...] = data
        keys = [k for name, *_ in items for k in _list_prefix(self.mem, f"{self.path}/{name}/")]
        _upload(self.mem, self.store, keys, drop=True)  # drop: keep only one layer staged at a time

    def _shards(self, chunks: tuple[int, ...] | None) -> tuple[int, ...] | None:
        """Shard shape of a chunked (per-frame) array: ``shard_frames`` rows of whole chunks; None: unsharded."""
        if not chunks or not self.shard_frames:
            return None
        return (self.shard_frames, *chunks[1:])

    def commit(self, attrs: dict[str, Any]) -> None:
        self.group.attrs.update(attrs)
        _upload(self.mem, self.store, [f"{self.path}/zarr.json"])  # the commit marker, last


def record_shard_complete(url: str, worker: str, *, num_shards: int, shard_index: int, utterances: int,
                          intake_fingerprint: str, dataset_fingerprint: str,
                          storage_options: dict | None = None, seconds: float | None = None) -> dict[str, Any]:
    """Write ``shards/<worker>.json``: this shard has committed every one of its utterances.

    Call it only after the shard's last part is committed (the record is the shard's own commit marker).
    One PUT / one atomic local write, so a reader sees the whole record or none. ``seconds``: the wall time of
    the extraction run that completed the shard (what a run's training time adds for its cache); None keeps a
    rewritten record's earlier value."""
    store = open_store(url, storage_options, read_only=False)
    if seconds is None:
        earlier = read_json(store, shard_record_key(worker))
        seconds = earlier.get("seconds") if isinstance(earlier, dict) else None
    record = {"worker": worker, "shard_index": int(shard_index), "num_shards": int(num_shards),
              "utterances": int(utterances), "intake_fingerprint": intake_fingerprint,
              "dataset_fingerprint": dataset_fingerprint, "tool_version": __version__, "completed": now_iso()}
    if seconds is not None:
        record["seconds"] = round(float(seconds), 3)
    buf = default_buffer_prototype().buffer.from_bytes(json.dumps(record, indent=1).encode())
    sync(store.set(shard_record_key(worker), buf))
    return record


def clear_shard_record(url: str, worker: str, storage_options: dict | None = None) -> None:
    """Remove a worker's completion record before it writes again, so the cache reads incomplete meanwhile."""
    store = open_store(url, storage_options, read_only=False)
    sync(store.delete(shard_record_key(worker)))  # deleting a missing key is a no-op in zarr stores


def _list_prefix(store: Store, prefix: str) -> list[str]:
    async def _ls() -> list[str]:
        return [k async for k in store.list_prefix(prefix)]

    return sync(_ls())


def _upload(src: Store, dst: Store, keys: list[str], drop: bool = False) -> None:
    """Copy keys from the staging store to the cache, concurrently (zarr's async concurrency limit)."""

    async def _copy(key: str) -> None:
        buf = await src.get(key, prototype=default_buffer_prototype())
        if buf is None:
            raise RuntimeError(f"staged key {key} vanished")
        await dst.set(key, buf)
        if drop:
            await src.delete(key)

    async def _all() -> None:
        # every copy runs to its end before an error is raised: with a plain gather, the copies still in
        # flight when one fails (a full disk) would land after the writer removed the half-written part
        limit = asyncio.Semaphore(int(zarr.config.get("async.concurrency")))

        async def _one(key: str) -> None:
            async with limit:
                await _copy(key)

        results = await asyncio.gather(*(_one(k) for k in keys), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]

    sync(_all())


def as_recorded(meta: CacheMeta) -> CacheMeta:
    """``meta`` with its codec's parameters added since it was written filled in as they behaved then, so
    resuming an older cache with those settings spelled out is not refused as "other settings"."""
    spec = meta.codec
    return replace(meta, codec=CodecSpec(spec.name, recorded_params(spec.name, dict(spec.params))))
