"""Which lossless compressor for fp16 feature chunks? Size ratio and decode speed of zstd (the default), zstd at
level 1, lz4 and blosc's lz4/zstd, each with and without a byte shuffle, on real chunks of a cache, side by side.

    python benchmarks/compressors.py --cache runs/real_speech/caches/base/train.zarr --utts 40 --rounds 5

Decode speed counts what a streamed epoch pays on the cores that train (GB of fp16 values out per second, one
thread); the rounds are interleaved and the median kept, so the machine's drift hits every compressor alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numcodecs
import numpy as np

from hff_cache.cache import CacheReader
from hff_cache.cache.format import CHUNK_FRAMES
from hff_cache.runtime.threads import LoadWatch, warn_if_loaded

COMPRESSORS = {
    "zstd 3 (default)": numcodecs.Zstd(3),
    "zstd 1": numcodecs.Zstd(1),
    "lz4": numcodecs.LZ4(1),
    "blosc lz4": numcodecs.Blosc("lz4", 5, numcodecs.Blosc.NOSHUFFLE),
    "blosc zstd 1": numcodecs.Blosc("zstd", 1, numcodecs.Blosc.NOSHUFFLE),
}


def chunks(cache: str, utts: int) -> list[bytes]:
    """Every stored layer of the first ``utts`` utterances, cut into the writer's chunks of rows."""
    r = CacheReader(cache)
    x = np.concatenate(r.read_many(range(min(utts, len(r))), dtype=np.float16))  # (T, L, D)
    return [np.ascontiguousarray(x[lo: lo + CHUNK_FRAMES, j]).tobytes()
            for j in range(x.shape[1]) for lo in range(0, len(x), CHUNK_FRAMES)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True, help="an fp16 cache")
    ap.add_argument("--utts", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    warn_if_loaded()
    raw = chunks(a.cache, a.utts)
    nbytes = sum(map(len, raw))
    shuffle = numcodecs.Shuffle(elementsize=2)
    ways = {(name, shuf): [c.encode(shuffle.encode(b) if shuf else b) for b in raw]
            for name, c in COMPRESSORS.items() for shuf in (False, True)}
    seconds: dict[tuple[str, bool], list[float]] = {w: [] for w in ways}
    with LoadWatch() as watch:
        for _ in range(a.rounds):
            for (name, shuf), encoded in ways.items():
                c, t0 = COMPRESSORS[name], time.perf_counter()
                for e in encoded:
                    d = c.decode(e)
                    if shuf:
                        shuffle.decode(d)
                seconds[(name, shuf)].append(time.perf_counter() - t0)
    print(f"{a.cache}: {len(raw)} chunks of {CHUNK_FRAMES} rows, {nbytes / 2**20:.1f} MiB of fp16 values; "
          f"median of {a.rounds} interleaved rounds, one thread")
    print("| compressor | byte shuffle | size ratio (raw / stored) | decode GB/s |")
    print("|---|---|---:|---:|")
    print("| none (raw chunks) | no | 1.000 | (a copy) |")
    for (name, shuf), encoded in ways.items():
        ratio = nbytes / sum(map(len, encoded))
        speed = nbytes / statistics.median(seconds[(name, shuf)]) / 1e9
        print(f"| {name} | {'yes' if shuf else 'no'} | {ratio:.3f} | {speed:.2f} |")
    print(watch.line())


if __name__ == "__main__":
    main()
