"""Transcode a feature cache: decode every utterance to float32 and re-encode it with another codec.

Only the codec (and the cache id, which derives from it) changes, and, when asked (``shard_frames``), the
layout: a sharded copy of an unsharded cache (or the reverse) holds the same values in fewer objects.
Kept: the utterance ids in their order, texts, per-utterance metadata and sample counts, skip records, the
encoder info, the stored layers, batching, intake fingerprints, the creation date, the layer statistics, the
chunk size, and the completion record of a complete source.

Each committed source part becomes one destination part with the same utterances, so a destination part's
statistics can be the source part's own sums (of the encoder's output before any codec rounding) and the
layer statistics of both caches are equal. Resumable like ``extract``: the same call again skips the
utterances already committed, and an interrupted part is removed and redone (``CacheWriter``'s resume).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from zarr.abc.store import Store
from zarr.core.sync import sync

from .codecs import CODECS, Codec, get_codec
from .format import (
    CHUNK_FRAMES,
    PARTS,
    STATS_ARRAYS,
    CacheFormatError,
    CacheLockedError,
    CacheMeta,
    CacheMismatchError,
    CodecSpec,
    check_compatible,
    is_url,
)
from .reader import CacheReader, PartInfo, load_root_meta, open_array, open_store
from .verify import verify_cache
from .writer import CacheWriter, as_recorded, clear_shard_record, record_shard_complete

WORKER = "w000"  # one worker: its part ids sort in the order written, which is the source's order
BATCH_UTTS = 32  # utterances decoded per read_many call
SAMPLE_UTTS = 16  # utterances compared with the source after the transcode
FIT_FRAMES = 60_000  # frames (20 min at 50 Hz) of SRC, spread over it, that a codec with a fit is fitted on

Progress = Callable[[int, int], None]  # (utterances done, including those committed before; total)


@dataclass
class _Counts:
    already_done: int = 0
    transcoded: int = 0
    parts_restat: int = 0  # parts whose statistics are of the decoded values (not a whole source part)


@dataclass
class _Check:
    rel_error: float | None = None
    per_layer: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def transcode_cache(src: str | os.PathLike[str], dst: str | os.PathLike[str], codec: str, *,
                    codec_params: dict[str, Any] | None = None, storage_options: dict | None = None,
                    progress: Progress | None = None, shard_frames: int | None = None) -> dict[str, Any]:
    """Write the cache at ``src`` anew at ``dst`` with ``codec`` (a name of ``CODECS``; ``codec_params`` as
    recorded in a cache's ``codec.params``, defaults filled in). Resumable: rerun the same call after an
    interruption. Verifies ``dst`` at the end; the summary's ``ok`` is false (and ``problems`` say why) when
    the check or the sample comparison with the source fails. ``shard_frames``: frames per shard object of
    DST's features arrays (0: unsharded; None: SRC's layout). A DST being resumed keeps its recorded layout.

    Raises ``ValueError`` for an unknown codec or bad parameters, or ``dst`` equal to ``src``;
    ``CacheFormatError`` when ``src`` is not a feature cache or ``dst`` exists and is not one;
    ``CacheMismatchError`` when ``dst`` is a cache of another source or codec.
    """
    start = time.perf_counter()
    src, dst = str(os.fspath(src)), str(os.fspath(dst))
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
    _check_paths(src, dst, storage_options)
    src_opts, dst_opts = _options(src, storage_options), _options(dst, storage_options)
    try:
        source = CacheReader(src, src_opts)
    except CacheFormatError as e:
        raise CacheFormatError(f"SRC: {e}") from e
    target = replace(source.meta, codec=_target_spec(source, codec, codec_params or {}))
    _check_dst(dst, dst_opts, target, source)
    layout = source.meta.layout
    shards = int(layout.get("shard_frames", 0)) if shard_frames is None else shard_frames
    try:
        # part_frames 2**62: a part is committed when a source part ends (_copy_parts), never by size
        writer = CacheWriter(dst, target, worker=WORKER, part_frames=2**62, storage_options=dst_opts,
                             chunk_frames=int(layout.get("chunk_frames", CHUNK_FRAMES)), shard_frames=shards)
    except CacheLockedError as e:
        raise CacheLockedError(e.errno, f"another process is writing {dst} (a transcode or an extract into it); "
                               "wait for it to finish, then rerun the same command") from e
    with writer:  # an error discards the part being buffered: it is redone on resume
        if not set(source.ids) <= writer.done_ids():  # work to do: DST is incomplete until it is done again
            clear_shard_record(dst, WORKER, storage_options=dst_opts)
            if writer.codec.fit_suffixes and writer.codec_fit is None:
                writer.offer_codec_fit(_first_pass_fit(source, writer.codec))
        counts = _copy_parts(source, writer, progress)
    complete = _record_completion(source, dst, dst_opts)
    check, out = _check_result(source, dst, dst_opts, target.codec.name)
    return _summary(source, out, counts, check, complete, time.perf_counter() - start)


def _options(url: str, storage_options: dict | None) -> dict | None:
    return storage_options if is_url(url) else None  # a local SRC or DST beside a remote one takes none


def _check_paths(src: str, dst: str, storage_options: dict | None) -> None:
    """DST must not be SRC (nor inside it: the source would gain names that are not part of its format)."""
    if is_url(src) or is_url(dst):
        a, b, sep = src.rstrip("/"), dst.rstrip("/"), "/"
    else:
        if storage_options:
            raise ValueError("storage_options apply only to URLs; SRC and DST are local paths")
        a, b, sep = os.path.realpath(src), os.path.realpath(dst), os.sep
    if a == b or b.startswith(a + sep):
        raise ValueError(f"DST {dst} is {'SRC' if a == b else 'inside SRC'} ({src}); transcoding writes a new "
                         "cache: choose another DST")


def _target_spec(source: CacheReader, name: str, params: dict[str, Any]) -> CodecSpec:
    """The complete spec (defaults filled in) of the target codec, once it is known to fit the features."""
    try:
        codec: Codec = get_codec(name, **params)
    except CacheFormatError as e:  # bad parameter names: an input error like an unknown codec
        raise ValueError(str(e)) from e
    dim = source.meta.encoder.hidden_size
    try:
        codec.check_dim(dim)
    except ValueError as e:
        raise ValueError(f"cannot transcode {source.url} (hidden size {dim}) to {name}: {e}") from e
    return CodecSpec(codec.name, codec.params)


def _check_dst(dst: str, opts: dict | None, target: CacheMeta, source: CacheReader) -> None:
    """Refuse a DST that holds anything but (a part of) this very transcode; a new or empty DST passes."""
    if not is_url(dst) and os.path.exists(dst) and not os.path.isdir(dst):
        raise CacheFormatError(f"DST {dst} is a file, not a cache folder; choose another DST")
    try:
        store = open_store(dst, opts, read_only=True)
        existing = load_root_meta(store, dst)
    except FileNotFoundError:
        return
    except CacheFormatError as e:
        if _is_empty(store):
            return
        raise CacheFormatError(f"DST {dst} exists and is not a feature cache this hff-cache writes ({e}); "
                               "choose another DST, or delete it") from None
    diffs = check_compatible(as_recorded(existing), target)
    if diffs:
        raise CacheMismatchError(f"DST {dst} is a feature cache with other settings ({'; '.join(diffs)}); "
                                 "choose another DST, or delete it to transcode into it anew")
    done = CacheReader(dst, opts)
    source_ids = set(source.ids) | {r["id"] for r in source.skipped()}
    foreign = [u for u in [*done.ids, *(r["id"] for r in done.skipped())] if u not in source_ids]
    other_date = bool(source.meta.created) and existing.created != source.meta.created
    if foreign or other_date or not set(existing.intake_fingerprints) <= set(source.meta.intake_fingerprints):
        why = (f"e.g. utterance {foreign[0]!r} is not in SRC" if foreign else
               f"created {existing.created}, SRC {source.meta.created}" if other_date else
               "its intake fingerprints are not SRC's")
        raise CacheMismatchError(f"DST {dst} holds a cache made from another source than {source.url} ({why}); "
                                 "choose another DST, or delete it to transcode into it anew")


def _is_empty(store: Store) -> bool:
    async def _empty() -> bool:
        async for name in store.list_dir(""):
            if not name.endswith(".partial"):  # the temp file of a killed root write: still empty
                return False
        return True

    return bool(sync(_empty()))


def _copy_parts(source: CacheReader, writer: CacheWriter, progress: Progress | None) -> _Counts:
    """Copy every source part not yet committed in DST as one DST part, in the source's order."""
    done = writer.done_ids()
    skips = _skip_records(source)
    counts = _Counts(already_done=sum(u in done for u in source.ids))
    handled = counts.already_done
    if progress is not None:
        progress(handled, len(source))
    for part in source.parts():
        todo = [i for i in range(part.start, part.stop) if source.ids[i] not in done]
        part_skips = [r for r in skips.get(part.part_id, []) if r["id"] not in done]
        if not todo and not part_skips:
            continue
        for lo in range(0, len(todo), BATCH_UTTS):
            batch = todo[lo:lo + BATCH_UTTS]
            for i, feats in zip(batch, source.read_many(batch), strict=True):
                writer.add(source.ids[i], feats.transpose(1, 0, 2), text=source.texts[i], meta=source.metas[i],
                           num_samples=int(source.num_samples[i]))
            handled += len(batch)
            if progress is not None:
                progress(handled, len(source))
        for r in part_skips:
            writer.skip(r["id"], r["audio"], r["reason"])
        whole = _is_whole(source, part, todo)
        writer.flush(_part_stats(source, part) if whole else None)
        counts.transcoded += len(todo)
        counts.parts_restat += bool(todo) and not whole
    return counts


