"""Fault injection: SIGKILL mid-extraction and mid-training, a full disk, two extractions on one cache.

Each fault must leave a cache that `verify` passes, and resuming must end with the same cache as an
uninterrupted run: no utterance lost, none duplicated. `benchmarks/faults.py` runs the long version
(20+ kills on real speech with a real model).
"""

from __future__ import annotations

import errno
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from hff_cache.cache import CacheLockedError, CacheReader, CacheWriteError, CacheWriter
from hff_cache.cache.verify import verify_cache
from hff_cache.config import ExtractConfig
from hff_cache.encoders.tiny import tiny_encoder
from hff_cache.extraction.extract import extract
from hff_cache.testing import parts_on_disk, write_corpus

MODEL = "tiny-random:wav2vec2"
DURATIONS = [0.5 + 0.1 * (i % 7) for i in range(40)]  # 40 utterances, ~32 s, ~14 parts of 100 frames
SMALL = ["--part-frames", "100", "--batch-seconds", "2"]


def _cmd(manifest: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "hff_cache", "extract", "--model", MODEL, "--data", str(manifest),
            "--out", str(out), "--no-progress", *SMALL, *extra]


def _cfg(manifest: Path, out: Path, **kw: object) -> ExtractConfig:
    return ExtractConfig(model=MODEL, data=str(manifest), out=str(out), progress=False, part_frames=100,
                         batch_seconds=2.0, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CacheReader]:
    """The manifest and an uninterrupted in-process run of it (the same weights as the CLI's model)."""
    folder = tmp_path_factory.mktemp("faults")
    manifest = write_corpus(folder / "audio", DURATIONS)
    extract(_cfg(manifest, folder / "reference.zarr"), encoder=tiny_encoder("wav2vec2"))
    return manifest, CacheReader(str(folder / "reference.zarr"))


def assert_same_cache(got: Path, ref: CacheReader) -> None:
    """Same ids, each once, same features (fp16; batching may differ after a resume), and `verify` passes."""
    rep = verify_cache(str(got))
    assert rep.ok, [str(p) for p in rep.problems]
    assert rep.uncommitted_parts == []  # the last resume removed every interrupted part
    r = CacheReader(str(got))
    assert r.duplicates == [] and len(set(r.ids)) == len(r.ids)
    assert sorted(r.ids) == sorted(ref.ids)
    for uid in ref.ids:
        np.testing.assert_allclose(r.read(uid), ref.read(uid), rtol=1e-2, atol=2e-3)


def kill_at_random(cmd: list[str], out: Path, rng: random.Random, timeout: float = 120.0) -> str:
    """Start `cmd`, SIGKILL it at a random moment of its extraction; returns what happened.

    Two kinds of moment: the instant a new part directory appears (its arrays are being written: the
    interrupted-part path), or a random delay after a new commit (anywhere: encoding, buffering, writing).
    """
    before, done_before = parts_on_disk(out)
    mode = rng.choice(["new-part", "after-commit"])
    delay = rng.uniform(0.0, 0.3)
    err = tempfile.TemporaryFile()  # a file, not a pipe nobody reads: the child can never block on it
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)

    def finished() -> str:
        err.seek(0)
        assert proc.returncode == 0, err.read().decode(errors="replace")
        return "finished"

    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return finished()
            names, committed = parts_on_disk(out)
            if mode == "new-part" and names - before:
                break
            if mode == "after-commit" and committed > done_before:
                time.sleep(delay)
                break
            time.sleep(0.005)
        else:
            raise AssertionError(f"no progress within {timeout} s")
        if proc.poll() is not None:
            return finished()
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        return "killed"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        err.close()


def kill_twice(cmd: list[str], out: Path, rng: random.Random) -> None:
    """CI: two kills in a row, the second one of a resumed run (the benchmark does 20+). After every kill what
    was committed is intact and readable, and nothing committed is lost."""
    kills, seen = 0, 0
    for _ in range(2):
        what = kill_at_random(cmd, out, rng)
        if what == "finished":
            break
        kills += 1
        rep = verify_cache(str(out))
        assert rep.ok, [str(p) for p in rep.problems]
        assert rep.utterances >= seen
        seen = rep.utterances
    assert kills == 2  # the run is long enough (about 14 parts) to be killed twice


