"""Fixtures shared by the tests and by users who want a smoke run without weights:
tiny random-weight encoders of every supported family, synthetic audio, a tiny cache, and a local S3 server
(moto) that counts the requests and bytes a cache's readers and writers send it.

`hff-cache extract --model tiny-random:wav2vec2 ...` uses the same builders.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import soundfile as sf

from hff_cache.encoders.tiny import tiny_encoder


def synthetic_waves(durations: list[float], rate: int = 16000, seed: int = 0) -> list[np.ndarray]:
    """Speech-like test signals: harmonic tones with a moving pitch plus a little noise."""
    rng = np.random.default_rng(seed)
    waves = []
    for d in durations:
        t = np.arange(int(d * rate)) / rate
        f0 = 120 + 60 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t)
        phase = 2 * np.pi * np.cumsum(f0) / rate
        w = sum(np.sin(k * phase) / k for k in range(1, 6)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2)
        waves.append((0.2 * w + 0.01 * rng.standard_normal(t.size)).astype(np.float32))
    return waves


def write_corpus(folder: str | Path, durations: list[float], texts: list[str] | None = None,
                 rate: int = 16000, seed: int = 0) -> Path:
    """Write WAV files and a JSONL manifest (id, audio, text, speaker); return the manifest path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "manifest.jsonl"
    with manifest.open("w", encoding="utf-8") as f:
        for i, w in enumerate(synthetic_waves(durations, rate, seed)):
            utt_id = f"utt{i:03d}"
            sf.write(folder / f"{utt_id}.wav", w, rate)
            text = texts[i] if texts else ""
            row = {"id": utt_id, "audio": f"{utt_id}.wav", "text": text, "speaker": f"spk{i % 2}"}
            f.write(json.dumps(row) + "\n")
    return manifest


def tiny_cache(folder: str | Path, durations: list[float] | None = None, texts: list[str] | None = None,
               family: str = "wav2vec2", codec: str = "fp16", seed: int = 0) -> Path:
    """Make a small corpus and extract it with a tiny random encoder; return the cache path."""
    from hff_cache.config import ExtractConfig
    from hff_cache.extraction.extract import extract

    folder = Path(folder)
    durations = durations or [1.0, 1.5, 0.7, 2.0, 1.2, 0.9]
    manifest = write_corpus(folder / "audio", durations, texts, seed=seed)
    out = folder / "cache.zarr"
    cfg = ExtractConfig(model=f"tiny-random:{family}", data=str(manifest), out=str(out), codec=codec,
                        progress=False, batch_seconds=4.0)
    extract(cfg, encoder=tiny_encoder(family, seed=seed))
    return out


def parts_on_disk(out: str | Path) -> tuple[set[str], int]:
    """(part directories, committed parts) of a local cache as they are on disk right now: what a watcher
    (the fault-injection benchmark and tests) sees while an extraction runs, without opening the cache."""
    import os

    out = Path(out)
    try:
        names = {e.name for e in os.scandir(out / "parts") if e.is_dir()}
    except FileNotFoundError:
        return set(), 0
    committed = 0
    for n in names:
        try:
            doc = json.loads((out / "parts" / n / "zarr.json").read_text())
            committed += doc["attributes"]["committed"] is True
        except (OSError, ValueError, KeyError):
            pass
    return names, committed


def as_older_cache(url: str | Path, drop: tuple[str, ...] = (), drop_codec_params: tuple[str, ...] = ()) -> None:
    """Rewrite a local cache's root record as an older hff-cache wrote it, before ``drop`` (root keys, e.g.
    "layout") and ``drop_codec_params`` (e.g. "deadzone") existed: what the tests of reading and resuming old
    caches start from."""
    import zarr

    from hff_cache.cache.format import ROOT_KEY

    root = zarr.open_group(store=str(url), mode="r+")
    record = {k: v for k, v in dict(root.attrs[ROOT_KEY]).items() if k not in drop}
    codec = record["codec"]
    record["codec"] = {**codec, "params": {k: v for k, v in codec["params"].items() if k not in drop_codec_params}}
    root.attrs[ROOT_KEY] = record


def read_by_threads(reader: Any) -> Any:
    """A copy of ``reader`` whose blocks are read by threads even where its codec's decoder holds the GIL (the
    way before worker processes: what tests and benchmarks compare the processes against)."""
    import copy

    threads = copy.copy(reader)
    threads.codec = copy.copy(reader.codec)
    threads.codec.holds_gil = False
    return threads


def unlabelled(reader: Any) -> SimpleNamespace:
    """TaskData-like for a ``CacheReader``: every utterance, class 0 (what ``CacheBatches`` reads: ids, indices,
    targets), to load or stream a whole cache without a task."""
    return SimpleNamespace(indices=list(range(len(reader))), ids=list(reader.ids), targets=[0] * len(reader))


@dataclass
class S3Server:
    """A running moto S3 server: its endpoint and what it has served since the last ``reset``."""

    endpoint: str
    requests: Counter = field(default_factory=Counter)  # by HTTP method
    bytes_in: int = 0  # request bodies (uploads)
    bytes_out: int = 0  # response bodies (downloads)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def storage_options(self) -> dict[str, str]:
        """fsspec options for ``s3://`` caches on this server (``--storage-option`` key=value pairs)."""
        return {"endpoint_url": self.endpoint, "key": "testing", "secret": "testing"}

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.bytes_in = self.bytes_out = 0

    def make_bucket(self, name: str) -> None:
        import s3fs

        s3fs.S3FileSystem(client_kwargs={"endpoint_url": self.endpoint}, key="testing", secret="testing",
                          skip_instance_cache=True).mkdir(name)


@contextmanager
def s3_server() -> Iterator[S3Server]:
    """A moto S3 server on a free local port (the ``s3`` and ``test`` extras), counting requests and bytes."""
    from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    app = DomainDispatcherApplication(create_backend_app)
    server: S3Server | None = None

    def counted(environ: dict, start_response: object) -> Iterator[bytes]:
        with server.lock:
            server.requests[environ["REQUEST_METHOD"]] += 1
            server.bytes_in += int(environ.get("CONTENT_LENGTH") or 0)
        for chunk in app(environ, start_response):
            with server.lock:
                server.bytes_out += len(chunk)
            yield chunk

    http = make_server("127.0.0.1", 0, counted, True, request_handler=MotoRequestHandler)
    server = S3Server(f"http://127.0.0.1:{http.server_port}")
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        http.shutdown()
        thread.join()