def _first_pass_fit(source: CacheReader, codec: Codec, frames: int = FIT_FRAMES) -> list[dict[str, Any]]:
    """The codec's fit of each stored layer on about ``frames`` frames of whole utterances spread evenly over
    SRC: a first pass, so the fit sees every part of the source rather than only its first part."""
    total = int(source.lengths.sum())
    n = len(source) if total <= frames else max(1, int(np.ceil(len(source) * frames / total)))
    idx = sorted({int(round(i)) for i in np.linspace(0, len(source) - 1, n)}) if len(source) else []
    starts = np.concatenate([[0], np.cumsum(source.lengths[idx])[:-1]]).astype(np.int64)
    def layer(j: int) -> np.ndarray:  # one layer at a time: a sample of all of them could be large
        k = source.layers[j]
        return np.concatenate([f[:, 0] for f in source.read_many(idx, [k])]) if idx else np.zeros((0, 1))

    return codec.fit_layers(layer, len(source.layers), starts)


def _skip_records(source: CacheReader) -> dict[str, list[dict[str, str]]]:
    """Skip records by source part: the first of each id, and none for an id that has features (the writer
    refuses both, and the features are what a reader of the source sees)."""
    have = set(source.ids)
    seen: set[str] = set()
    out: dict[str, list[dict[str, str]]] = {}
    for r in source.skipped():
        uid = str(r["id"])
        if uid not in have and uid not in seen:
            seen.add(uid)
            out.setdefault(r["part"], []).append({"id": uid, "audio": str(r.get("audio", "")),
                                                  "reason": str(r.get("reason", ""))})
    return out