def test_sigkill_mid_extraction_then_resume(corpus: tuple[Path, CacheReader], tmp_path: Path) -> None:
    manifest, ref = corpus
    out = tmp_path / "killed.zarr"
    kill_twice(_cmd(manifest, out), out, random.Random(1234))
    extract(_cfg(manifest, out), encoder=tiny_encoder("wav2vec2"))  # the last resume, in process: faster
    assert_same_cache(out, ref)


# --- the same on sharded parts ----------------------------------------------------------------------------

SHARD_CHUNK, SHARD_FRAMES = 16, 64  # 4 inner chunks a shard; a 100-frame part spans 2-3 shards a layer


def start_sharded(out: Path, ref: CacheReader) -> None:
    """Create the cache with a sharded layout of small chunks before extracting into it. extract's chunks are
    2048 frames, more than these 100-frame parts, so its own shards would hold one inner chunk each; a writer
    adopts the layout the cache recorded at creation, so every run below writes 64-frame shards of 16-frame
    inner chunks."""
    CacheWriter(str(out), ref.meta, chunk_frames=SHARD_CHUNK, shard_frames=SHARD_FRAMES).close()


def assert_sharded(out: Path) -> None:
    r = CacheReader(str(out))
    assert r.meta.layout == {"chunk_frames": SHARD_CHUNK, "shard_frames": SHARD_FRAMES}
    for p in r.parts():
        arr = zarr.open_array(store=str(out), path=f"parts/{p.part_id}/layer_01", mode="r")
        assert arr.shards == (SHARD_FRAMES, r.meta.encoder.hidden_size) and arr.chunks[0] == SHARD_CHUNK


