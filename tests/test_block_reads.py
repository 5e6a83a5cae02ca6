"""Reading many blocks at once: processes for a codec whose decoder holds the GIL (the entropy-coded ones),
threads otherwise; the same arrays in the same order either way, and a worker's error reaches the caller."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch

from hff_cache.batches.from_cache import CacheBatches
from hff_cache.cache import CacheReader, transcode_cache
from hff_cache.cache.block_reads import read_blocks, uses_processes
from hff_cache.tasks.task import Task
from hff_cache.testing import read_by_threads, tiny_cache

DURATIONS = [0.5, 1.6, 0.7, 1.2, 0.9, 2.0, 0.6, 1.4, 1.0, 0.8]
TEXTS = ["AB", "BA", "ABBA", "BAB", "A B", "BB A", "AAB", "B", "ABA", "BBA"]
BLOCKS = [[0, 1, 2], [3], [4, 5, 6, 7], [8, 9]]


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("block_reads")
    fp16 = tiny_cache(root, DURATIONS, TEXTS)
    out = {"fp16": str(fp16)}
    for name in ("tpcae", "tpcape"):
        summary = transcode_cache(str(fp16), str(root / f"{name}.zarr"), name)
        assert summary["ok"], summary["problems"]
        out[name] = summary["dst"]
    return out


def test_only_a_gil_holding_codec_with_several_workers_and_blocks_uses_processes(caches: dict[str, str]) -> None:
    ans, fp16 = CacheReader(caches["tpcape"]), CacheReader(caches["fp16"])
    assert ans.codec.holds_gil and not fp16.codec.holds_gil
    assert uses_processes(ans, 2, 4)
    assert not uses_processes(ans, 1, 4) and not uses_processes(ans, 2, 1) and not uses_processes(fp16, 2, 4)


@pytest.mark.parametrize("name", ["fp16", "tpcape"])
@pytest.mark.parametrize("workers", [1, 2])
def test_blocks_read_the_same_in_order_by_threads_or_processes(caches: dict[str, str], name: str,
                                                               workers: int) -> None:
    r = CacheReader(caches[name])
    layers = [0, 2]
    got = list(read_blocks(r, BLOCKS, layers, codes=False, workers=workers))
    assert len(got) == len(BLOCKS)
    for ids, arrays in zip(BLOCKS, got, strict=True):
        want = r.read_many(ids, layers, dtype=np.float16)
        assert len(arrays) == len(want)
        for a, b in zip(arrays, want, strict=True):
            np.testing.assert_array_equal(a, b)
    codes = list(read_blocks(r, BLOCKS, None, codes=True, workers=workers))
    for ids, stored in zip(BLOCKS, codes, strict=True):
        for a, b in zip(stored, r.read_codes(ids), strict=True):
            assert a.rows.keys() == b.rows.keys()
            for key in a.rows:
                np.testing.assert_array_equal(a.rows[key], b.rows[key])


def test_a_damaged_chunk_read_in_a_worker_process_names_the_damage(caches: dict[str, str], tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "broken.zarr"
    shutil.copytree(caches["tpcae"], broken)
    chunk = next(p for p in sorted(broken.glob("parts/*/layer_01/c/**/*")) if p.is_file())
    chunk.write_bytes(chunk.read_bytes()[:-3])  # no longer a whole number of 32-bit ANS words
    r = CacheReader(str(broken))
    assert uses_processes(r, 2, len(BLOCKS))
    with pytest.raises(ValueError, match="damaged"):
        list(read_blocks(r, BLOCKS, None, codes=False, workers=2))


def test_an_entropy_coded_cache_gives_the_same_epoch_by_processes_or_threads(caches: dict[str, str]) -> None:
    """A tpcape cache streamed and loaded (as codes and as float16) by worker processes, against the same cache
    streamed by threads: the batches are equal bit for bit."""
    torch.set_num_threads(1)
    r = CacheReader(caches["tpcape"])
    data = Task.from_labels("asr", r).prepare(r)
    kw = dict(ctc=True, batch_frames=200, shuffle_frames=150, block_frames=100, num_workers=2)
    sources = [CacheBatches(r, data, in_memory=True, **kw),
               CacheBatches(r, data, in_memory=True, resident="fp16", **kw),
               CacheBatches(r, data, in_memory=False, **kw)]
    by_threads = CacheBatches(read_by_threads(r), data, in_memory=False, **kw)
    assert uses_processes(r, 2, len(by_threads.blocks)) and len(by_threads.blocks) > 1
    assert not uses_processes(by_threads.reader, 2, len(by_threads.blocks))
    want = list(by_threads.epoch(1))
    assert sources[0].resident == "codes" and len(want) > 1
    for src in sources:
        got = list(src.epoch(1))
        assert [b.ids for b in got] == [b.ids for b in want]
        assert all(torch.equal(a.feats, b.feats) for a, b in zip(got, want, strict=True))


def test_a_streamed_epoch_stopped_early_shuts_its_worker_processes_down(caches: dict[str, str]) -> None:
    r = CacheReader(caches["tpcape"])
    data = Task.from_labels("asr", r).prepare(r)
    src = CacheBatches(r, data, ctc=True, batch_frames=200, shuffle_frames=150, block_frames=100, num_workers=2,
                       in_memory=False, loader_thread=False)
    before = set(multiprocessing.active_children())
    batches = src.epoch(0)
    next(batches)
    assert set(multiprocessing.active_children()) - before  # the epoch's reading processes
    batches.close()
    assert not set(multiprocessing.active_children()) - before


SCRIPT_WITHOUT_MAIN_GUARD = """
import sys
import numpy as np
from hff_cache.cache import CacheReader
from hff_cache.cache.block_reads import read_blocks

r = CacheReader(sys.argv[1])
blocks = [[0, 1, 2], [3], [4, 5, 6, 7], [8, 9]]
got = list(read_blocks(r, blocks, None, codes=False, workers=2))
for ids, arrays in zip(blocks, got):
    for a, b in zip(arrays, r.read_many(ids, dtype=np.float16)):
        assert np.array_equal(a, b)
print("read", sum(map(len, got)), "utterances")
"""


def test_a_script_without_a_main_guard_still_reads_by_threads_and_says_why(caches: dict[str, str],
                                                                           tmp_path: Path) -> None:
    """A spawned worker re-imports the script; without `if __name__ == "__main__":` it cannot start. The reads
    fall back to threads with a warning that names the fix, and nothing read is lost."""
    import subprocess
    import sys

    script = tmp_path / "no_guard.py"
    script.write_text(SCRIPT_WITHOUT_MAIN_GUARD)
    done = subprocess.run([sys.executable, str(script), caches["tpcape"]], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == f"read {len(DURATIONS)} utterances"
    assert "read by threads instead" in done.stderr and '__name__ == "__main__"' in done.stderr
