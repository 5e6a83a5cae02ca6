"""Scale-out: sharded extraction under torchrun, per-shard completion records, S3 (moto) extract + train."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hff_cache.cache import CacheReader, verify_cache
from hff_cache.config import ExtractConfig
from hff_cache.encoders.tiny import tiny_encoder
from hff_cache.extraction.extract import extract
from hff_cache.testing import write_corpus

DURATIONS = [1.3, 0.45, 2.1, 0.9, 1.7, 0.6, 1.1, 0.8]
TEXTS = ["AB", "BA", "ABBA", "BAB", "A B", "BB A", "AAB", "B"]
MODEL = "tiny-random:wav2vec2"  # what load_encoder builds for the CLI; tiny_encoder("wav2vec2") in-process


def _cfg(manifest: Path | str, out: str, **kw) -> ExtractConfig:
    base = dict(model=MODEL, data=str(manifest), out=str(out), progress=False, batch_seconds=4.0)
    return ExtractConfig(**{**base, **kw})


def _same_features(a: CacheReader, b: CacheReader) -> None:
    assert sorted(a.ids) == sorted(b.ids) and len(set(a.ids)) == len(a.ids)
    for uid in a.ids:
        x, y = a.read(uid), b.read(uid)
        assert x.shape == y.shape
        # Other batch-mates change only float rounding (masked batching); both are then stored as fp16.
        np.testing.assert_allclose(x, y, atol=2e-3, rtol=1e-3)
        assert a.texts[a.index_of(uid)] == b.texts[b.index_of(uid)]


class _FailingEncoder(torch.nn.Module):
    """Wraps an encoder and dies on its n-th batch, like a crash or a kill mid-run."""

    def __init__(self, inner: torch.nn.Module, fail_at: int) -> None:
        super().__init__()
        self.inner, self.fail_at, self.calls = inner, fail_at, 0
        self.info, self.num_hidden_states = inner.info, inner.num_hidden_states
        self.prepare = inner.prepare

    def forward(self, batch, layers=None):  # noqa: ANN001, ANN201 - the SpeechEncoder call signature
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("simulated crash")
        return self.inner(batch, layers)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CacheReader]:
    """Manifest + the single-process cache every sharded variant must equal."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("scale")
    manifest = write_corpus(root / "audio", DURATIONS, TEXTS)
    single = root / "single.zarr"
    extract(_cfg(manifest, str(single)), encoder=tiny_encoder("wav2vec2"))
    return manifest, CacheReader(str(single))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_equal_single_process(corpus, tmp_path: Path) -> None:
    manifest, single = corpus
    out = tmp_path / "ddp.zarr"
    # torchrun's own module, so the test needs no console script on PATH (CI calls .venv/bin/python).
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [*torchrun, "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "hff_cache", "extract", "--model", MODEL,
           "--data", str(manifest), "--out", str(out), "--batch-seconds", "4", "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sharded = CacheReader(str(out))
    # Each rank wrote only its own parts: workers w000 and w001, utterances split between them.
    workers = {p.worker for p in sharded.parts()}
    assert workers == {"w000", "w001"}
    _same_features(sharded, single)
    info = sharded.info()
    assert info["complete"] is True and info["num_shards"] == 2 and info["shards_done"] == 2
    records = {r["shard_index"]: r for r in sharded.shard_records()}
    assert sum(r["utterances"] for r in records.values()) == len(DURATIONS)
    assert records[0]["dataset_fingerprint"] == records[1]["dataset_fingerprint"]
    assert verify_cache(str(out)).ok  # shards/ is part of the format, not a stray name


def test_missing_or_killed_shard_is_incomplete_until_rerun(corpus, tmp_path: Path) -> None:
    manifest, single = corpus
    out = str(tmp_path / "c.zarr")
    extract(_cfg(manifest, out, num_shards=2, shard_index=1, part_frames=40), encoder=tiny_encoder("wav2vec2"))
    info = CacheReader(out).info()  # shard 0 has not run yet
    assert (info["complete"], info["shards_done"], info["shards_missing"]) == (False, 1, [0])
    broken = _FailingEncoder(tiny_encoder("wav2vec2"), fail_at=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        extract(_cfg(manifest, out, num_shards=2, shard_index=0, part_frames=40), encoder=broken)
    partial = CacheReader(out)
    assert 0 < len(partial) < len(DURATIONS)  # committed parts of the killed shard are visible...
    assert partial.info()["complete"] is False  # ...but the cache is not complete
    report = extract(_cfg(manifest, out, num_shards=2, shard_index=0, part_frames=40),
                     encoder=tiny_encoder("wav2vec2"))  # rerun of that shard alone
    assert report.already_done > 0 and report.extracted == report.total - report.already_done
    done = CacheReader(out)
    assert done.info()["complete"] is True
    _same_features(done, single)
    # Killed between its last commit and its record: the rerun is a no-op (no model loaded) that records.
    (tmp_path / "c.zarr" / "shards" / "w000.json").unlink()
    assert CacheReader(out).info()["complete"] is False
    again = extract(_cfg(manifest, out, num_shards=2, shard_index=0))
    assert again.extracted == 0 and CacheReader(out).info()["complete"] is True


# --- object storage (moto's S3 server on loopback) --------------------------------------------------------


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    port = _free_port()
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        import s3fs

        endpoint = f"http://127.0.0.1:{port}"
        s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, key="testing", secret="testing",
                          skip_instance_cache=True).mkdir("hff-scale")
        yield {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
    finally:
        server.stop()


def test_s3_interrupted_extract_resumes_and_trains(corpus, s3, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from hff_cache.cli import app

    manifest, single = corpus
    url = "s3://hff-scale/caches/tiny"
    kw = dict(part_frames=40, storage_options=s3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        extract(_cfg(manifest, url, **kw), encoder=_FailingEncoder(tiny_encoder("wav2vec2"), fail_at=3))
    partial = CacheReader(url, storage_options=s3)
    assert 0 < len(partial) < len(DURATIONS) and partial.info()["complete"] is False
    report = extract(_cfg(manifest, url, **kw), encoder=tiny_encoder("wav2vec2"))
    assert report.already_done == len(partial) and report.extracted == len(DURATIONS) - len(partial)
    remote = CacheReader(url, storage_options=s3)
    _same_features(remote, single)
    opts = [a for k, v in s3.items() for a in ("--storage-option", f"{k}={v}")]
    cli = CliRunner()
    got = cli.invoke(app, ["info", url, "--json", *opts])
    assert got.exit_code == 0, got.output
    assert json.loads(got.output)["complete"] is True
    # A short training run reading the bucket (train and validation from the same cache).
    run = tmp_path / "run"
    got = cli.invoke(app, ["train", "--cache", url, "--valid-cache", url, "--out", str(run), "--fusion", "weighted",
                           "--width", "32", "--blocks", "1", "--epochs", "1", "--batch-frames", "400",
                           "--threads", "1", "--num-workers", "1", "--spec-time-masks", "0", *opts])
    assert got.exit_code == 0, got.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["cache_id"] == single.cache_id and metrics["epochs"] == 1
    saved = json.loads((run / "config.json").read_text())["config"]["storage_options"]
    assert saved == {"endpoint_url": s3["endpoint_url"], "key": "<redacted>", "secret": "<redacted>"}