def _is_whole(source: CacheReader, part: PartInfo, todo: Sequence[int]) -> bool:
    """Every frame of the source part goes into this DST part: its statistics are then the part's own.
    Not so for a part resumed midway, or one holding copies of ids that an earlier part has (the reader
    drops those)."""
    frames = int(source.lengths[part.start:part.stop].sum())
    return len(todo) == part.stop - part.start and frames == part.num_frames


def _part_stats(source: CacheReader, part: PartInfo) -> tuple[np.ndarray, np.ndarray]:
    s, ss = (open_array(source.store, f"{PARTS}/{part.part_id}/{name}")[...] for name in STATS_ARRAYS)
    return s, ss


def _record_completion(source: CacheReader, dst: str, opts: dict | None) -> bool:
    """A complete source (every extraction shard recorded) makes a complete DST: one record of its one worker,
    written only now that every part is committed (the record is the copy's own commit marker)."""
    groups: dict[tuple[int, str], set[int]] = {}
    for r in source.shard_records():
        groups.setdefault((r["num_shards"], str(r.get("dataset_fingerprint"))), set()).add(int(r["shard_index"]))
    fingerprint = next((fp for (n, fp), done in groups.items() if done >= set(range(n))), None)
    if fingerprint is None:
        return False
    record_shard_complete(dst, WORKER, num_shards=1, shard_index=0, utterances=len(source),
                          intake_fingerprint=fingerprint, dataset_fingerprint=fingerprint, storage_options=opts)
    return True