@pytest.fixture(scope="module")
def sharded_reference(corpus: tuple[Path, CacheReader], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted in-process run of the corpus into a sharded cache."""
    manifest, ref = corpus
    out = tmp_path_factory.mktemp("faults_sharded") / "sharded.zarr"
    start_sharded(out, ref)
    extract(_cfg(manifest, out, shard_frames=SHARD_FRAMES), encoder=tiny_encoder("wav2vec2"))
    assert_sharded(out)
    return out


def test_sigkill_mid_sharded_extraction_then_resume(corpus: tuple[Path, CacheReader], tmp_path: Path) -> None:
    """Killed while writing shard objects, or anywhere else: committed sharded parts verify, and resuming ends
    with the values of an uninterrupted run, still sharded."""
    manifest, ref = corpus
    out = tmp_path / "killed.zarr"
    start_sharded(out, ref)
    kill_twice(_cmd(manifest, out, "--shard-frames", str(SHARD_FRAMES)), out, random.Random(4321))
    extract(_cfg(manifest, out, shard_frames=SHARD_FRAMES), encoder=tiny_encoder("wav2vec2"))
    assert_same_cache(out, ref)
    assert_sharded(out)


def test_damaged_part_repair_and_killed_root_write(corpus: tuple[Path, CacheReader], tmp_path: Path) -> None:
    """The documented repair: `verify` names the damaged part; delete it and rerun the same command."""
    import shutil

    manifest, ref = corpus
    out = tmp_path / "c.zarr"
    shutil.copytree(ref.url, out)
    victim = sorted((out / "parts").iterdir())[3]
    chunk = victim / "layer_01" / "c" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-7])  # e.g. a power cut after the marker reached the disk
    rep = verify_cache(str(out))
    assert {p.part for p in rep.problems} == {victim.name}
    shutil.rmtree(victim)
    extract(_cfg(manifest, out), encoder=tiny_encoder("wav2vec2"))
    assert_same_cache(out, ref)


def test_damaged_sharded_part_repair(corpus: tuple[Path, CacheReader], sharded_reference: Path,
                                    tmp_path: Path) -> None:
    """The documented repair on sharded parts: `verify` names the damaged part (and the rows and utterances of
    the lost shard); delete the part and rerun the same command."""
    import shutil

    manifest, ref = corpus
    out = tmp_path / "c.zarr"
    shutil.copytree(sharded_reference, out)
    victim = sorted((out / "parts").iterdir())[3]
    shard = victim / "layer_01" / "c" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:-7])  # a power cut after the marker reached the disk: no shard index
    rep = verify_cache(str(out))
    assert {p.part for p in rep.problems} == {victim.name}
    (p,) = rep.problems
    assert p.kind == "unreadable" and p.array == "layer_01" and p.rows and p.rows[0][0] == 0
    assert p.rows == [(0, min(SHARD_FRAMES, int(zarr.open_array(str(victim / "layer_01")).shape[0])))]
    assert p.utterances and set(p.utterances) <= set(CacheReader(str(sharded_reference)).ids)
    shutil.rmtree(victim)
    extract(_cfg(manifest, out, shard_frames=SHARD_FRAMES), encoder=tiny_encoder("wav2vec2"))
    assert_same_cache(out, ref)
    assert_sharded(out)


# --- full disk --------------------------------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path: Path):  # noqa: ANN201 - yields the mount point
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mnt)], check=True,
                       capture_output=True, text=True)
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {detail.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_tmpfs(corpus: tuple[Path, CacheReader], small_tmpfs: Path) -> None:
    manifest, ref = corpus
    out = small_tmpfs / "c.zarr"
    run = subprocess.run(_cmd(manifest, out), capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "the disk is full" in run.stderr and "Committed parts are intact" in run.stderr
    assert "rerun the same command" in run.stderr and "Traceback" not in run.stderr
    rep = verify_cache(str(out))
    assert rep.ok and 0 < rep.utterances < len(ref), (rep.utterances, [str(p) for p in rep.problems])
    # Free space, rerun: the cache completes.
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_tmpfs)], check=True)
    extract(_cfg(manifest, out), encoder=tiny_encoder("wav2vec2"))
    assert_same_cache(out, ref)


def test_full_disk_simulated(corpus: tuple[Path, CacheReader], tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A store that runs out of space after a byte budget: the same contract without a mount."""
    from zarr.storage import LocalStore

    manifest, ref = corpus
    out = tmp_path / "c.zarr"
    real_set = LocalStore.set
    budget = {"left": 120_000}

    async def full_set(self, key, value):  # noqa: ANN001, ANN202
        budget["left"] -= len(value)
        if budget["left"] < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return await real_set(self, key, value)

    monkeypatch.setattr(LocalStore, "set", full_set)
    enc = tiny_encoder("wav2vec2")
    with pytest.raises(CacheWriteError) as ei:
        extract(_cfg(manifest, out), encoder=enc)
    assert ei.value.errno == errno.ENOSPC and "Committed parts are intact" in str(ei.value)
    monkeypatch.setattr(LocalStore, "set", real_set)
    rep = verify_cache(str(out))
    assert rep.ok and 0 < rep.utterances < len(ref)
    extract(_cfg(manifest, out), encoder=enc)  # same process: the failed writer released its lock
    assert_same_cache(out, ref)


def _committed_files(out: Path) -> dict[str, bytes]:
    """Every file of the committed parts of a local cache, by path: what a later run must leave alone."""
    r = CacheReader(str(out))
    return {str(f.relative_to(out)): f.read_bytes() for info in r.parts()
            for f in sorted((out / "parts" / info.part_id).rglob("*")) if f.is_file()}


def _tmpfs_bytes(root: Path) -> int:
    """What a tmpfs holds for the files under ``root``: whole 4 KiB pages a file."""
    return sum(-(-f.stat().st_size // 4096) * 4096 for f in root.rglob("*") if f.is_file())


def assert_full_disk_lost_nothing(out: Path, sharded_reference: Path, total: int) -> dict[str, bytes]:
    """After a write ran out of space: the cache verifies, some but not all utterances are committed, the part
    being written was removed, and every committed utterance holds the uninterrupted run's values exactly (the
    same batches wrote them). Returns the committed parts' files."""
    rep = verify_cache(str(out))
    assert rep.ok and 0 < rep.utterances < total, (rep.utterances, [str(p) for p in rep.problems])
    assert rep.uncommitted_parts == []
    r, full = CacheReader(str(out)), CacheReader(str(sharded_reference))
    assert len(r) == rep.utterances
    for uid in r.ids:
        np.testing.assert_array_equal(r.read(uid), full.read(uid))
    assert_sharded(out)
    return _committed_files(out)


def test_full_disk_tmpfs_sharded(corpus: tuple[Path, CacheReader], sharded_reference: Path,
                                 small_tmpfs: Path) -> None:
    """The real full disk on sharded parts: a tmpfs with room for about half of the sharded cache."""
    manifest, ref = corpus
    size_k = _tmpfs_bytes(sharded_reference) // 2 // 1024
    subprocess.run(["mount", "-o", f"remount,size={size_k}k", str(small_tmpfs)], check=True)
    out = small_tmpfs / "c.zarr"
    start_sharded(out, ref)
    run = subprocess.run(_cmd(manifest, out, "--shard-frames", str(SHARD_FRAMES)), capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "the disk is full" in run.stderr and "Committed parts are intact" in run.stderr
    assert "rerun the same command" in run.stderr and "Traceback" not in run.stderr
    kept = assert_full_disk_lost_nothing(out, sharded_reference, len(ref))
    # Free space, rerun: the cache completes, and the parts committed before the disk filled are untouched.
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_tmpfs)], check=True)
    extract(_cfg(manifest, out, shard_frames=SHARD_FRAMES), encoder=tiny_encoder("wav2vec2"))
    assert_same_cache(out, ref)
    assert_sharded(out)
    after = _committed_files(out)
    assert {k: after.get(k) for k in kept} == kept


def test_full_disk_simulated_sharded(corpus: tuple[Path, CacheReader], sharded_reference: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The store runs out of space while writing a part's shard objects: the same contract without a mount."""
    import re

    from zarr.storage import LocalStore

    manifest, ref = corpus
    out = tmp_path / "c.zarr"
    start_sharded(out, ref)
    real_set = LocalStore.set
    stored = sum(f.stat().st_size for f in sharded_reference.rglob("*") if f.is_file())
    budget = {"left": stored // 2}
    refused: list[str] = []

    async def full_set(self, key, value):  # noqa: ANN001, ANN202
        budget["left"] -= len(value)
        if budget["left"] < 0:
            refused.append(key)
            raise OSError(errno.ENOSPC, "No space left on device")
        return await real_set(self, key, value)

    monkeypatch.setattr(LocalStore, "set", full_set)
    enc = tiny_encoder("wav2vec2")
    with pytest.raises(CacheWriteError) as ei:
        extract(_cfg(manifest, out, shard_frames=SHARD_FRAMES), encoder=enc)
    assert ei.value.errno == errno.ENOSPC and "Committed parts are intact" in str(ei.value)
    assert any(re.fullmatch(r"parts/[^/]+/layer_\d+/c/\d+/\d+", k) for k in refused), refused  # a shard object
    monkeypatch.setattr(LocalStore, "set", real_set)
    kept = assert_full_disk_lost_nothing(out, sharded_reference, len(ref))
    extract(_cfg(manifest, out, shard_frames=SHARD_FRAMES), encoder=enc)  # the failed writer released its lock
    assert_same_cache(out, ref)
    assert_sharded(out)
    after = _committed_files(out)
    assert {k: after.get(k) for k in kept} == kept


# --- two extractions on one cache -------------------------------------------------------------------------

_HOLDER = """
import sys, time
from hff_cache.cache import CacheWriter, CacheMeta, EncoderInfo
meta = CacheMeta(encoder=EncoderInfo(name="x", hidden_size=4, num_hidden_states=1), layers=[0])
w = CacheWriter(sys.argv[1], meta, worker=sys.argv[2])
print("locked", flush=True)
time.sleep(120)
"""


def test_same_worker_is_locked_out_and_a_crash_frees_the_lock(tmp_path: Path) -> None:
    from hff_cache.cache import CacheMeta, EncoderInfo

    out = str(tmp_path / "c.zarr")
    meta = CacheMeta(encoder=EncoderInfo(name="x", hidden_size=4, num_hidden_states=1), layers=[0])
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, out, "w000"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(CacheLockedError, match=r"another process with worker label 'w000' \(pid "):
            CacheWriter(out, meta, worker="w000")
        CacheWriter(out, meta, worker="w001").close()  # another shard may write at the same time
        holder.send_signal(signal.SIGKILL)  # a crash: the OS drops the lock, nothing stale is left
        holder.wait(30)
        w = CacheWriter(out, meta, worker="w000")
        w.add("a", np.zeros((1, 3, 4), np.float32))
        w.close()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(30)
    assert CacheReader(out).ids == ["a"] and verify_cache(out).ok

    # Killed during the very first write, only the root's temp file exists: the rerun still starts the cache.
    fresh = tmp_path / "fresh.zarr"
    fresh.mkdir()
    (fresh / "zarr.0123456789abcdef.partial").write_bytes(b'{"zarr_for')
    CacheWriter(str(fresh), meta).close()
    assert len(CacheReader(str(fresh))) == 0


def race_two_extractions(cmd: list[str]) -> None:
    """Start ``cmd`` twice at once: both finish, or one is refused with the lock's message and its fix."""
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    results = [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs, strict=True)]
    assert sorted(rc for rc, _, _ in results) in ([0, 0], [0, 2]), results
    for rc, _, err in results:
        if rc == 2:
            assert "being written by another process with worker label 'w000'" in err
            assert "--shard-index" in err


def test_two_extractions_at_once(corpus: tuple[Path, CacheReader], tmp_path: Path) -> None:
    """Same cache, same worker, started together: one is refused (or both finish); never a corrupt cache.
    (Two shard workers at once: `benchmarks/faults.py`; the lock test above shows w001 is not blocked.)"""
    manifest, ref = corpus
    out = tmp_path / "same.zarr"
    race_two_extractions(_cmd(manifest, out))
    assert verify_cache(str(out)).ok
    extract(_cfg(manifest, out), encoder=tiny_encoder("wav2vec2"))  # a no-op when both finished
    assert_same_cache(out, ref)


def test_two_sharded_extractions_at_once(corpus: tuple[Path, CacheReader], tmp_path: Path) -> None:
    """The same on a sharded cache: the lock still refuses the twin (or both finish), shard objects are never
    corrupted by a second writer, and the result is one extraction's, still sharded."""
    manifest, ref = corpus
    out = tmp_path / "same.zarr"
    start_sharded(out, ref)
    race_two_extractions(_cmd(manifest, out, "--shard-frames", str(SHARD_FRAMES)))
    rep = verify_cache(str(out))
    assert rep.ok and rep.uncommitted_parts == [], [str(p) for p in rep.problems]
    assert_same_cache(out, ref)  # complete already: the winner wrote everything, each utterance once
    assert_sharded(out)
    kept = _committed_files(out)
    extract(_cfg(manifest, out, shard_frames=SHARD_FRAMES), encoder=tiny_encoder("wav2vec2"))  # a no-op
    assert _committed_files(out) == kept


# --- training ---------------------------------------------------------------------------------------------

TEXTS = ["AB", "BA", "ABBA", "BAB", "A B", "BB A"]
TRAIN_ARGS = ["--fusion", "weighted", "--width", "16", "--blocks", "1", "--epochs", "16", "--batch-frames", "150",
              "--threads", "1", "--spec-time-masks", "0", "--seed", "3"]


def _epochs_logged(run: Path) -> int:
    try:
        return max(0, len((run / "log.csv").read_text().splitlines()) - 1)
    except OSError:
        return 0


def test_sigkill_mid_training_then_resume(tmp_path: Path) -> None:
    """`hff-cache train` killed at a random moment after a checkpoint, then `--resume`: the same step count,
    weights and AdamW moments as an uninterrupted run, and every epoch logged once."""
    import torch
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from hff_cache.cli import app
    from hff_cache.testing import tiny_cache

    cache = tiny_cache(tmp_path / "c", [1.0, 1.2, 0.8, 1.5, 1.1, 0.9], TEXTS)
    argv = ["train", "--cache", str(cache), *TRAIN_ARGS]
    full = CliRunner().invoke(app, [*argv, "--out", str(tmp_path / "full")])
    assert full.exit_code == 0, full.output

    run = tmp_path / "killed"
    rng = random.Random(7)
    after = rng.randint(2, 6)  # of 16 epochs
    proc = subprocess.Popen([sys.executable, "-m", "hff_cache", *argv, "--out", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while _epochs_logged(run) < after and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.03))  # anywhere in the next epoch: a step, a checkpoint write
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert not (run / "metrics.json").exists()  # killed mid-run
    resumed = CliRunner().invoke(app, [*argv, "--out", str(run), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "resuming" in resumed.output

    a = json.loads((tmp_path / "full" / "metrics.json").read_text())
    b = json.loads((run / "metrics.json").read_text())
    assert b["steps"] == a["steps"] and b["epochs"] == a["epochs"] == 16
    wa, wb = (load_file(str(r / "checkpoints" / "last.safetensors")) for r in (tmp_path / "full", run))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=1e-5)
    sa, sb = (torch.load(r / "checkpoints" / "last.state.pt", weights_only=True) for r in (tmp_path / "full", run))
    assert sb["step"] == sa["step"]
    for i, st in sa["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(sb["optimizer"]["state"][i][name], st[name], atol=1e-6, rtol=1e-5)
    log = (run / "log.csv").read_text().splitlines()[1:]
    assert [int(line.split(",")[0]) for line in log] == list(range(1, 17))
