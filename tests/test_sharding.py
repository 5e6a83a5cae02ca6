"""Sharded parts (zarr's sharding codec): a sharded cache holds the values of the unsharded one in fewer objects,
for every codec; it verifies, resumes after an interruption, and caches without a recorded layout still read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from hff_cache.cache import CODECS, CacheReader, CacheWriter, get_codec, transcode_cache, verify_cache
from hff_cache.cache.codecs import MAIN
from hff_cache.cache.reader import ShardedRows, decode_codes
from hff_cache.testing import tiny_cache

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
    for ca, cb in zip(a.read_codes(picks), b.read_codes(picks), strict=True):
        np.testing.assert_array_equal(decode_codes(b.codec, cb), decode_codes(a.codec, ca))
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
    group = zarr.open_group(store=str(old), mode="r+")
    attrs = dict(group.attrs["hff_cache"])
    del attrs["layout"]
    group.attrs["hff_cache"] = attrs
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
