"""Integrity check of a feature cache: the index against the arrays, the commit-time checksums, NaN/Inf.

``verify_cache`` reads every committed part once, in chunk-sized row blocks (memory stays at one chunk per
thread whatever the cache size; in a sharded part one inner chunk, not a whole shard), and reports every
problem it finds instead of stopping at the first one. Damage in a features array is located: the rows
(frames) of the chunks that do not decode, or whose checksum recorded at commit no longer matches, and the
utterances that hold them.
It never writes and takes no lock, so it is safe to run next to a live extraction (parts still being
written are uncommitted and only listed as warnings).
"""

from __future__ import annotations

import json
import time
import warnings
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from zarr.core.sync import sync

from .codecs import Codec, recorded_codec
from .format import (
    CHECKSUM_ALGORITHM,
    INDEX_ARRAYS,
    LOCKS,
    PARTS,
    SHARDS,
    STATS_ARRAYS,
    CacheFormatError,
    CacheMeta,
    array_checksum,
    cache_id,
    crc32_update,
    layer_name,
    parse_part_id,
    side_name,
)
from .reader import (
    CacheReader,
    list_part_ids,
    load_root_meta,
    open_array,
    open_store,
    read_json,
    read_part_attrs,
)


@dataclass
class Problem:
    """One integrity failure. ``kind``: missing | unreadable | checksum | index | shape | nonfinite |
    duplicate | reader."""

    kind: str
    message: str
    part: str | None = None
    array: str | None = None
    # Where in the array, when known: half-open [start, stop) row (frame) ranges, and the utterances they hold.
    rows: list[tuple[int, int]] = field(default_factory=list)
    utterances: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        where = "/".join(x for x in (self.part, self.array) if x)
        return f"{where}: {self.message}" if where else self.message


class ProblemReport:
    """What a verify report (of a cache, or of a run) shares: sound when it lists no problem, and its JSON."""

    problems: list[Any]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)  # type: ignore[call-overload]  (subclasses are dataclasses)
        d["ok"] = self.ok
        d["problems"] = [{**asdict(p), "text": str(p)} for p in self.problems]
        return d


@dataclass
class VerifyReport(ProblemReport):
    url: str
    cache_id: str = ""
    codec: str = ""
    layers: list[int] = field(default_factory=list)
    committed_parts: int = 0
    uncommitted_parts: list[str] = field(default_factory=list)
    utterances: int = 0
    frames: int = 0
    skipped: int = 0
    arrays_checked: int = 0
    values_checked: int = 0  # feature values scanned for NaN/Inf (0 with scan_values=False)
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


def verify_cache(url: str, storage_options: dict | None = None, *, scan_values: bool = True,
                 threads: int = 4, on_part: Callable[[str], None] | None = None) -> VerifyReport:
    """Check every committed part of the cache at ``url``; ``report.ok`` when sound.

    Raises ``CacheFormatError`` only when ``url`` is not a feature cache at all (no readable root); every
    other defect becomes a ``Problem`` in the report.
    """
    start = time.perf_counter()
    try:
        store = open_store(url, storage_options, read_only=True)
    except FileNotFoundError as e:
        raise CacheFormatError(str(e)) from e
    meta = load_root_meta(store, url)
    codec = recorded_codec(meta.codec.name, meta.codec.params)  # unknown codec: CacheFormatError, say so
    rep = VerifyReport(url=str(url), cache_id=cache_id(meta), codec=meta.codec.name, layers=list(meta.layers))
    committed = _committed_parts(store, rep)

    def check(item: tuple[str, dict]) -> _PartResult:
        res = _check_part(store, item[0], item[1], meta, codec, scan_values)
        if on_part is not None:
            on_part(item[0])
        return res

    with ThreadPoolExecutor(max(1, threads)) as pool:
        results = list(pool.map(check, committed))
    _add_results(rep, committed, results)
    if not rep.problems:
        _check_reader(rep, url, storage_options)
    rep.seconds = time.perf_counter() - start
    return rep


