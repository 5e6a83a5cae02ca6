"""Batches from the cache: coverage, budget, bucketing, block reads, determinism, in-memory == streaming."""

import numpy as np
import pytest
import torch
import zarr

from hff_cache.batches.common import collate_targets
from hff_cache.batches.from_cache import CacheBatches
from hff_cache.cache import CacheReader
from hff_cache.runtime.planning import plan_batches
from hff_cache.tasks.task import Task
from hff_cache.testing import tiny_cache

DURATIONS = [0.5, 1.6, 0.7, 1.2, 0.9, 2.0, 0.6, 1.4, 1.0, 0.8, 1.8, 0.55]
TEXTS = ["AB", "BA", "ABBA", "BAB", "A B", "BB A", "AAB", "B", "ABA", "BBA", "AB BA", "A"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    torch.set_num_threads(1)  # tiny ops: OpenMP threads only add contention on a shared 2-core box
    return tiny_cache(tmp_path_factory.mktemp("loader"), DURATIONS, TEXTS)


@pytest.fixture(scope="module")
def setup(cache):
    reader = CacheReader(cache)
    task = Task.from_labels("asr", reader)
    return reader, task, task.prepare(reader)


def source(setup, **kw):
    reader, _, data = setup
    kw.setdefault("in_memory", False)
    return CacheBatches(reader, data, ctc=True, **kw)


def test_plan_batches_budget_and_sorting():
    lengths = np.array([10, 50, 20, 40, 30, 200])
    batches = plan_batches(range(6), lengths, batch_frames=90, max_utts=3)
    assert sorted(p for b in batches for p in b) == list(range(6))
    for b in batches:
        lens = [lengths[p] for p in b]
        assert lens == sorted(lens)
        assert len(b) <= 3
        assert max(lens) * len(b) <= 90 or len(b) == 1  # an over-long utterance rides alone
    assert [5] in batches


@pytest.mark.parametrize("in_memory", [False, True])
def test_epoch_covers_every_utterance_once(setup, in_memory):
    reader, _, data = setup
    src = source(setup, batch_frames=200, shuffle_frames=150, block_frames=100, in_memory=in_memory)
    seen = []
    for batch in src.epoch(0):
        b, t, L, d = batch.feats.shape
        assert (L, d) == (4, 32)
        assert t == int(batch.lengths.max())
        assert t * b <= 200 or b == 1
        assert batch.targets.shape[0] == b and batch.target_lengths.tolist() == [
            len(data.targets[data.ids.index(u)]) for u in batch.ids]
        for i, uid in enumerate(batch.ids):
            n = int(batch.lengths[i])
            assert n == reader.lengths[reader.index_of(uid)]
            assert torch.all(batch.feats[i, n:] == 0)
        seen += batch.ids
    assert sorted(seen) == sorted(data.ids)
    assert len(src) == len(list(src.epoch(0)))


@pytest.mark.parametrize("loader_thread", [True, False])
def test_features_match_reader_and_memory_equals_streaming(setup, loader_thread):
    reader = setup[0]
    feats = {}
    for in_memory in (False, True):
        src = source(setup, batch_frames=300, in_memory=in_memory, loader_thread=loader_thread)
        for batch in src.epoch(3):
            for i, uid in enumerate(batch.ids):
                n = int(batch.lengths[i])
                feats.setdefault(uid, []).append(batch.feats[i, :n].float().numpy())
    for uid, (streamed, memory) in feats.items():
        ref = reader.read(uid)
        np.testing.assert_array_equal(streamed, ref)  # fp16 codec: float16 in RAM is lossless
        np.testing.assert_array_equal(memory, ref)


def test_shuffle_is_deterministic_per_epoch(setup):
    a = source(setup, batch_frames=150, shuffle_frames=80, block_frames=60, seed=1)
    b = source(setup, batch_frames=150, shuffle_frames=80, block_frames=60, seed=1)
    e0 = [x.ids for x in a.epoch(0)]
    assert e0 == [x.ids for x in b.epoch(0)]
    assert e0 != [x.ids for x in a.epoch(1)]


def test_reads_whole_blocks_not_single_utterances(setup, monkeypatch):
    reader = setup[0]
    calls = []
    real = reader.read_many
    monkeypatch.setattr(reader, "read_many",
                        lambda idx, layers=None, **kw: calls.append(list(idx)) or real(idx, layers, **kw))
    src = source(setup, batch_frames=10_000, block_frames=150)
    list(src.epoch(0))
    assert len(calls) == len(src.blocks) < len(setup[2])
    for idx in calls:  # each call is a contiguous run of utterances
        assert idx == list(range(idx[0], idx[0] + len(idx)))


def test_layer_subset_reads_only_those_layers(setup):
    reader = setup[0]
    src = source(setup, layers=[2], batch_frames=10_000)
    batch = next(iter(src.epoch(0)))
    assert batch.feats.shape[2] == 1
    uid = batch.ids[0]
    np.testing.assert_array_equal(batch.feats[0, : int(batch.lengths[0])].numpy(), reader.read(uid, [2]))


@pytest.mark.parametrize("loader_thread", [True, False])
def test_early_stop_releases_the_producer(setup, loader_thread):
    src = source(setup, batch_frames=60, shuffle_frames=100, block_frames=40, prefetch=1, loader_thread=loader_thread)
    it = src.epoch(0)
    next(it)
    it.close()  # must not hang on the bounded queue, nor leave the read pool running


@pytest.mark.parametrize("loader_thread", [True, False])
def test_producer_errors_reach_the_consumer(setup, monkeypatch, loader_thread):
    reader = setup[0]
    monkeypatch.setattr(reader, "read_many", lambda *a, **k: (_ for _ in ()).throw(OSError("disk gone")))
    with pytest.raises(OSError, match="disk gone"):
        list(source(setup, loader_thread=loader_thread).epoch(0))


def test_the_loader_thread_and_the_inline_loader_give_the_same_batches(setup):
    kw = dict(batch_frames=150, shuffle_frames=80, block_frames=60, seed=2)
    threaded = list(source(setup, loader_thread=True, **kw).epoch(1))
    inline = list(source(setup, loader_thread=False, **kw).epoch(1))
    assert [b.ids for b in threaded] == [b.ids for b in inline]
    for a, b in zip(threaded, inline, strict=True):
        assert torch.equal(a.feats, b.feats) and torch.equal(a.targets, b.targets)


def test_auto_loads_beside_the_step_only_where_it_leaves_a_core_free(setup, monkeypatch):
    import hff_cache.batches.from_cache as loader

    src = source(setup, loader_thread="auto")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(loader, "usable_cpus", lambda: 2)
    assert not src._in_thread()  # the step fills both cores: load between steps
    monkeypatch.setattr(loader, "usable_cpus", lambda: 8)
    assert src._in_thread()
    monkeypatch.setattr(loader, "usable_cpus", lambda: 2)
    src.device = torch.device("cuda")  # the step runs on a GPU: the cores are the loader's
    assert src._in_thread()
    src.device = torch.device("cpu")
    monkeypatch.setattr(src.reader, "url", "s3://bucket/cache.zarr")  # reading is mostly waiting on the network
    assert src._in_thread()


def test_collate_targets():
    t, tl = collate_targets([[1, 2, 3], [4]], ctc=True)
    assert t.tolist() == [[1, 2, 3], [4, 0, 0]] and tl.tolist() == [3, 1]
    t, tl = collate_targets([2, 0], ctc=False)
    assert t.tolist() == [2, 0] and tl is None


def test_windows_are_float16_and_capped_in_bytes(setup, monkeypatch):
    import hff_cache.batches.from_cache as loader

    reader, _, data = setup
    frame_bytes = len(reader.meta.layers) * reader.meta.encoder.hidden_size * 2
    monkeypatch.setattr(loader, "WINDOW_BYTES", 120 * frame_bytes)  # a wide encoder's budget, scaled down
    src = source(setup, shuffle_frames=100_000, block_frames=40, batch_frames=400)
    assert src.shuffle_frames == 120
    plan = src.plan(0)
    assert len(plan) > 1
    for blocks, _ in plan:  # a window closes at the first block that reaches the budget
        assert sum(int(src.lengths[b].sum()) for b in blocks[:-1]) < 120
    batches = list(src.epoch(0))
    assert all(b.feats.dtype == torch.float16 for b in batches)
    assert sum(b.num_frames for b in batches) == src.num_frames == int(src.lengths.sum())
    assert sorted(u for b in batches for u in b.ids) == sorted(data.ids)


# --- a sharded cache --------------------------------------------------------------------------------------

SHARD_CHUNK, SHARD_FRAMES = 16, 64  # 4 inner chunks a shard


@pytest.fixture(scope="module")
def layouts(cache, tmp_path_factory):
    """{codec: (unsharded, sharded) readers} of the tiny cache's values in small chunks and several parts: the
    unsharded fp16 rewrite, and transcodes of it to int8 (a codec with a torch decoder: codes stay resident)."""
    from hff_cache.cache import CacheWriter, transcode_cache

    root = tmp_path_factory.mktemp("loader_sharded")
    tiny = CacheReader(cache)
    flat = str(root / "fp16.zarr")
    with CacheWriter(flat, tiny.meta, chunk_frames=SHARD_CHUNK, part_frames=200) as w:
        for i, x in enumerate(tiny.read_many(range(len(tiny)))):
            w.add(tiny.ids[i], x.transpose(1, 0, 2), text=tiny.texts[i], meta=tiny.metas[i],
                  num_samples=int(tiny.num_samples[i]))
    out = {"fp16": [flat, transcode_cache(flat, root / "fp16-sharded.zarr", "fp16", shard_frames=SHARD_FRAMES)]}
    out["int8"] = [transcode_cache(flat, root / f"int8-{n}.zarr", "int8", shard_frames=n) for n in (0, SHARD_FRAMES)]
    readers = {}
    for name, (a, b) in out.items():
        for s in (a, b):
            assert isinstance(s, str) or s["ok"], s["problems"]
        ra, rb = (CacheReader(s if isinstance(s, str) else s["dst"]) for s in (a, b))
        assert ra.meta.layout == {"chunk_frames": SHARD_CHUNK, "shard_frames": 0}
        assert rb.meta.layout == {"chunk_frames": SHARD_CHUNK, "shard_frames": SHARD_FRAMES}
        assert len(ra.parts()) > 1 and ra.ids == rb.ids == tiny.ids
        part = rb.parts()[0]
        arr = zarr.open_array(store=rb.url, path=f"parts/{part.part_id}/layer_00", mode="r")
        assert arr.shards == (SHARD_FRAMES, 32) and arr.chunks == (SHARD_CHUNK, 32)
        assert arr.shape[0] > SHARD_FRAMES  # a part spans several shards
        readers[name] = (ra, rb)
    return readers


@pytest.mark.parametrize(("codec", "in_memory"), [("fp16", False), ("fp16", True), ("int8", False), ("int8", True)])
def test_sharded_cache_gives_the_same_batches(layouts, codec, in_memory):
    """Training reads a sharded cache exactly as the unsharded one: the same batches, bit for bit, streamed and
    resident (int8 in RAM: its stored codes, decoded by torch)."""
    sources = []
    for reader in layouts[codec]:
        data = Task.from_labels("asr", reader).prepare(reader)
        sources.append(CacheBatches(reader, data, ctc=True, in_memory=in_memory, batch_frames=150,
                                    shuffle_frames=120, block_frames=50, seed=5, num_workers=2))
    flat, sharded = sources
    if in_memory:
        assert flat.resident == sharded.resident == ("codes" if codec == "int8" else "fp16")
    assert [b.tolist() for b in sharded.blocks] == [b.tolist() for b in flat.blocks] and len(flat.blocks) > 4
    for epoch in (0, 1):
        got, want = list(sharded.epoch(epoch)), list(flat.epoch(epoch))
        assert len(got) == len(want) > 1
        for g, w in zip(got, want, strict=True):
            assert g.ids == w.ids
            assert torch.equal(g.lengths, w.lengths)
            assert torch.equal(g.targets, w.targets) and torch.equal(g.target_lengths, w.target_lengths)
            assert g.feats.dtype == w.feats.dtype == torch.float16 and g.feats.shape == w.feats.shape
            assert torch.equal(g.feats.view(torch.int16), w.feats.view(torch.int16))  # bit for bit
        assert sorted(u for b in got for u in b.ids) == sorted(layouts[codec][0].ids)
    # and the values are the cache's (not equally wrong on both sides)
    reader = layouts[codec][1]
    b = got[0]
    np.testing.assert_array_equal(b.feats[0, : int(b.lengths[0])].numpy(),
                                  reader.read(b.ids[0]).astype(np.float16))
