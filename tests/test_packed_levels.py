"""Bit-packed levels (compressed residency of the entropy-coded codecs): what is gathered equals what was put."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from hff_cache.batches.packed_levels import PackedLevels, choose_widths


def laplace_levels(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """Columns from wide to always 0 (as tpcae deals them), a few huge outliers, both int16 extremes."""
    spread = 4.0 * np.exp(-np.arange(dim) / (dim / 6))
    levels = np.rint(rng.laplace(size=(n, dim)) * spread).astype(np.int16)
    levels[:, -3:] = 0
    hits = rng.integers(0, n, 40), rng.integers(0, dim, 40)
    levels[hits] = rng.integers(-30000, 30000, 40)
    levels[0, 0], levels[1, 1] = -(2**15), 2**15 - 1
    return levels


def test_gathered_rows_equal_the_levels_put_in_blocks_from_threads() -> None:
    rng = np.random.default_rng(0)
    levels = laplace_levels(rng, 3000, 48)
    packed = PackedLevels(len(levels), 48)
    edges = [0, 700, 1100, 1900, 2600, 3000]
    packed[edges[0]:edges[1]] = levels[edges[0]:edges[1]]  # the first block chooses the widths
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda k: packed.__setitem__(slice(edges[k], edges[k + 1]), levels[edges[k]:edges[k + 1]]),
                      range(1, len(edges) - 1)))
    for rows in (rng.permutation(3000)[:900], np.arange(3000), np.array([1, 1, 0, 2999]), np.zeros(0, np.int64)):
        got = packed[rows]
        assert got.dtype == np.int16 and got.shape == (len(rows), 48)
        np.testing.assert_array_equal(got, levels[rows])
    assert packed.nbytes < 0.5 * levels.nbytes  # int16 would be 2 bytes a value


def test_widths_follow_the_spread_and_rare_large_values_become_outliers() -> None:
    rng = np.random.default_rng(1)
    levels = laplace_levels(rng, 2000, 32)
    zig = np.where(levels >= 0, 2 * levels.astype(np.int64), -2 * levels.astype(np.int64) - 1)
    widths = choose_widths(zig.astype(np.uint32))
    assert widths[0] > widths[len(widths) // 2] >= widths[-4] and np.all(widths[-3:] == 0)
    assert widths.max() < 16  # the int16 extremes are two outliers, not a 16-bit column
    # each width is the cheapest: one bit more or less stores its column in no fewer bits
    for c, w in enumerate(widths):
        def cost(width: int, col: int = c) -> int:
            return len(zig) * width + 64 * int((zig[:, col] >= 2**width).sum())
        assert all(cost(int(w)) <= cost(v) for v in (w - 1, w + 1) if 0 <= v <= 16)