def _committed_parts(store: Any, rep: VerifyReport) -> list[tuple[str, dict]]:
    """(part id, commit attributes) of every committed part; the others and stray names become warnings."""
    if read_json(store, f"{PARTS}/zarr.json") is None:
        rep.warnings.append(f"{PARTS}/zarr.json is missing (no part was ever started, or it was deleted)")
    pids = list_part_ids(store)
    _stray_names(store, rep)
    attrs = read_part_attrs(store, pids)
    committed = []
    for pid, a in zip(pids, attrs, strict=True):
        if a is not None and a.get("committed") is True:
            committed.append((pid, a))
        else:
            rep.uncommitted_parts.append(pid)
            rep.warnings.append(f"part {pid} is not committed: being written now, or left by an interrupted run "
                                "(invisible to readers; the next extract of its worker removes and redoes it)")
    rep.committed_parts = len(committed)
    return committed


def _add_results(rep: VerifyReport, committed: list[tuple[str, dict]], results: list[_PartResult]) -> None:
    """Add up the parts' results, in part order; report ids repeated across parts, or both kept and skipped."""
    first_part: dict[str, str] = {}
    skipped_ids: set[str] = set()
    for (pid, a), res in zip(committed, results, strict=True):
        rep.problems.extend(res.problems)
        rep.arrays_checked += res.arrays
        rep.values_checked += res.values
        rep.utterances += len(res.ids)
        rep.frames += res.frames
        again: dict[str, list[str]] = {}  # earlier part -> ids of this part already there
        for uid in dict.fromkeys(res.ids):  # repeats inside one part are reported by _check_index
            if uid in first_part:
                again.setdefault(first_part[uid], []).append(uid)
            else:
                first_part[uid] = pid
        for other, uids in again.items():
            rep.problems.append(Problem("duplicate", f"{len(uids)} utterance id(s) also in part {other}, e.g. "
                                        f"{uids[0]!r} (readers keep the first copy)", pid, "ids"))
        for rec in a.get("skipped") or []:
            skipped_ids.add(str(rec.get("id")) if isinstance(rec, dict) else str(rec))
        rep.skipped += len(a.get("skipped") or [])
    both = sorted(skipped_ids & set(first_part))
    if both:
        rep.warnings.append(f"{len(both)} id(s) have features and a skip record, e.g. {both[0]!r}")


