"""Sharded parts (zarr's sharding codec): a sharded cache holds the values of the unsharded one in fewer objects,
for every codec; it verifies, resumes after an interruption, and caches without a recorded layout still read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from hff_cache.cache import CODECS, CacheReader, CacheWriter, get_codec, transcode_cache, verify_cache
from hff_cache.cache.codecs import MAIN
from hff_cache.cache.reader import decode_codes
from hff_cache.cache.rows import ShardedRows
from hff_cache.testing import as_older_cache, tiny_cache

CHUNK = 32  # small chunks, so that the tiny cache's parts span several of them
SHARD = 100  # rounded up to whole chunks: 128 frames a shard


def _params(name: str) -> dict:
    """The tiny encoders' hidden size is 32: block codecs need a block dividing it (default 64)."""
    return {"block": 16} if "block" in get_codec(name).params else {}


def _chunk_files(cache: str | Path) -> int:
    """Stored objects of the features arrays: files under parts/*/layer_*/c/."""
    return sum(1 for p in Path(cache).glob("parts/*/layer_*/c/**/*") if p.is_file())


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An unsharded fp16 cache of small chunks and two parts (the tiny cache's values, rewritten)."""
    root = tmp_path_factory.mktemp("shard_src")
    tiny = CacheReader(str(tiny_cache(root / "tiny")))
    out = str(root / "src.zarr")
    with CacheWriter(out, tiny.meta, chunk_frames=CHUNK, part_frames=200) as w:
        for i, x in enumerate(tiny.read_many(range(len(tiny)))):
            w.add(tiny.ids[i], x.transpose(1, 0, 2), text=tiny.texts[i], meta=tiny.metas[i],
                  num_samples=int(tiny.num_samples[i]))
    return out


@pytest.mark.parametrize("name", list(CODECS))
def test_sharded_equals_unsharded_for_every_codec(src: str, tmp_path: Path, name: str) -> None:
    flat = transcode_cache(src, str(tmp_path / "flat.zarr"), name, codec_params=_params(name))
    sharded = transcode_cache(src, str(tmp_path / "sharded.zarr"), name, codec_params=_params(name),
                              shard_frames=SHARD)
    assert flat["ok"] and sharded["ok"], sharded["problems"]
    a, b = CacheReader(flat["dst"]), CacheReader(sharded["dst"])
    assert b.meta.layout == {"chunk_frames": CHUNK, "shard_frames": 128}
    assert a.meta.layout == {"chunk_frames": CHUNK, "shard_frames": 0}
    assert a.cache_id == b.cache_id  # the layout is not identity: the values are the same
    assert b.ids == a.ids and b.layer_stats() is not None
    for x, y in zip(a.read_many(range(len(a))), b.read_many(range(len(b))), strict=True):
        np.testing.assert_array_equal(y, x)
    picks = [4, 0, 2]
    below_a = below_b = None  # a chained codec's layer decodes from the layer below it
    for ca, cb in zip(a.read_codes(picks), b.read_codes(picks), strict=True):
        below_a, below_b = decode_codes(a.codec, ca, below=below_a), decode_codes(b.codec, cb, below=below_b)
        np.testing.assert_array_equal(below_b, below_a)
        for key, arr in ca.rows.items():
            np.testing.assert_array_equal(cb.rows[key], arr)
    assert verify_cache(sharded["dst"]).ok
    assert _chunk_files(b.url) < _chunk_files(a.url) / 2


def test_extract_writes_sharded_parts(tmp_path: Path) -> None:
    plain = tiny_cache(tmp_path / "plain")
    r = CacheReader(str(plain))
    out = str(tmp_path / "sharded.zarr")
    with CacheWriter(out, r.meta, chunk_frames=CHUNK, shard_frames=SHARD) as w:
        for i, x in enumerate(r.read_many(range(len(r)))):
            w.add(r.ids[i], x.transpose(1, 0, 2))
    arr = zarr.open_array(store=out, path=f"parts/{CacheReader(out).parts()[0].part_id}/layer_00", mode="r")
    assert arr.shards == (128, 32) and arr.chunks == (CHUNK, 32)
    for x, y in zip(r.read_many(range(len(r))), CacheReader(out).read_many(range(len(r))), strict=True):
        np.testing.assert_array_equal(y, x)


def test_a_cache_without_a_recorded_layout_reads_and_keeps_it(src: str, tmp_path: Path) -> None:
    """Caches written before layouts were recorded: no `layout` key, unsharded; a writer resuming one keeps
    its parts unsharded whatever it is asked."""
    old = tmp_path / "old.zarr"
    transcode_cache(src, str(old), "int8")
    as_older_cache(old, drop=("layout",))
    r = CacheReader(str(old))
    assert r.meta.layout == {} and len(r.read_many(range(len(r)))) == len(r)
    with CacheWriter(str(old), r.meta, shard_frames=SHARD) as w:
        assert w.shard_frames == 0
        w.add("extra", np.zeros((len(r.layers), 5, r.meta.encoder.hidden_size), np.float32))
    assert "layout" not in zarr.open_group(store=str(old), mode="r").attrs["hff_cache"]
    assert CacheReader(str(old)).read("extra").shape == (5, len(r.layers), r.meta.encoder.hidden_size)


def test_interrupted_sharded_transcode_resumes(src: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    full = transcode_cache(src, str(tmp_path / "full.zarr"), "int4", shard_frames=SHARD)
    dst = str(tmp_path / "resumed.zarr")
    calls = {"n": 0}
    write = CacheWriter._write_part

    def dying_write(self: CacheWriter, pid: str) -> None:  # dies after its first part's arrays, uncommitted
        calls["n"] += 1
        write(self, pid)
        if calls["n"] == 2:
            zarr.open_group(store=self.store, path=f"parts/{pid}", mode="r+").attrs["committed"] = False
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(CacheWriter, "_write_part", dying_write)
        with pytest.raises(KeyboardInterrupt):
            transcode_cache(src, dst, "int4", shard_frames=SHARD)
    partial = CacheReader(dst)
    assert 0 < len(partial) < len(CacheReader(src))
    resumed = transcode_cache(src, dst, "int4")  # the layout recorded at creation wins: still sharded
    assert resumed["ok"], resumed["problems"]
    a, b = CacheReader(full["dst"]), CacheReader(dst)
    assert b.meta.layout == a.meta.layout and b.meta.layout["shard_frames"] == 128
    for x, y in zip(a.read_many(range(len(a))), b.read_many(range(len(b))), strict=True):
        np.testing.assert_array_equal(y, x)
    assert _chunk_files(dst) == _chunk_files(full["dst"])


def test_sharded_rows_equal_zarrs_reads(src: str, tmp_path: Path) -> None:
    """The reader's two-GET shard reads return zarr's values for any row range: within a shard, across
    shards, the partial last shard, empty and stepped slices."""
    out = transcode_cache(src, str(tmp_path / "s.zarr"), "int8", shard_frames=SHARD)["dst"]
    r = CacheReader(out)
    rows = r._stored(0, 0)[MAIN]
    assert isinstance(rows, ShardedRows)
    n = int(rows.shape[0])
    for sl in [slice(0, n), slice(5, 40), slice(100, 140), slice(127, 129), slice(n - 3, n), slice(7, 7),
               slice(0, n, 3)]:
        np.testing.assert_array_equal(rows[sl], rows.arr[sl])


def test_extract_and_transcode_take_shard_frames_from_the_cli(src: str, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from hff_cache.cli import app

    manifest = Path(src).parent / "tiny" / "audio" / "manifest.jsonl"
    out = tmp_path / "extracted.zarr"
    res = CliRunner().invoke(app, ["extract", "--model", "tiny-random:wav2vec2", "--data", str(manifest), "--out",
                                   str(out), "--shard-frames", "4096", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert CacheReader(str(out)).meta.layout["shard_frames"] == 4096
    copy = tmp_path / "copy.zarr"
    res = CliRunner().invoke(app, ["transcode", src, str(copy), "--codec", "int8", "--shard-frames", "2048",
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    assert CacheReader(str(copy)).meta.layout["shard_frames"] == 2048


# --- verify on sharded parts: damage is found and located as precisely as in unsharded parts --------------

DMG_CHUNK, DMG_SHARD = 16, 64  # 4 inner chunks a shard, and parts of several shards (the last one partial)
DMG_LENGTHS = [17, 9, 23, 30, 11, 26, 14, 19, 8, 28, 21, 12]  # short utterances: a chunk holds one or two


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same fp16 values as an unsharded ("flat") and a sharded cache: pristine, tests damage copies."""
    from hff_cache.cache import CacheMeta, CodecSpec, EncoderInfo

    root = tmp_path_factory.mktemp("shard_damage")
    enc = EncoderInfo(name="test", model_class="X", sample_rate=16000, frame_rate=50.0, hidden_size=32,
                      num_hidden_states=2)
    meta = CacheMeta(encoder=enc, layers=[0, 1], codec=CodecSpec("fp16"))
    rng = np.random.default_rng(0)
    feats = [rng.normal(size=(2, n, 32)).astype(np.float32) for n in DMG_LENGTHS]
    out = {}
    for name, shard in (("flat", 0), ("sharded", DMG_SHARD)):
        out[name] = root / f"{name}.zarr"
        with CacheWriter(str(out[name]), meta, part_frames=150, chunk_frames=DMG_CHUNK, shard_frames=shard) as w:
            for i, x in enumerate(feats):
                w.add(f"u{i:02d}", x)
    return out


def _damaged(layouts: dict[str, Path], name: str, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of one of the pristine caches, and its first part (3 shards a layer when sharded)."""
    import shutil

    dst = tmp_path / name
    shutil.copytree(layouts[name], dst)
    part = sorted((dst / "parts").glob("w*-*"))[0]
    assert zarr.open_array(str(part / "layer_01")).shape[0] > 2 * DMG_SHARD
    return dst, part


def _owners(part: Path, rows: list[tuple[int, int]]) -> list[str]:
    """Ids of the part's utterances with frames in any of the row ranges, from its index (not verify's)."""
    offsets, lengths, ids = (zarr.open_array(str(part / n))[...] for n in ("offsets", "lengths", "ids"))
    return [str(u) for u, o, n in zip(ids.tolist(), offsets, lengths, strict=True)
            if any(o < hi and o + n > lo for lo, hi in rows)]


def _inner_span(shard: Path, k: int) -> tuple[int, int]:
    """(offset, length) of inner chunk k in a shard object: zarr's default index at the end, uint64 pairs then a
    crc32c."""
    n = DMG_SHARD // DMG_CHUNK
    index = np.frombuffer(shard.read_bytes()[-(16 * n + 4):-4], "<u8").reshape(n, 2)
    return int(index[k, 0]), int(index[k, 1])


def _flip(path: Path, at: int, n: int = 8) -> None:
    data = bytearray(path.read_bytes())
    for i in range(at, at + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _located(root: Path, array: str = "layer_01") -> list:
    rep = verify_cache(str(root))
    assert not rep.ok
    assert {p.array for p in rep.problems} == {array}, [str(p) for p in rep.problems]  # nothing else blamed
    return rep.problems


def test_sharded_and_unsharded_parts_record_the_same_checksums(layouts: dict[str, Path]) -> None:
    """Checksums are of the stored values, not of objects: a shard object and the chunk files it replaces have
    the same whole-array and per-chunk checksums (per inner chunk), so verify judges both layouts alike."""
    for flat, sharded in zip(*(sorted((layouts[n] / "parts").glob("w*-*")) for n in ("flat", "sharded")),
                             strict=True):
        a, b = (zarr.open_group(str(p), mode="r").attrs for p in (flat, sharded))
        assert a["checksums"] == b["checksums"] and a["chunk_checksums"] == b["chunk_checksums"]
        assert set(b["chunk_checksums"]) == {"layer_00", "layer_01"}  # the chunked arrays
        assert b["chunk_checksums"]["layer_01"]["rows"] == DMG_CHUNK
    assert zarr.open_array(str(sorted((layouts["sharded"] / "parts").glob("w*-*"))[0] / "layer_01")).shards \
        == (DMG_SHARD, 32)
    assert verify_cache(str(layouts["sharded"])).ok and verify_cache(str(layouts["flat"])).ok


def test_verify_reads_a_sharded_part_one_inner_chunk_at_a_time(layouts: dict[str, Path],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Bounded memory: verify asks for byte ranges of a shard (its index, then one inner chunk), never for a
    whole shard object, and every inner chunk is read."""
    from zarr.storage import LocalStore

    real_get = LocalStore.get
    gets: list[tuple[str, object]] = []

    async def spy(self, key, prototype=None, byte_range=None):  # noqa: ANN001, ANN202
        if "/layer_" in key and "/c/" in key:
            gets.append((key, byte_range))
        return await real_get(self, key, prototype, byte_range)

    monkeypatch.setattr(LocalStore, "get", spy)
    rep = verify_cache(str(layouts["sharded"]), threads=1)
    assert rep.ok
    assert gets and all(r is not None for _, r in gets), [k for k, r in gets if r is None]
    chunks = sum(-(-int(zarr.open_array(str(p / n)).shape[0]) // DMG_CHUNK)
                 for p in (layouts["sharded"] / "parts").glob("w*-*") for n in ("layer_00", "layer_01"))
    ranged = [r for _, r in gets if type(r).__name__ == "RangeByteRequest"]
    assert len(ranged) == chunks  # one ranged read per inner chunk: each decoded on its own
    assert max(r.end - r.start for r in ranged) < DMG_CHUNK * 32 * 2 + 64  # one inner chunk's bytes at most


@pytest.mark.parametrize("damage", ["flipped header", "flipped bytes", "rewritten values"])
def test_a_damaged_inner_chunk_blames_only_its_rows(layouts: dict[str, Path], tmp_path: Path, damage: str) -> None:
    """One damaged inner chunk (rows 96-111 of shard 1): verify names those rows and their utterances, exactly
    as it does for the same chunk of the unsharded cache, not the whole shard's (rows 64-127)."""
    lo, hi = 96, 112
    # Flipped bytes in the zstd frame header never decode; in the middle of the frame they may fail zstd or
    # decode to other values (then the chunk's checksum recorded at commit catches them); rewritten values
    # decode fine and only the per-chunk checksum can say where.
    kinds = {"flipped header": {"unreadable"}, "flipped bytes": {"unreadable", "checksum"},
             "rewritten values": {"checksum"}}[damage]
    found = {}
    for name in ("flat", "sharded"):
        root, part = _damaged(layouts, name, tmp_path)
        if damage == "rewritten values":
            arr = zarr.open_array(str(part / "layer_01"), mode="r+")
            arr[lo:hi] = -arr[lo:hi]
        else:
            if name == "flat":
                obj = part / "layer_01" / "c" / str(lo // DMG_CHUNK) / "0"
                start, length = 0, obj.stat().st_size
            else:
                obj = part / "layer_01" / "c" / str(lo // DMG_SHARD) / "0"
                start, length = _inner_span(obj, (lo % DMG_SHARD) // DMG_CHUNK)
            _flip(obj, start if damage == "flipped header" else start + length // 2)
        (p,) = _located(root)
        assert p.part == part.name and p.kind in kinds
        assert p.rows == [(lo, hi)] and p.utterances == _owners(part, [(lo, hi)])
        assert "rows 96-111" in p.message and all(repr(u) in p.message for u in p.utterances)
        found[name] = (p.rows, p.utterances)
    assert found["sharded"] == found["flat"]
    assert len(found["sharded"][1]) < len(_owners(part, [(DMG_SHARD, 2 * DMG_SHARD)]))  # finer than a shard


@pytest.mark.parametrize("damage", ["truncated", "deleted", "flipped index"])
def test_a_damaged_shard_object_is_found_and_located(layouts: dict[str, Path], tmp_path: Path,
                                                     damage: str) -> None:
    """A whole shard lost (truncated: its index is gone; deleted; its index failing its crc32c) blames exactly
    that shard's rows and utterances; the scan goes on, and a bad inner chunk of another shard of the same
    array is reported too."""
    root, part = _damaged(layouts, "sharded", tmp_path)
    shard = part / "layer_01" / "c" / "0" / "0"  # rows 0-63
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-7])  # e.g. a power cut after the commit marker reached the disk
    elif damage == "deleted":
        shard.unlink()  # reads back as zeros
    else:
        _flip(shard, shard.stat().st_size - 12, 4)
    other = part / "layer_01" / "c" / "2" / "0"  # rows 128-156: the partial last shard
    _flip(other, _inner_span(other, 1)[0])  # the zstd header of rows 144-156: never decodes
    problems = _located(root)
    n = int(zarr.open_array(str(part / "layer_01")).shape[0])
    whole, chunk = (0, DMG_SHARD), (144, n)
    by_kind = {p.kind: p for p in problems}
    if damage == "deleted":
        assert set(by_kind) == {"checksum", "unreadable"}
        assert by_kind["checksum"].rows == [whole] and "missing" in by_kind["checksum"].message
        assert by_kind["unreadable"].rows == [chunk]
    else:
        assert set(by_kind) == {"unreadable"} and by_kind["unreadable"].rows == [whole, chunk]
    for p in problems:
        assert p.part == part.name and p.utterances == _owners(part, p.rows) and p.utterances


def test_a_nan_in_a_sharded_part_names_its_utterance(layouts: dict[str, Path], tmp_path: Path) -> None:
    """A NaN whose checksums were re-recorded (as a writer would have stored it): only the value scan can find
    it, and it names the row and the utterance, as for unsharded parts."""
    from hff_cache.cache.format import array_checksum, chunk_checksums

    root, part = _damaged(layouts, "sharded", tmp_path)
    arr = zarr.open_array(str(part / "layer_00"), mode="r+")
    values = arr[...]
    values[100, 5] = np.nan
    arr[...] = values
    g = zarr.open_group(str(part), mode="r+")
    g.attrs["checksums"] = {**g.attrs["checksums"], "layer_00": array_checksum(values)}
    g.attrs["chunk_checksums"] = {**g.attrs["chunk_checksums"],
                                  "layer_00": {"rows": DMG_CHUNK, "crc32": chunk_checksums(values, DMG_CHUNK)[1]}}
    (p,) = _located(root, "layer_00")
    (owner,) = _owners(part, [(100, 101)])
    assert p.kind == "nonfinite" and f"first at row 100 (utterance {owner!r})" in p.message


def test_sharded_parts_without_chunk_checksums_still_verify(layouts: dict[str, Path], tmp_path: Path) -> None:
    """Parts committed before per-chunk checksums existed: sound ones pass; a deleted shard is still located (by
    listing its objects), changed values that decode are found but cannot be located."""
    root, part = _damaged(layouts, "sharded", tmp_path)
    for p in (root / "parts").glob("w*-*"):
        g = zarr.open_group(str(p), mode="r+")
        g.attrs.pop("chunk_checksums")  # attrs is a mutable mapping: the marker is rewritten without the key
    assert "chunk_checksums" not in zarr.open_group(str(part), mode="r").attrs
    assert verify_cache(str(root)).ok
    (part / "layer_01" / "c" / "1" / "0").unlink()
    arr = zarr.open_array(str(part / "layer_00"), mode="r+")
    arr[96:112] = -arr[96:112]
    rep = verify_cache(str(root))
    got = {p.array: p for p in rep.problems}
    assert set(got) == {"layer_00", "layer_01"} and {p.kind for p in rep.problems} == {"checksum"}
    assert got["layer_01"].rows == [(DMG_SHARD, 2 * DMG_SHARD)] and "missing" in got["layer_01"].message
    assert got["layer_01"].utterances == _owners(part, got["layer_01"].rows)
    assert got["layer_00"].rows == [] and got["layer_00"].utterances == []
