"""`hff-cache verify`: a sound cache passes; each kind of damage is found, located and explained."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from hff_cache.cache import CacheMeta, CacheWriter, CodecSpec, EncoderInfo
from hff_cache.cache.format import array_checksum, chunk_checksums, crc32_update
from hff_cache.cache.verify import verify_cache

D, LAYERS = 64, [0, 2]  # D: a multiple of int4b's block


def _meta(codec: str = "fp16") -> CacheMeta:
    enc = EncoderInfo(name="test", model_class="X", sample_rate=16000, frame_rate=50.0, hidden_size=D,
                      num_hidden_states=3)
    return CacheMeta(encoder=enc, layers=LAYERS, codec=CodecSpec(codec))


def _cache(root: Path, codec: str = "fp16", n: int = 9, worker: str = "w000", start: int = 0) -> Path:
    rng = np.random.default_rng(start)
    with CacheWriter(str(root), _meta(codec), worker=worker, part_frames=60, chunk_frames=16) as w:
        for i in range(start, start + n):
            w.add(f"u{i:02d}", rng.normal(size=(len(LAYERS), 10 + 3 * i, D)).astype(np.float32),
                  text=f"t{i}", num_samples=(10 + 3 * i) * 320)
        w.skip("bad", "bad.wav", "unreadable audio")
    return root


def _part(root: Path, k: int = 0) -> Path:
    return sorted((root / "parts").glob("w*-*"))[k]


def _rewrite(root: Path, pid_dir: Path, name: str, fn, fix_checksum: bool) -> None:  # noqa: ANN001
    """Change a committed array in place; optionally re-record its checksum so only other checks see it."""
    arr = zarr.open_array(str(pid_dir / name), mode="r+")
    values = fn(arr[...])
    arr[...] = values
    if fix_checksum:  # both checksums: the whole array's and, for chunked arrays, each chunk's
        g = zarr.open_group(str(pid_dir), mode="r+")
        g.attrs["checksums"] = {**g.attrs["checksums"], name: array_checksum(values)}
        per_chunk = dict(g.attrs.get("chunk_checksums", {}))
        if name in per_chunk:
            rows = per_chunk[name]["rows"]
            per_chunk[name] = {"rows": rows, "crc32": chunk_checksums(values, rows)[1]}
            g.attrs["chunk_checksums"] = per_chunk


def _kinds(root: Path) -> list[tuple[str, str]]:
    return sorted((p.kind, f"{p.part}/{p.array}") for p in verify_cache(str(root)).problems)


def test_sound_cache_passes(tmp_path: Path) -> None:
    for codec in ("fp16", "int8", "int4", "int4b", "nf4b"):
        rep = verify_cache(str(_cache(tmp_path / codec, codec)))
        assert rep.ok, rep.problems
        assert rep.utterances == 9 and rep.committed_parts >= 3 and rep.skipped == 1 and rep.warnings == []
        assert rep.values_checked == rep.frames * len(LAYERS) * (D // 2 if "4" in codec else D)  # packed bytes


def test_each_damage_is_found_and_located(tmp_path: Path) -> None:
    root = _cache(tmp_path / "c")
    p0, p1, p2 = (_part(root, k) for k in range(3))
    # 1. a flipped feature value: the commit-time checksum catches it
    _rewrite(root, p0, "layer_02", lambda v: v + np.float16(1), fix_checksum=False)
    # 2. NaN with its checksum "fixed": the NaN scan still names the utterance that holds it
    def put_nan(v: np.ndarray) -> np.ndarray:
        v[25, 3] = np.nan
        return v
    _rewrite(root, p1, "layer_00", put_nan, fix_checksum=True)
    # 3. an index whose offsets no longer follow the lengths (checksum re-recorded)
    _rewrite(root, p2, "offsets", lambda v: v + 1, fix_checksum=True)
    rep = verify_cache(str(root))
    assert not rep.ok
    got = {(p.kind, p.part, p.array) for p in rep.problems}
    assert got == {("checksum", p0.name, "layer_02"), ("nonfinite", p1.name, "layer_00"),
                   ("index", p2.name, "offsets")}
    nan = next(p for p in rep.problems if p.kind == "nonfinite")
    offsets = zarr.open_array(str(p1 / "offsets"))[...]
    ids = zarr.open_array(str(p1 / "ids"))[...]
    owner = str(ids[np.searchsorted(offsets, 25, side="right") - 1])
    assert f"first at row 25 (utterance {owner!r})" in nan.message


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    root = _cache(tmp_path / "c", n=12)
    p0, p1, p2, p3 = (_part(root, k) for k in range(4))
    (p0 / "layer_00" / "c" / "1" / "0").unlink()  # a lost chunk reads back as zeros: checksum mismatch
    (p1 / "layer_02" / "c" / "0" / "0").write_bytes(b"not zstd at all")  # does not decode
    (p2 / "lengths" / "zarr.json").unlink()  # array metadata gone
    g = zarr.open_group(str(p3), mode="r+")
    g.attrs["num_frames"] = g.attrs["num_frames"] + 1  # marker disagrees with the arrays
    assert _kinds(root) == sorted([("checksum", f"{p0.name}/layer_00"), ("unreadable", f"{p1.name}/layer_02"),
                                   ("missing", f"{p2.name}/lengths"), ("shape", f"{p3.name}/layer_00"),
                                   ("shape", f"{p3.name}/layer_02"), ("index", f"{p3.name}/lengths")])


def test_int8_scale_nan_and_duplicate_ids_across_workers(tmp_path: Path) -> None:
    root = _cache(tmp_path / "c", "int8", n=4)
    # Two workers started together on overlapping inputs (the writer refuses ids it already sees committed).
    other = _cache(tmp_path / "o", "int8", n=2, worker="w001", start=3)
    for part in (other / "parts").glob("w001-*"):
        shutil.copytree(part, root / "parts" / part.name)
    pid = _part(root, 0)

    def nan_scale(v: np.ndarray) -> np.ndarray:
        v[0] = np.nan
        return v
    _rewrite(root, pid, "scale_00", nan_scale, fix_checksum=True)
    kinds = _kinds(root)
    assert ("nonfinite", f"{pid.name}/scale_00") in kinds
    dup = [p for p in verify_cache(str(root)).problems if p.kind == "duplicate"]
    assert len(dup) == 1 and "'u03'" in dup[0].message and dup[0].part.startswith("w001")


def test_uncommitted_parts_and_litter_are_warnings(tmp_path: Path) -> None:
    root = _cache(tmp_path / "c", n=3)
    zarr.create_group(str(root / "parts" / "w003-000000"), attributes={"committed": False})
    (root / "zarr.1234abcd.partial").write_bytes(b"{")  # what a write killed mid-rename leaves
    rep = verify_cache(str(root))
    assert rep.ok and rep.uncommitted_parts == ["w003-000000"]
    assert any("w003-000000 is not committed" in w for w in rep.warnings)
    assert any("zarr.1234abcd.partial" in w for w in rep.warnings)


def test_incremental_checksum_equals_whole_array() -> None:
    x = np.random.default_rng(0).normal(size=(1000, 7)).astype(np.float16)
    crc = 0
    for lo in range(0, 1000, 64):
        crc = crc32_update(crc, x[lo:lo + 64])
    assert f"{crc:08x}" == array_checksum(x)


def test_cli_exit_codes_and_json(tmp_path: Path) -> None:
    root = _cache(tmp_path / "c", n=3)
    cmd = [sys.executable, "-m", "hff_cache", "verify"]
    ok = subprocess.run([*cmd, str(root)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and ": OK:" in ok.stdout and "3 utterances" in ok.stdout
    _rewrite(root, _part(root), "num_samples", lambda v: v * 2, fix_checksum=False)
    bad = subprocess.run([*cmd, str(root), "--json"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    doc = json.loads(bad.stdout)
    assert doc["ok"] is False and [p["kind"] for p in doc["problems"]] == ["checksum"]
    assert doc["problems"][0]["text"].startswith(f"{_part(root).name}/num_samples: crc32")
    none = subprocess.run([*cmd, str(tmp_path / "nothing")], capture_output=True, text=True, timeout=120)
    assert none.returncode == 2 and "no feature cache" in none.stderr


@pytest.mark.parametrize("scan", [True, False])
def test_no_values_still_checks_checksums(tmp_path: Path, scan: bool) -> None:
    root = _cache(tmp_path / "c", n=3)
    _rewrite(root, _part(root), "layer_00", lambda v: -v, fix_checksum=False)
    rep = verify_cache(str(root), scan_values=scan)
    assert [p.kind for p in rep.problems] == ["checksum"] and (rep.values_checked > 0) == scan
