"""How much of each stored hidden state does the one below it predict, and what is left to code?

For every stored state of a cache: a least-squares linear map (with bias) from the state below, fitted on one
half of --utts utterances and scored on the other half (the share of the state's variance it leaves), and the
Gaussian rate-distortion bound (reverse water-filling over the variances of the state's time-DCT x PCA
coefficients, tpca's transform) of the state itself and of that residual, at 1.5, 2 and 3 bits a value,
relative to the state's variance. The case for `tpcap` (docs/results.md, "Cache v2"):

    python benchmarks/interlayer.py --cache runs/real_speech/caches/tiny.en/valid.zarr
"""

from __future__ import annotations

import argparse

import numpy as np

from hff_cache.cache import CacheReader
from hff_cache.cache.codecs.tpca import dct_matrix, frame_layout

GROUP = 4  # tpca's default group of frames


def frames(reader: CacheReader, idx: list[int]) -> tuple[np.ndarray, np.ndarray]:
    arrs = reader.read_many(idx)
    starts = np.cumsum([0] + [len(a) for a in arrs[:-1]]).astype(np.int64)
    return np.concatenate(arrs).astype(np.float64), starts


def coefficient_variances(z: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Variances of the DCT-over-GROUP-frames x PCA coefficients of ``z`` (frames, D), flattened."""
    _, rot = np.linalg.eigh(np.cov(z.T))
    coef = (z - z.mean(0)) @ rot
    first, _ = frame_layout(starts, len(z), GROUP)
    groups = coef[first[:, None] + np.arange(GROUP)]
    return np.mean(np.einsum("kn,gnd->gkd", dct_matrix(GROUP).astype(np.float64), groups) ** 2, axis=0).ravel()


def distortion(lam: np.ndarray, rate: float) -> float:
    """Gaussian reverse water-filling: mean distortion per coefficient at ``rate`` bits per coefficient."""
    lo, hi = 1e-12, float(lam.max())
    for _ in range(200):
        theta = np.sqrt(lo * hi)
        if np.mean(np.maximum(0, 0.5 * np.log2(lam / theta))) > rate:
            lo = theta
        else:
            hi = theta
    return float(np.mean(np.minimum(theta, lam)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", required=True)
    p.add_argument("--utts", type=int, default=300, help="utterances, spread over the cache: half fit, half score")
    a = p.parse_args()
    r = CacheReader(a.cache)
    spread = np.linspace(0, len(r) - 1, min(a.utts, len(r))).round().astype(int)
    (xf, sf), (xe, _) = frames(r, list(spread[1::2])), frames(r, list(spread[0::2]))
    print("| state | predicted by the state below | bound at 1.5 / 2 / 3 bits, the state | the residual, 2 bits |")
    print("|---|---:|---|---:|")
    for j, k in enumerate(r.layers):
        lam = coefficient_variances(xf[:, j], sf)
        bounds = " / ".join(f"{distortion(lam, b) / lam.mean():.4f}" for b in (1.5, 2.0, 3.0))
        shared, residual = "", ""
        if j:
            fit_in = np.c_[xf[:, j - 1], np.ones(len(xf))]
            weights, *_ = np.linalg.lstsq(fit_in, xf[:, j], rcond=None)
            left = xe[:, j] - np.c_[xe[:, j - 1], np.ones(len(xe))] @ weights
            shared = f"{1 - np.mean(left ** 2) / np.mean((xe[:, j] - xf[:, j].mean(0)) ** 2):.1%}"
            lam_r = coefficient_variances(xf[:, j] - fit_in @ weights, sf)
            residual = f"{distortion(lam_r, 2.0) / lam.mean():.4f}"
        print(f"| h{k} | {shared} | {bounds} | {residual} |", flush=True)


if __name__ == "__main__":
    main()