def _check_result(source: CacheReader, dst: str, opts: dict | None, codec: str) -> tuple[_Check, CacheReader]:
    """verify_cache on DST, every source utterance present, and a sample's error against the source."""
    check = _Check()
    rep = verify_cache(dst, opts)
    check.problems += [f"verify: {p.kind}: {p}" for p in rep.problems]
    check.warnings += rep.warnings
    out = CacheReader(dst, opts)
    have = set(out.ids)
    missing = [u for u in source.ids if u not in have]
    if missing:
        check.problems.append(f"{len(missing)} utterance(s) of SRC are not in DST, e.g. {missing[0]!r}")
    check.per_layer = _sample_error(source, out)
    if check.per_layer:
        check.rel_error = max(check.per_layer)
        # the sample check: the destination's decode against the source's, within the codec's own limit
        tol = out.codec.transcode_tolerance
        if not check.rel_error <= tol:
            check.problems.append(f"decoded values differ from SRC's by a relative error of {check.rel_error:.3g}, "
                                  f"beyond {tol:g} for codec {codec}")
    return check, out


def _sample_error(source: CacheReader, out: CacheReader, n: int = SAMPLE_UTTS) -> list[float]:
    """Per layer ||dst - src|| / ||src|| over up to ``n`` utterances spread over the cache ([] if empty)."""
    spread = sorted({int(round(x)) for x in np.linspace(0, len(source) - 1, n)}) if len(source) else []
    have = set(out.ids)
    ids = [source.ids[i] for i in spread if source.ids[i] in have]
    if not ids:
        return []
    a = np.concatenate(source.read_many([source.index_of(u) for u in ids]), axis=0)
    b = np.concatenate(out.read_many([out.index_of(u) for u in ids]), axis=0)
    errors = []
    for j in range(a.shape[1]):
        num = float(np.square(b[:, j] - a[:, j], dtype=np.float64).sum())
        den = float(np.square(a[:, j], dtype=np.float64).sum())
        errors.append(float(np.sqrt(num / den)) if den > 0 else (0.0 if num == 0 else float("inf")))
    return errors


def _summary(source: CacheReader, out: CacheReader, counts: _Counts, check: _Check, complete: bool,
             seconds: float) -> dict[str, Any]:
    a, b = source.info(), out.info()
    stats = (f"recomputed from the decoded values for {counts.parts_restat} part(s)" if counts.parts_restat
             else "kept")
    return {
        "src": source.url, "dst": out.url,
        "src_codec": a["codec"], "codec": b["codec"], "src_cache_id": a["cache_id"], "cache_id": b["cache_id"],
        "utterances": b["utterances"], "transcoded": counts.transcoded, "already_done": counts.already_done,
        "skip_records": b["skipped"], "frames": b["frames"], "layers": b["layers"],
        "src_bytes": a["bytes"], "dst_bytes": b["bytes"],
        "src_bytes_per_value": a["bytes_per_value"], "dst_bytes_per_value": b["bytes_per_value"],
        "rel_error": check.rel_error, "rel_error_per_layer": check.per_layer,
        "rel_tolerance": out.codec.transcode_tolerance,
        "stats": stats, "complete": complete,
        "ok": not check.problems, "problems": check.problems, "warnings": check.warnings,
        "seconds": seconds,
    }


__all__ = ["transcode_cache"]