def _check_reader(rep: VerifyReport, url: str, storage_options: dict | None) -> None:
    """End to end: the reader must open what the checks passed (catches gaps in this checker)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            n = len(CacheReader(url, storage_options))
        if n < rep.utterances:  # more is fine: parts committed by a live extraction since the scan
            rep.problems.append(Problem("reader", f"the reader indexes {n} utterances, the parts hold "
                                        f"{rep.utterances}"))
    except Exception as e:  # noqa: BLE001 - any failure to open is the finding
        rep.problems.append(Problem("reader", f"the reader cannot open the cache: {type(e).__name__}: {e}"))


def _stray_names(store: Any, rep: VerifyReport) -> None:
    """Leftovers that are not part of the format: temp files of a killed write, foreign folders."""

    async def _ls(prefix: str) -> list[str]:
        return [n async for n in store.list_dir(prefix)]

    try:
        root = sync(_ls(""))
        parts = sync(_ls(PARTS))
    except Exception:  # noqa: BLE001 - listing is best effort (some object stores refuse it)
        return
    stray = [n for n in root if n.rstrip("/") not in ("zarr.json", PARTS, LOCKS, SHARDS)]
    stray += [f"{PARTS}/{n}" for n in parts if n.rstrip("/") != "zarr.json" and parse_part_id(n.rstrip("/")) is None]
    if stray:
        rep.warnings.append(f"ignored names that are not part of the format (e.g. temp files of a killed "
                            f"write; safe to delete): {', '.join(sorted(stray)[:10])}"
                            + (f" and {len(stray) - 10} more" if len(stray) > 10 else ""))


@dataclass
class _PartResult:
    ids: list[str] = field(default_factory=list)
    frames: int = 0
    arrays: int = 0
    values: int = 0
    problems: list[Problem] = field(default_factory=list)


@dataclass
class _PartCheck:
    """What the checks of one part share: where it is, how to scan it, and what they found so far."""

    store: Any
    pid: str
    codec: Codec
    scan_values: bool
    res: _PartResult = field(default_factory=_PartResult)
    index: dict[str, np.ndarray] = field(default_factory=dict)  # the index arrays, read whole

    def bad(self, kind: str, msg: str, array: str | None = None, rows: list[tuple[int, int]] | None = None
            ) -> None:
        rows = rows or []
        utts = _utts_in(self.index, rows) if rows and array and array.startswith("layer_") else []
        if rows:
            msg += f": {_rows_text(rows)}" + (f" ({_utts_text(utts)})" if utts else "")
        self.res.problems.append(Problem(kind, msg, self.pid, array, rows, utts))


def _check_part(store: Any, pid: str, attrs: dict, meta: CacheMeta, codec: Codec,
                scan_values: bool) -> _PartResult:
    pc = _PartCheck(store, pid, codec, scan_values)
    n_utt, n_frames, sums = _read_marker(attrs, pc.bad)
    per_chunk = attrs.get("chunk_checksums")
    per_chunk = per_chunk if isinstance(per_chunk, dict) else {}  # absent in caches written before it existed
    for name, (shape, dtype) in _expected_arrays(meta, codec, n_utt, n_frames, sums).items():
        arr = _open_expected(pc, name, shape, dtype)
        if arr is not None:
            _check_array(pc, name, arr, sums.get(name), per_chunk.get(name))
    _check_index(pc.index, n_frames, pc.bad)
    if "ids" in pc.index:
        pc.res.ids = [str(x) for x in pc.index["ids"].tolist()]
    pc.res.frames = int(n_frames or 0)
    return pc.res


def _read_marker(attrs: dict, bad: Callable[..., None]) -> tuple[int | None, int | None, dict]:
    """num_utterances, num_frames (None when invalid) and checksums ({} when absent) of a commit marker."""
    n_utt, n_frames = attrs.get("num_utterances"), attrs.get("num_frames")
    if not isinstance(n_utt, int) or not isinstance(n_frames, int) or n_utt < 0 or n_frames < 0:
        bad("index", f"commit marker lacks valid num_utterances/num_frames ({n_utt!r}, {n_frames!r})")
        n_utt = n_frames = None
    sums = attrs.get("checksums")
    if attrs.get("checksum_algorithm", CHECKSUM_ALGORITHM) != CHECKSUM_ALGORITHM or not isinstance(sums, dict):
        bad("checksum", f"commit marker has no {CHECKSUM_ALGORITHM} checksums")
        sums = {}
    return n_utt, n_frames, sums


def _expected_arrays(meta: CacheMeta, codec: Codec, n_utt: int | None, n_frames: int | None, sums: dict
                     ) -> dict[str, tuple[tuple[int, ...] | None, np.dtype | None]]:
    """{array name: (shape, dtype)} a part should hold; None where it cannot be known."""
    D = meta.encoder.hidden_size
    row = codec.row_shape(D)
    expected: dict[str, tuple[tuple[int, ...] | None, np.dtype | None]] = {}
    for name in INDEX_ARRAYS:
        expected[name] = ((n_utt,) if n_utt is not None else None, None)
    for name in STATS_ARRAYS:
        expected[name] = ((len(meta.layers), D), np.dtype("float64"))
    sides = _side_layouts(codec, D)
    for k in meta.layers:
        expected[layer_name(k)] = ((n_frames, *row) if n_frames is not None else None, codec.dtype)
        for suffix, (per_frame, shape, dtype) in sides.items():
            full = (n_frames, *shape) if per_frame else shape
            expected[side_name(suffix, k)] = (full if n_frames is not None or not per_frame else None, dtype)
    for name in sorted(set(sums) - set(expected)):
        expected[name] = (None, None)  # checksummed at commit but unknown here: still check its checksum
    return expected


def _open_expected(pc: _PartCheck, name: str, shape: tuple[int, ...] | None, dtype: np.dtype | None) -> Any:
    """The part's array ``name`` if it opens with the expected shape and dtype, else None (reported)."""
    try:
        arr = open_array(pc.store, f"{PARTS}/{pc.pid}/{name}")
    except Exception as e:  # noqa: BLE001 - missing or unreadable metadata
        missing = isinstance(e, FileNotFoundError)  # zarr's ArrayNotFoundError is one
        pc.bad("missing" if missing else "unreadable", f"array metadata cannot be opened ({type(e).__name__}: "
               f"{e})", name)
        return None
    if shape is not None and tuple(arr.shape) != tuple(shape):
        pc.bad("shape", f"shape {tuple(arr.shape)}, expected {tuple(shape)} from the commit marker and the "
               "cache's layers/hidden size", name)
        return None
    if dtype is not None and np.dtype(arr.dtype) != dtype:
        pc.bad("shape", f"dtype {arr.dtype}, expected {dtype} for codec {pc.codec.name!r}", name)
        return None
    return arr


