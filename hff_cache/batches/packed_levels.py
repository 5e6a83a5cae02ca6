"""Integer levels bit-packed in RAM: how compressed residency holds an entropy-coded codec's levels.

The entropy coder (ANS) decodes a whole chunk at a time and only on the CPU, so residency cannot keep its
bytes and gather a batch's rows from them; the decoded int16 levels would take as much RAM as float16. Most
levels are small (about 2 bits of information a value at tpcape's default rate), and the entropy coder's
columns already sort them by spread (tpcae deals coefficients to columns by variance). So each column gets
a fixed width ``w`` (its zig-zag values 0 .. 2^w - 1 stored in ``w`` bit planes) chosen on the first block
loaded, and the few levels outside it are kept apart as (row, column, level) outliers. A batch's rows unpack
with a handful of numpy calls per plane: no torch op in the loader's thread (from_cache.py says why).
"""

from __future__ import annotations

import numpy as np

__all__ = ["PackedLevels"]

_MAX_BITS = 16  # int16 levels: zig-zag values below 2^16
_OUTLIER_BITS = 64  # an outlier's row (int32), column (int16) and level (int16)


class PackedLevels:
    """(frames, D) int16 levels, filled block by block (``packed[lo:hi] = levels``: the first fill chooses the
    column widths, so fill one block before any others run in threads) and gathered by rows
    (``packed[rows]`` -> int16 levels, equal to what was stored)."""

    def __init__(self, frames: int, dim: int) -> None:
        self.shape = (int(frames), int(dim))
        self.widths: np.ndarray | None = None
        # Columns widest first (``_order``), so every bit plane's columns are a prefix of that order and a plane
        # unpacks into one contiguous slice; ``_inverse`` puts the columns back.
        self._order = self._inverse = np.zeros(0, np.int64)
        self._planes: list[tuple[int, int, int, int]] = []  # per bit plane: bit, columns, byte offset, bytes
        self._data: np.ndarray | None = None
        self._outliers: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._rows = np.zeros(0, np.int32)
        self._cols = np.zeros(0, np.int16)
        self._values = np.zeros(0, np.int16)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        self._merge()
        data = 0 if self._data is None else self._data.nbytes
        return data + self._rows.nbytes + self._cols.nbytes + self._values.nbytes

    # -- filling --

    def __setitem__(self, rows: slice, levels: np.ndarray) -> None:
        lo, hi, _ = rows.indices(self.shape[0])
        zig = _zigzag(np.asarray(levels, np.int16))
        if self.widths is None:
            self._layout(choose_widths(zig))
        assert self._data is not None and self.widths is not None
        ordered = zig[:, self._order]
        for bit, cols, offset, nbytes in self._planes:
            plane = (ordered[:, :cols] >> np.uint32(bit)) & 1
            self._data[lo:hi, offset:offset + nbytes] = np.packbits(plane.astype(np.uint8), axis=1, bitorder="little")
        r, c = np.nonzero(zig >= (np.uint32(1) << self.widths.astype(np.uint32)))
        if len(r):  # list.append is atomic: blocks fill from several threads
            self._outliers.append(((r + lo).astype(np.int32), c.astype(np.int16), levels[r, c].astype(np.int16)))

    def _layout(self, widths: np.ndarray) -> None:
        self.widths = widths
        self._order = np.argsort(-widths, kind="stable")
        self._inverse = np.argsort(self._order)
        offset = 0
        for bit in range(int(widths.max(initial=0))):
            cols = int((widths > bit).sum())  # the first ``cols`` columns of ``_order``
            nbytes = (cols + 7) // 8
            self._planes.append((bit, cols, offset, nbytes))
            offset += nbytes
        self._data = np.zeros((self.shape[0], offset), np.uint8)

    def _merge(self) -> None:
        """The outliers of every fill, sorted by row (what gathering searches)."""
        if not self._outliers:
            return
        parts, self._outliers = self._outliers, []
        rows = np.concatenate([self._rows, *(p[0] for p in parts)])
        order = np.argsort(rows, kind="stable")
        self._rows = rows[order]
        self._cols = np.concatenate([self._cols, *(p[1] for p in parts)])[order]
        self._values = np.concatenate([self._values, *(p[2] for p in parts)])[order]

    # -- gathering --

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        self._merge()
        zig = np.zeros((len(rows), self.shape[1]), np.uint16)  # zig-zag values < 2^16, columns in ``_order``
        if self._data is not None:
            data = self._data[rows]
            for bit, cols, offset, nbytes in self._planes:
                bits = np.unpackbits(data[:, offset:offset + nbytes], axis=1, count=cols, bitorder="little")
                zig[:, :cols] |= np.left_shift(bits, np.uint16(bit), dtype=np.uint16)
            zig = zig[:, self._inverse]
        out = _unzigzag(zig)
        if len(self._rows):
            first = np.searchsorted(self._rows, rows, "left")
            count = np.searchsorted(self._rows, rows, "right") - first
            total = int(count.sum())
            if total:
                starts = np.repeat(first - np.cumsum(count) + count, count)  # each outlier's run start, shifted
                which = starts + np.arange(total)
                out[np.repeat(np.arange(len(rows)), count), self._cols[which]] = self._values[which]
        return out


def choose_widths(zig: np.ndarray) -> np.ndarray:
    """Per column the width w (bits) that stores ``zig``'s column in the fewest bits: w a row, plus an outlier
    record for every value of 2^w or more."""
    n, dim = zig.shape
    length = np.zeros(zig.shape, np.int64)  # bit length of every value: 0 for 0
    for b in range(_MAX_BITS):
        length += zig >= (1 << b)
    counts = np.bincount((np.arange(dim) * (_MAX_BITS + 2) + length).ravel(),
                         minlength=dim * (_MAX_BITS + 2)).reshape(dim, _MAX_BITS + 2)
    above = counts[:, ::-1].cumsum(axis=1)[:, ::-1]  # above[:, w] = values of bit length >= w
    cost = n * np.arange(_MAX_BITS + 1)[None] + _OUTLIER_BITS * above[:, 1:]  # width w: above[:, w + 1] outliers
    return np.argmin(cost, axis=1).astype(np.int64)


def _zigzag(levels: np.ndarray) -> np.ndarray:
    """int16 -> uint32: 0, -1, 1, -2, 2 ... to 0, 1, 2, 3, 4 ... (small magnitudes, small values)."""
    v = levels.astype(np.int32)
    return ((v << 1) ^ (v >> 31)).astype(np.uint32)


def _unzigzag(zig: np.ndarray) -> np.ndarray:
    v = zig.astype(np.int32)
    return ((v >> 1) ^ -(v & 1)).astype(np.int16)
