"""A cache on an object store: requests and bytes per training epoch, against a local moto S3 server.

A local cache is copied to ``s3://`` with ``hff-cache transcode`` (same codec unless ``--codec``), then one
streamed epoch of batches (``training.cached.prepare`` with ``--in-memory false``: the loader's block reads, as a
training run does them) is read from it, and the server counts what it served: GET/HEAD/PUT requests, bytes out,
against the bytes the epoch's frames occupy. moto answers from local RAM, so the times are not a network's; the
request counts and bytes are what a real bucket would bill and wait for.

    python benchmarks/object_store.py --cache runs/real_speech/caches/tiny.en/valid.zarr --codec int8 \
        --shard-frames 32768

Writes docs/results/object_store.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(cache: str, codec: str | None, batch_frames: int, shard_frames: int = 0) -> dict:
    from hff_cache.cache import CacheReader
    from hff_cache.cache.transcode import transcode_cache
    from hff_cache.config import TrainConfig
    from hff_cache.testing import s3_server
    from hff_cache.training.cached import prepare

    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    local = CacheReader(cache)
    with s3_server() as server:
        bucket = f"bench-{shard_frames}"  # one bucket per layout: moto's state outlives a server
        server.make_bucket(bucket)
        url = f"s3://{bucket}/cache.zarr"
        t0 = time.perf_counter()
        transcode_cache(cache, url, codec or local.meta.codec.name, codec_params=None if codec else
                        dict(local.meta.codec.params), storage_options=server.storage_options,
                        shard_frames=shard_frames)
        upload = {"seconds": time.perf_counter() - t0, "requests": dict(server.requests), "bytes": server.bytes_in}
        cfg = TrainConfig(cache=url, out=str(ROOT / "runs" / "bench_object_store"), in_memory="false",
                          storage_options=server.storage_options, batch_frames=batch_frames, num_workers=2)
        setup = prepare(cfg, log=lambda m: print(m, file=sys.stderr))
        server.reset()
        t0 = time.perf_counter()
        frames = sum(b.num_frames for b in setup.train.epoch(0))
        epoch_s = time.perf_counter() - t0
        remote = CacheReader(url, storage_options=server.storage_options)
        info = remote.info()
        return {"cache": cache, "shard_frames": int(remote.meta.layout.get("shard_frames", 0)),
                "codec": info["codec"], "utterances": len(setup.train.data), "frames": frames,
                "stored_bytes": info.get("bytes"), "epoch_requests": dict(server.requests),
                "epoch_bytes": server.bytes_out, "epoch_s": epoch_s, "upload": upload}


def render(rows: list[dict], cmd: str) -> str:
    row = rows[0]
    lines = ["## A cache on an object store: one epoch's requests and bytes", "", f"`{cmd}`", "",
             f"{time.strftime('%Y-%m-%d')}. `{row['cache']}` ({row['codec']['name']}, {row['utterances']} "
             f"utterances, {row['frames']:,} frames) copied to a local moto S3 server with `hff-cache transcode`, "
             "then one streamed epoch read through the training loader. moto serves from RAM: request counts and "
             "bytes are what a bucket would bill; the seconds are not a network's. One row per layout: "
             "unsharded (one object per 2048-frame chunk of a layer) and sharded (`shard_frames` frames of a "
             "layer per object; zarr reads a shard's index, then byte ranges of its chunks).", "",
             "| layout | | requests | GET | bytes | bytes / stored | frames per GET | stored bytes | seconds |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines += _rows(r)
    return "\n".join(lines) + "\n"


def _rows(row: dict) -> list[str]:
    """The epoch's and the upload's line of one layout."""
    layout = f"sharded, {row['shard_frames']:,} frames" if row["shard_frames"] else "unsharded"
    gets = row["epoch_requests"].get("GET", 0)
    total = sum(row["epoch_requests"].values())
    stored = row["stored_bytes"]
    ratio = f"{row['epoch_bytes'] / stored:.2f}" if stored else "n/a"
    up = row["upload"]
    return [f"| {layout} | one epoch | {total:,} | {gets:,} | {row['epoch_bytes']:,} | {ratio} | "
            f"{row['frames'] / max(gets, 1):,.0f} | {stored:,} | {row['epoch_s']:.1f} |",
            f"| {layout} | the upload (transcode) | {sum(up['requests'].values()):,} | "
            f"{up['requests'].get('GET', 0):,} | {up['bytes']:,} | | | | {up['seconds']:.1f} |"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", required=True, help="a local cache to copy to the S3 server")
    p.add_argument("--codec", help="transcode to this codec on the way (default: the cache's own)")
    p.add_argument("--batch-frames", type=int, default=10_000)
    p.add_argument("--shard-frames", type=int, default=0,
                   help="also measure a sharded copy with this many frames per shard (0: unsharded only)")
    p.add_argument("--doc", default=str(ROOT / "docs" / "results" / "object_store.md"))
    a = p.parse_args()
    rows = []
    for n in dict.fromkeys([0, a.shard_frames]):  # unsharded, then sharded
        rows.append(measure(a.cache, a.codec, a.batch_frames, n))
        print(json.dumps(rows[-1]), flush=True)
    md = render(rows, "python benchmarks/object_store.py " + " ".join(sys.argv[1:]))
    Path(a.doc).write_text(md)
    print(md)


if __name__ == "__main__":
    main()