def _check_array(pc: _PartCheck, name: str, arr: Any, want: str | None, want_chunks: Any = None) -> None:
    """Read the array once: its checksums against the ones recorded at commit, and NaN/Inf values."""
    if want is None:
        pc.bad("checksum", "no checksum was recorded for this array at commit", name)
    pc.res.arrays += 1
    is_layer = name.startswith("layer_")
    chunk_sums = _chunk_sums(want_chunks, arr)
    if want_chunks is not None and chunk_sums is None:
        pc.bad("checksum", "the chunk checksums recorded at commit do not fit the array (rows per chunk and one "
               "crc32 per chunk expected)", name)
    try:
        scan = _scan(arr, pc.scan_values or not is_layer, pc.index if name in INDEX_ARRAYS else None, name,
                     chunk_sums)
    except Exception as e:  # noqa: BLE001 - an array read whole (index, side arrays) that does not decode
        pc.bad("unreadable", f"stored data cannot be read ({type(e).__name__}: {e})", name)
        return
    if scan.unreadable:
        pc.bad("unreadable", f"{sum(hi - lo for lo, hi in scan.unreadable)} row(s) cannot be read "
               f"({scan.error})", name, scan.unreadable)
    if scan.changed or (want is not None and scan.checksum is not None and scan.checksum != want):
        lost = _missing_rows(arr, scan.changed)
        got = scan.checksum or "(not all rows read)"
        msg = (f"{CHECKSUM_ALGORITHM} {got} != {want} recorded at commit: the stored values changed after the "
               "part was committed (corrupt or missing chunk file)")
        if lost:
            msg += f"; stored objects missing (read back as zeros) for {_rows_text(lost)}"
        if scan.changed:
            msg += "; chunks whose values changed"
        pc.bad("checksum", msg, name, scan.changed or lost)
    if is_layer and pc.scan_values:
        pc.res.values += int(np.prod(arr.shape))
    if scan.nonfinite:
        first, count = scan.nonfinite
        who = _utt_at(pc.index, first) if is_layer else ""
        pc.bad("nonfinite", f"{count} NaN/Inf value(s), first at row {first}{who}", name)


def _side_layouts(codec: Codec, dim: int) -> dict[str, tuple[bool, tuple[int, ...], np.dtype]]:
    """{suffix: (has a frame axis, shape without it or whole, dtype)} of a codec's side arrays, learnt by
    encoding one and two frames of zeros, so a codec added later is checked without teaching this file."""
    one, two = (codec.encode(np.zeros((n, dim), np.float32)) for n in (1, 2))
    out = {}
    for suffix in codec.side_suffixes:
        a, b = np.asarray(one[suffix]), np.asarray(two[suffix])
        per_frame = a.ndim >= 1 and b.ndim >= 1 and (a.shape[0], b.shape[0]) == (1, 2)
        out[suffix] = (per_frame, tuple(a.shape[1:]) if per_frame else tuple(a.shape), a.dtype)
    return out


@dataclass
class _Scan:
    checksum: str | None  # of the whole array; None when some rows could not be read
    nonfinite: tuple[int, int] | None = None  # (first row, count) of NaN/Inf values
    unreadable: list[tuple[int, int]] = field(default_factory=list)  # [start, stop) rows that did not decode
    error: str = ""  # the first decode error
    changed: list[tuple[int, int]] = field(default_factory=list)  # rows whose chunk checksum differs


