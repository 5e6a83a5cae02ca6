"""`hff-cache transcode` / `transcode_cache`: every codec round-trips, everything but the codec is kept, an
interrupted transcode resumes to the uninterrupted result, a foreign DST and bad input are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from hff_cache.cache import (
    CODECS,
    CacheFormatError,
    CacheMismatchError,
    CacheReader,
    CacheWriter,
    get_codec,
    transcode_cache,
    verify_cache,
)
from hff_cache.cache.codecs import Int8Codec
from hff_cache.config import ExtractConfig
from hff_cache.encoders.tiny import tiny_encoder
from hff_cache.extraction.extract import extract
from hff_cache.testing import as_older_cache, tiny_cache, write_corpus

TEXTS = ["a cat", "the dog", "sun", "a bird sings", "rain", "hello"]


def _params(name: str) -> dict:
    """The tiny encoders' hidden size is 32: block codecs need a block dividing it (default 64)."""
    return {"block": 16} if "block" in get_codec(name).params else {}


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tiny_cache(tmp_path_factory.mktemp("src"), texts=TEXTS))


@pytest.fixture(scope="module")
def multi(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Two extraction shards of small parts (w000-*, w001-*) and a skip record: part order and skips matter."""
    root = tmp_path_factory.mktemp("multi")
    manifest = write_corpus(root / "audio", [1.0, 0.6, 1.2, 0.8, 0.9, 0.7, 1.1, 0.5], TEXTS + ["x", "y"])
    with manifest.open("a") as f:
        f.write(json.dumps({"id": "broken", "audio": "missing.wav", "text": "", "speaker": "spk0"}) + "\n")
    out = root / "cache.zarr"
    for shard in (0, 1):
        extract(ExtractConfig(model="tiny-random:wav2vec2", data=str(manifest), out=str(out), progress=False,
                              part_frames=60, num_shards=2, shard_index=shard, on_error="skip"),
                encoder=tiny_encoder("wav2vec2"))
    return str(out)


def _same_content(a: CacheReader, b: CacheReader) -> None:
    """Everything but the codec is equal: index, metadata, statistics, skip records."""
    assert b.ids == a.ids and b.texts == a.texts and b.metas == a.metas
    np.testing.assert_array_equal(b.lengths, a.lengths)
    np.testing.assert_array_equal(b.num_samples, a.num_samples)
    for field in ("encoder", "layers", "batching", "intake_fingerprints", "created", "format_version"):
        assert getattr(b.meta, field) == getattr(a.meta, field), field
    for x, y in zip(a.layer_stats(), b.layer_stats(), strict=True):
        np.testing.assert_array_equal(y, x)  # the source parts' own sums, not those of the decoded values
    assert [(r["id"], r["audio"], r["reason"]) for r in b.skipped()] == \
        [(r["id"], r["audio"], r["reason"]) for r in a.skipped()]
    assert b.info()["complete"] == a.info()["complete"]


def _rel_errors(a: CacheReader, b: CacheReader) -> list[float]:
    xs, ys = (np.concatenate(r.read_many(range(len(r))), axis=0) for r in (a, b))
    return [float(np.linalg.norm(ys[:, j] - xs[:, j]) / np.linalg.norm(xs[:, j])) for j in range(xs.shape[1])]


@pytest.mark.parametrize("name", list(CODECS))
def test_every_codec_round_trips(src: str, tmp_path: Path, name: str) -> None:
    summary = transcode_cache(src, str(tmp_path / "x.zarr"), name, codec_params=_params(name))
    assert summary["ok"], summary["problems"]
    assert summary["utterances"] == summary["transcoded"] == 6 and summary["already_done"] == 0
    assert summary["codec"]["name"] == name and summary["stats"] == "kept" and summary["complete"]
    for key in ("src_bytes", "dst_bytes", "src_bytes_per_value", "dst_bytes_per_value", "seconds"):
        assert summary[key] > 0, key
    a, b = CacheReader(src), CacheReader(str(tmp_path / "x.zarr"))
    _same_content(a, b)
    assert b.meta.codec.name == name and (b.cache_id == a.cache_id) == (name == "fp16")
    assert verify_cache(b.url).ok
    errors = _rel_errors(a, b)
    tol = get_codec(name).transcode_tolerance
    assert max(errors) <= tol and summary["rel_error"] <= tol == summary["rel_tolerance"]
    if name == "fp16":  # fp16 of fp16 values: the very same numbers
        assert max(errors) == 0.0
    # and back: the fp16 copy of X decodes as X does, to fp16 rounding
    back = transcode_cache(b.url, str(tmp_path / "back.zarr"), "fp16")
    assert back["ok"], back["problems"]
    _same_content(b, CacheReader(back["dst"]))
    assert max(_rel_errors(b, CacheReader(back["dst"]))) <= get_codec("fp16").transcode_tolerance


def test_parts_of_several_shards_and_skip_records_are_kept(multi: str, tmp_path: Path) -> None:
    summary = transcode_cache(multi, str(tmp_path / "x.zarr"), "int8")
    assert summary["ok"], summary["problems"]
    a, b = CacheReader(multi), CacheReader(summary["dst"])
    assert len(a.parts()) > 2 and {p.worker for p in a.parts()} == {"w000", "w001"}
    assert [p.num_utterances for p in b.parts()] == [p.num_utterances for p in a.parts()]
    assert [r["id"] for r in b.skipped()] == ["broken"] and summary["skip_records"] == 1
    _same_content(a, b)


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, n_adds: int) -> None:
    """The writer fails at its (n_adds+1)-th utterance, as a kill in the middle of a part would stop it."""
    calls = {"n": 0}
    add = CacheWriter.add

    def failing_add(self: CacheWriter, *args: object, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] > n_adds:
            raise KeyboardInterrupt
        add(self, *args, **kwargs)

    monkeypatch.setattr(CacheWriter, "add", failing_add)


def _uncommit_last_part(monkeypatch: pytest.MonkeyPatch, at_part: int) -> None:
    """The process dies while its part ``at_part`` is written: every array is there, the commit marker not."""
    calls = {"n": 0}
    write = CacheWriter._write_part

    def dying_write(self: CacheWriter, pid: str) -> None:
        calls["n"] += 1
        write(self, pid)
        if calls["n"] == at_part + 1:
            zarr.open_group(store=self.store, path=f"parts/{pid}", mode="r+").attrs["committed"] = False
            raise KeyboardInterrupt

    monkeypatch.setattr(CacheWriter, "_write_part", dying_write)


@pytest.mark.parametrize("how", ["in a part's utterances", "before a part's commit marker"])
def test_interrupted_transcode_resumes_to_the_uninterrupted_result(multi: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 how: str) -> None:
    full = transcode_cache(multi, str(tmp_path / "full.zarr"), "int4")
    dst = str(tmp_path / "resumed.zarr")
    with monkeypatch.context() as m:
        if how == "in a part's utterances":
            _interrupt_after(m, 3)
        else:
            _uncommit_last_part(m, 1)
        with pytest.raises(KeyboardInterrupt):
            transcode_cache(multi, dst, "int4")
    partial = CacheReader(dst)
    assert 0 < len(partial) < len(CacheReader(multi)) and partial.info()["complete"] is False
    rep = verify_cache(dst)
    assert rep.ok  # what was committed is sound; an uncommitted part is only a warning
    assert bool(rep.uncommitted_parts) == (how == "before a part's commit marker")

    resumed = transcode_cache(multi, dst, "int4")
    assert resumed["ok"], resumed["problems"]
    assert resumed["already_done"] == len(partial) and resumed["transcoded"] == full["utterances"] - len(partial)
    a, b = CacheReader(full["dst"]), CacheReader(dst)
    _same_content(a, b)
    assert [p.num_utterances for p in b.parts()] == [p.num_utterances for p in a.parts()]
    for x, y in zip(a.read_many(range(len(a))), b.read_many(range(len(b))), strict=True):
        np.testing.assert_array_equal(y, x)  # the same parts encode to the same numbers
    assert resumed["dst_bytes_per_value"] == pytest.approx(full["dst_bytes_per_value"], rel=0.01)
    again = transcode_cache(multi, dst, "int4")  # done: nothing to do, checked again
    assert again["ok"] and again["transcoded"] == 0 and again["already_done"] == full["utterances"]


def test_a_foreign_dst_is_refused(src: str, multi: str, tmp_path: Path) -> None:
    dst = str(tmp_path / "x.zarr")
    transcode_cache(src, dst, "int8")
    with pytest.raises(CacheMismatchError, match="codec.name: cache has 'int8', requested 'int4'") as e:
        transcode_cache(src, dst, "int4")
    assert dst in str(e.value) and "choose another DST" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(CacheMismatchError, match="codec.params") as e:
        transcode_cache(src, dst, "int8", codec_params={"level": 5})
    with pytest.raises(CacheMismatchError, match="another source than") as e:
        transcode_cache(multi, dst, "int8")  # same encoder, layers and codec: only the content tells
    assert dst in str(e.value) and "\n" not in str(e.value)
    extracted = str(tmp_path / "extracted")
    tiny_cache(extracted, texts=TEXTS)  # the same corpus and encoder, extracted again: another cache
    with pytest.raises(CacheMismatchError, match="another source than"):
        transcode_cache(src, str(Path(extracted) / "cache.zarr"), "fp16")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(CacheFormatError, match="exists and is not a feature cache"):
        transcode_cache(src, str(tmp_path / "junk"), "int8")
    (tmp_path / "empty").mkdir()  # an empty folder is a new cache
    assert transcode_cache(src, str(tmp_path / "empty"), "int8")["ok"]


def test_bad_input_is_a_clear_error(src: str, tmp_path: Path) -> None:
    dst = str(tmp_path / "x.zarr")
    with pytest.raises(CacheFormatError, match="SRC: no feature cache at"):
        transcode_cache(str(tmp_path / "missing"), dst, "int8")
    (tmp_path / "plain").mkdir()
    with pytest.raises(CacheFormatError, match="SRC: .* is not a feature cache"):
        transcode_cache(str(tmp_path / "plain"), dst, "int8")
    with pytest.raises(ValueError, match="unknown codec 'bf16'; choose one of fp16, int8, int4, int4b, nf4b"):
        transcode_cache(src, dst, "bf16")
    with pytest.raises(ValueError, match="is SRC"):
        transcode_cache(src, src + "/", "int8")
    with pytest.raises(ValueError, match="inside SRC"):
        transcode_cache(src, src + "/copy", "int8")
    with pytest.raises(ValueError, match="bad parameters for codec 'int4b'"):
        transcode_cache(src, dst, "int4b", codec_params={"blocks": 16})
    with pytest.raises(ValueError, match=r"hidden size \(32\) to be a multiple of its block \(64\)"):
        transcode_cache(src, dst, "int4b")
    assert not Path(dst).exists()  # refused before anything was written


def test_cli_command(src: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hff_cache.cli import app

    dst = str(tmp_path / "x.zarr")
    argv = ["transcode", src, dst, "--codec", "int4b", "--codec-param", "block=16", "--no-progress"]
    res = CliRunner().invoke(app, [*argv, "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert summary["ok"] and summary["codec"] == {"name": "int4b", "params": {"level": 3, "block": 16}}
    res = CliRunner().invoke(app, argv)  # resume of a finished transcode: nothing to do
    assert res.exit_code == 0 and "0 transcoded now, 6 already done" in res.output and "OK" in res.output
    res = CliRunner().invoke(app, ["transcode", src, dst, "--codec", "int8", "--no-progress"])
    assert res.exit_code == 2 and "other settings" in res.output and dst in res.output
    res = CliRunner().invoke(app, ["transcode", src, str(tmp_path / "y"), "--codec", "bf16"])
    assert res.exit_code == 2 and "fp16, int8, int4, int4b, nf4b" in res.output
    monkeypatch.setattr(Int8Codec, "transcode_tolerance", 1e-9)  # a check that fails: exit 1
    res = CliRunner().invoke(app, ["transcode", src, str(tmp_path / "z"), "--codec", "int8", "--no-progress"])
    assert res.exit_code == 1 and "1 PROBLEM(S)" in res.output and "relative error" in res.output


def test_to_and_from_s3(src: str, tmp_path: Path, s3_endpoint: str) -> None:
    import s3fs

    opts = {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, key="testing", secret="testing",
                      skip_instance_cache=True).mkdir("hff-transcode-bucket")
    url = "s3://hff-transcode-bucket/caches/int8"
    up = transcode_cache(src, url, "int8", storage_options=opts)  # the options go to the URL only
    assert up["ok"], up["problems"]
    again = transcode_cache(src, url, "int8", storage_options=opts)
    assert again["ok"] and again["transcoded"] == 0
    down = transcode_cache(url, str(tmp_path / "fp16.zarr"), "fp16", storage_options=opts)
    assert down["ok"], down["problems"]
    _same_content(CacheReader(src), CacheReader(down["dst"]))


def test_an_older_interrupted_dst_resumes_with_its_settings_spelled_out(multi: str, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # a tpcape DST begun before deadzone/centroids/exact/pred existed records none of them; they behaved as these
    legacy = {"deadzone": 0.0, "centroids": False, "exact": False, "pred": "float32"}
    full = transcode_cache(multi, str(tmp_path / "full.zarr"), "tpcape", codec_params=legacy)
    dst = str(tmp_path / "old.zarr")
    with monkeypatch.context() as m:
        _interrupt_after(m, 3)
        with pytest.raises(KeyboardInterrupt):
            transcode_cache(multi, dst, "tpcape", codec_params=legacy)
    as_older_cache(dst, drop_codec_params=tuple(legacy))
    with pytest.raises(CacheMismatchError, match="deadzone"):  # today's defaults would code the rest otherwise
        transcode_cache(multi, dst, "tpcape")
    resumed = transcode_cache(multi, dst, "tpcape", codec_params=legacy)
    assert resumed["ok"], resumed["problems"]
    assert resumed["already_done"] > 0
    a, b = CacheReader(full["dst"]), CacheReader(dst)
    for x, y in zip(a.read_many(range(len(a))), b.read_many(range(len(b))), strict=True):
        np.testing.assert_array_equal(y, x)
