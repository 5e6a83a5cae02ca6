"""DDP training under torchrun (hff_cache.distributed + train.fit): shares, lock-step, equality, resume."""

from __future__ import annotations

import csv
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hff_cache.batches.from_cache import CacheBatches
from hff_cache.cache import CacheReader
from hff_cache.config import TrainConfig
from hff_cache.model.fusion import FusionConfig
from hff_cache.runtime.distributed import Dist, balanced_assignment, lockstep
from hff_cache.tasks.task import Task
from hff_cache.testing import tiny_cache
from hff_cache.training.cached import train

DURATIONS = [1.0, 1.6, 0.7, 2.1, 1.3, 0.9, 1.8]
TEXTS = ["a cab", "bad dog", "go", "a big red dog", "bed cab", "dab", "good egg"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tiny_cache(tmp_path_factory.mktemp("ddp"), DURATIONS, TEXTS)


def test_balanced_assignment_is_complete_disjoint_and_balanced() -> None:
    rng = np.random.default_rng(0)
    weights = rng.uniform(1, 20, size=101).tolist()
    for parts in (1, 2, 3, 8):
        owner = balanced_assignment(weights, parts)
        loads = [sum(w for w, o in zip(weights, owner, strict=True) if o == p) for p in range(parts)]
        assert sorted(set(owner)) == list(range(parts))
        assert max(loads) - min(loads) <= max(weights)  # greedy longest-first bound
        assert owner == balanced_assignment(weights, parts)  # deterministic


def _epoch_ids(src: CacheBatches, epoch: int) -> list[str]:
    return [uid for batch in src.epoch(epoch) for uid in batch.ids]


@pytest.mark.parametrize("in_memory", [False, True])
def test_rank_shares_cover_every_utterance_once_per_epoch(cache: Path, in_memory: bool) -> None:
    reader = CacheReader(str(cache))
    data = Task.from_labels("asr", reader, None).prepare(reader, None, "train")
    common = dict(ctc=True, batch_frames=150, shuffle=True, seed=3, in_memory=in_memory, block_frames=60)
    for world in (2, 3):
        shares = [CacheBatches(reader, data, rank=r, world_size=world, **common) for r in range(world)]
        for epoch in (0, 1):
            seen = [_epoch_ids(s, epoch) for s in shares]
            flat = [u for ids in seen for u in ids]
            assert sorted(flat) == sorted(reader.ids), (world, epoch)  # all of them, no duplicates
            assert all(seen), "every rank gets work"
        # a share is fixed across epochs (so --in-memory holds only it) and its features are the cache's
        assert set(_epoch_ids(shares[0], 0)) == set(_epoch_ids(shares[0], 1))
        batch = next(iter(shares[1].epoch(0)))
        i = reader.index_of(batch.ids[0])
        np.testing.assert_allclose(batch.feats[0, : batch.lengths[0]].float().numpy(),
                                   reader.read_many([i])[0].astype(np.float32), atol=1e-3)


def test_lockstep_single_process_passes_batches_through() -> None:
    batches = [[1, 2], [3]]
    assert list(lockstep(batches, Dist())) == [([1, 2], 1.0), ([3], 1.0)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Deterministic recipe: no dropout or SpecAugment (their masks are drawn per rank), constant LR.
RECIPE = ["--fusion", "hierarchical", "--width", "32", "--dropout", "0", "--spec-time-masks", "0",
          "--lr-schedule", "constant", "--warmup-steps", "0", "--lr", "3e-3", "--threads", "1", "--seed", "0",
          "--in-memory", "true"]


def _torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "hff_cache", "train", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _log_rows(run: Path) -> list[dict[str, str]]:
    with (run / "log.csv").open() as f:
        return list(csv.DictReader(f))


def test_two_process_ddp_equals_single_process_and_resumes(cache: Path, tmp_path: Path) -> None:
    """One batch per rank per step (the whole share), so each global step is the whole corpus: 2 DDP
    processes must follow the single process's trajectory. The shares are uneven (4 vs 3 utterances), so a
    wrong weighting of the ranks' losses would change the gradient's direction, not only its size."""
    big = ["--batch-frames", "100000", "--max-batch-utts", "64"]
    ddp = tmp_path / "ddp"
    _torchrun(["--cache", str(cache), "--valid-cache", str(cache), "--out", str(ddp), "--epochs", "2",
               *RECIPE, *big])
    _torchrun(["--cache", str(cache), "--valid-cache", str(cache), "--out", str(ddp), "--epochs", "3", "--resume",
               *RECIPE, *big])
    single = tmp_path / "single"
    cfg = TrainConfig(cache=str(cache), valid_cache=str(cache), out=str(single), epochs=3, lr=3e-3,
                      lr_schedule="constant", warmup_steps=0, batch_frames=100000, max_batch_utts=64,
                      spec_time_masks=0, seed=0, threads=1, in_memory="true",
                      fusion=FusionConfig(kind="hierarchical", width=32, dropout=0.0))
    train(cfg, log=lambda _: None)

    a, b = load_file(str(ddp / "checkpoints/last.safetensors")), load_file(str(single / "checkpoints/last.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4, msg=k)
    rows_ddp, rows_single = _log_rows(ddp), _log_rows(single)
    assert [r["step"] for r in rows_ddp] == [r["step"] for r in rows_single] == ["1", "2", "3"]
    for r, s in zip(rows_ddp, rows_single, strict=True):  # the logged loss is the global batch's mean
        assert float(r["train_loss"]) == pytest.approx(float(s["train_loss"]), rel=1e-4)
        assert r["train_utterances"] == s["train_utterances"] == str(len(DURATIONS))
        assert r["cer"] == s["cer"]  # validation pooled from both ranks' shares
    m = json.loads((ddp / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["epochs"] == 3 and m["steps"] == 3


def test_two_process_ddp_with_uneven_batch_counts(cache: Path, tmp_path: Path) -> None:
    """Small batches: the ranks' shares cut into different numbers of batches; the lock-step repeats a
    weight-0 batch on the rank that ran out, so every utterance is still seen exactly once per epoch."""
    run = tmp_path / "uneven"
    proc = _torchrun(["--cache", str(cache), "--out", str(run), "--epochs", "2", *RECIPE,
                      "--batch-frames", "100000", "--max-batch-utts", "1"])
    assert "torchrun: 2 ranks (gloo)" in proc.stderr
    counts = [int(c) for c in re.search(r"batches per rank \[(\d+), (\d+)\]", proc.stderr).groups()]
    assert counts[0] != counts[1]  # the case under test really happened
    rows = _log_rows(run)
    assert [r["train_utterances"] for r in rows] == [str(len(DURATIONS))] * 2
    assert int(rows[-1]["step"]) == 2 * max(counts)
    assert proc.stderr.count("epoch 2 step") == 1  # one voice: rank 0 logs, rank 1 does not


def test_two_process_online_adapters(cache: Path, tmp_path: Path) -> None:
    """Online mode under torchrun: each rank loads only its share of the audio; the encoder's adapters
    are trained through DDP like the fusion."""
    manifest = cache.parent / "audio" / "manifest.jsonl"
    run = tmp_path / "online"
    _torchrun(["--online", "--model", "tiny-random:wav2vec2", "--data", str(manifest), "--valid-data", str(manifest),
               "--method", "hff-adapters", "--bottleneck", "8", "--out", str(run), "--epochs", "2",
               "--batch-seconds", "3", *RECIPE[:-2]])
    rows = _log_rows(run)
    assert [r["train_utterances"] for r in rows] == [str(len(DURATIONS))] * 2
    m = json.loads((run / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["trainable_encoder_params"] > 0
    assert load_file(str(run / "checkpoints/last.safetensors"))  # adapters + fusion + head, written once