def _scan(arr: Any, check_finite: bool, keep: dict[str, np.ndarray] | None, name: str,
          chunk_sums: tuple[int, list[str]] | None = None) -> _Scan:
    """Checksums of an array (feature arrays read one chunk of rows at a time) and, if asked, the first row
    and count of NaN/Inf values. Index arrays are kept whole in ``keep`` for the index checks.

    A chunked array is read block by block, each block one chunk (an inner chunk of a sharded array: zarr then
    fetches the shard's index and that chunk, never the whole shard), and a block that fails to decode is
    recorded and skipped, so one damaged chunk blames its own rows and the rest of the array is still checked.
    ``chunk_sums`` ((rows, crc32 per block) recorded at commit) locates values that decode but changed."""
    if arr.dtype.kind in "OUT" or keep is not None or arr.ndim == 0 or arr.shape[0] == 0:
        values = arr[...]
        if keep is not None:
            keep[name] = values
        return _Scan(array_checksum(values), _nonfinite(values, 0) if check_finite else None)
    step = chunk_sums[0] if chunk_sums else max(1, int(arr.chunks[0]))
    out = _Scan(None)
    crc: int | None = 0
    first, count = None, 0
    for i, lo in enumerate(range(0, arr.shape[0], step)):
        hi = min(lo + step, arr.shape[0])
        try:
            block = arr[lo:hi]
        except Exception as e:  # noqa: BLE001 - flipped bytes, a truncated object, a shard index that fails its crc32c
            _extend(out.unreadable, lo, hi)
            out.error = out.error or f"{type(e).__name__}: {e}"
            crc = None  # the whole-array checksum cannot be completed; the located problem says why
            continue
        if crc is not None:
            crc = crc32_update(crc, block)
        if chunk_sums and f"{crc32_update(0, block):08x}" != chunk_sums[1][i]:
            _extend(out.changed, lo, hi)
        found = _nonfinite(block, lo) if check_finite else None
        if found:
            first = found[0] if first is None else first
            count += found[1]
    out.checksum = f"{crc:08x}" if crc is not None else None
    out.nonfinite = (first, count) if first is not None else None
    return out


def _extend(ranges: list[tuple[int, int]], lo: int, hi: int) -> None:
    """Append rows [lo, hi) to sorted ranges, merging with the last one when they touch."""
    if ranges and ranges[-1][1] == lo:
        ranges[-1] = (ranges[-1][0], hi)
    else:
        ranges.append((lo, hi))


def _chunk_sums(recorded: Any, arr: Any) -> tuple[int, list[str]] | None:
    """(rows per block, crc32 per block) from a commit marker's ``chunk_checksums`` entry, or None when absent
    or when it does not fit the array (the caller reports that)."""
    if not isinstance(recorded, dict):
        return None
    rows, sums = recorded.get("rows"), recorded.get("crc32")
    if not isinstance(rows, int) or rows < 1 or not isinstance(sums, list) or arr.ndim == 0:
        return None
    if len(sums) != -(-int(arr.shape[0]) // rows):
        return None
    return rows, [str(x) for x in sums]


def _missing_rows(arr: Any, within: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Rows of the array's stored objects (chunks, or shards) that are absent from the store: zarr reads them
    back as zeros (fill value), which is the likeliest cause of a checksum mismatch there. Only objects
    overlapping ``within`` when given. Best effort: [] when the store cannot be listed."""
    if arr.ndim == 0 or arr.shape[0] == 0:
        return []
    rows = int((getattr(arr, "shards", None) or arr.chunks)[0])  # one stored object per shard when sharded
    try:
        prefix = arr.path.rstrip("/") + "/"
        keys = set(sync(_list(arr.store, prefix)))
        lost: list[tuple[int, int]] = []
        for i, lo in enumerate(range(0, arr.shape[0], rows)):
            hi = min(lo + rows, arr.shape[0])
            if within and not any(a < hi and lo < b for a, b in within):
                continue
            key = arr.metadata.encode_chunk_key((i,) + (0,) * (arr.ndim - 1))
            if prefix + key not in keys:
                _extend(lost, lo, hi)
        return lost
    except Exception:  # noqa: BLE001 - listing is a hint only (some object stores refuse it)
        return []


async def _list(store: Any, prefix: str) -> list[str]:
    return [k async for k in store.list_prefix(prefix)]


def _rows_text(rows: list[tuple[int, int]], most: int = 4) -> str:
    text = ", ".join(f"{lo}-{hi - 1}" for lo, hi in rows[:most])
    more = f" and {len(rows) - most} more range(s)" if len(rows) > most else ""
    return f"rows {text}{more}"


def _utts_in(index: dict[str, np.ndarray], rows: list[tuple[int, int]]) -> list[str]:
    """Ids of the utterances whose frames overlap any of the row ranges (empty when the index is unusable)."""
    try:
        offsets, lengths, ids = (np.asarray(index[k]) for k in ("offsets", "lengths", "ids"))
        hit = np.zeros(len(ids), bool)
        for lo, hi in rows:
            hit |= (offsets < hi) & (offsets + lengths > lo)
        return [str(x) for x in ids[hit].tolist()]
    except (KeyError, IndexError, ValueError, TypeError):
        return []


def _utts_text(utts: list[str], most: int = 5) -> str:
    shown = ", ".join(repr(u) for u in utts[:most])
    return f"utterance{'s' if len(utts) > 1 else ''} {shown}" + (f" and {len(utts) - most} more"
                                                               if len(utts) > most else "")


def _nonfinite(values: np.ndarray, row0: int) -> tuple[int, int] | None:
    if values.dtype.kind != "f" or values.size == 0:
        return None
    bad = ~np.isfinite(values)
    if not bad.any():
        return None
    rows = bad.reshape(bad.shape[0], -1).any(axis=1) if bad.ndim else bad.reshape(1)
    return row0 + int(np.argmax(rows)), int(bad.sum())


def _utt_at(index: dict[str, np.ndarray], row: int) -> str:
    try:
        offsets, ids = index["offsets"], index["ids"]
        i = int(np.searchsorted(offsets, row, side="right")) - 1
        return f" (utterance {str(ids[i])!r})" if 0 <= i < len(ids) else ""
    except (KeyError, IndexError, ValueError):
        return ""


def _check_index(index: dict[str, np.ndarray], n_frames: int | None,
                 bad: Callable[..., None]) -> None:
    """ids unique and non-empty, offsets contiguous from 0, lengths summing to the part's frames."""
    ids, offsets, lengths = index.get("ids"), index.get("offsets"), index.get("lengths")
    if ids is not None:
        strs = [str(x) for x in ids.tolist()]
        if any(not s for s in strs):
            bad("index", "an utterance id is empty", "ids")
        dups = sorted(s for s, n in Counter(strs).items() if n > 1)
        if dups:
            bad("duplicate", f"{len(dups)} id(s) appear twice in this part, e.g. {dups[0]!r}", "ids")
    for name in ("offsets", "lengths", "num_samples"):
        a = index.get(name)
        if a is not None and (a.dtype.kind not in "iu"):
            bad("index", f"{name} has dtype {a.dtype}, expected integers", name)
            return
    if lengths is not None:
        if (lengths < 0).any():
            bad("index", f"negative length at utterance {int(np.argmax(lengths < 0))}", "lengths")
        elif n_frames is not None and int(lengths.sum()) != n_frames:
            bad("index", f"lengths sum to {int(lengths.sum())} frames, the commit marker says {n_frames}", "lengths")
    if offsets is not None and lengths is not None and len(offsets) == len(lengths):
        want = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else lengths
        if not np.array_equal(offsets, want):
            i = int(np.argmax(offsets != want))
            bad("index", f"offsets are not contiguous: utterance {i} starts at {int(offsets[i])}, expected "
                f"{int(want[i])} (offsets[i+1] = offsets[i] + lengths[i])", "offsets")
    samples = index.get("num_samples")
    if samples is not None and (samples < 0).any():
        bad("index", "negative num_samples", "num_samples")
    metas = index.get("meta")
    if metas is not None:
        for j, m in enumerate(metas.tolist()):
            try:
                ok = isinstance(json.loads(str(m) or "{}"), dict)
            except ValueError:
                ok = False
            if not ok:
                bad("index", f"meta of utterance {j} is not a JSON object", "meta")
                break


__all__ = ["Problem", "ProblemReport", "VerifyReport", "verify_cache"]
