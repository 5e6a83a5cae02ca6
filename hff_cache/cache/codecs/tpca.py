"""tpca: a time-DCT + per-layer PCA transform codec with bits allocated by variance (docs/cache_format.md)."""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..format import ZSTD_LEVEL
from .base import MAIN, Codec

_STEP = {1: 1.5958, 2: 0.9957, 3: 0.5860, 4: 0.3352, 5: 0.1881, 6: 0.1041, 7: 0.0569, 8: 0.0308}
_MSE = {0: 1.0, 1: 0.36338, 2: 0.118846, 3: 0.0374397, 4: 0.0115429, 5: 0.00349521, 6: 0.00104005,
        7: 0.000304333, 8: 8.76862e-05}
MAX_BITS = 8
_UNIT = 8  # components are allocated in blocks of 8, so every code segment fills whole bytes
_SCALE_BITS = 16  # one float16 scale per bit depth in use, per blob
_FOLD_RATIO = 4.0  # a basis row carries its component's deviation down to 1/4 of its segment's largest
_SCALE_TRIES = (1.0, 0.7, 0.8, 0.9, 1.12, 1.25)  # multiples of the RMS-based scale the encoder tries per blob
# Integers whose partial sums stay below 2^24 add exactly in float32 in any order, so the basis product is
# the same on every BLAS and GPU (TF32 and bfloat16 inputs included: codes <= 255 and basis <= 127 are exact
# in both): a segment of depth b may hold at most this many components.
_EXACT_CAP = {b: ((2**24 - 1) // (127 * (2**b - 1))) // _UNIT * _UNIT for b in range(1, MAX_BITS + 1)}


def dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II, (n, n) float32: row k is frequency k; its transpose is the inverse."""
    i = np.arange(n)
    t = np.cos(np.pi * (i[None, :] + 0.5) * i[:, None] / n) * np.sqrt(2.0 / n)
    t[0] /= np.sqrt(2.0)
    return t.astype(np.float32)


def frame_layout(starts: Any, total: int, group: int) -> tuple[np.ndarray, np.ndarray]:
    """(first rows of the full groups, rows coded alone) of ``total`` rows whose utterances start at
    ``starts``: each utterance is cut into groups of ``group`` frames from its first frame; the last
    ``length % group`` frames are singles. Shared by the numpy and the torch decoders."""
    starts = np.asarray(starts, dtype=np.int64).reshape(-1)
    if total == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    starts = starts if len(starts) else np.zeros(1, np.int64)
    lengths = np.diff(np.append(starts, total))
    full = lengths // group
    first = np.repeat(starts, full) + group * _ranks(full)
    n_single = lengths - group * full
    singles = np.repeat(starts + group * full, n_single) + _ranks(n_single)
    return first, singles


def _ranks(counts: np.ndarray) -> np.ndarray:
    """0..c-1 for each count c, concatenated."""
    total = int(counts.sum())
    return np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)


def tpca_segments(count: np.ndarray, kinds: Sequence[int]) -> tuple[list[tuple[int, int, int, int, int, int]],
                                                                     list[int]]:
    """Layout of a blob holding row types ``kinds``: [(position in kinds, row type, bits, first basis row,
    components, byte offset)] in blob order, and the bit depths in use (their scales lead the blob)."""
    depths = sorted({b for k in kinds for b in range(1, MAX_BITS + 1) if count[k, b - 1]}, reverse=True)
    offset = _SCALE_BITS // 8 * len(depths)
    segs = []
    for pos, k in enumerate(kinds):
        row = 0
        for b in range(MAX_BITS, 0, -1):
            n = int(count[k, b - 1])
            if n:
                segs.append((pos, k, b, row, n, offset))
                offset += n * b // 8
                row += n
    return segs, depths


def _allocate(block_var: list[np.ndarray], budget: int) -> np.ndarray:
    """Greedy bit allocation over blocks of ``_UNIT`` components (variance-sorted, one array per row type
    sharing one blob): each step adds the bit that lowers the expected squared error most, within the
    budget (a blob holds one scale per bit depth in use, so a step may also add or free a scale's bits).
    Returns components per depth, (row types, MAX_BITS)."""
    depth = [np.zeros(len(v), np.int64) for v in block_var]
    count = np.zeros((len(block_var), MAX_BITS), np.int64)
    heap = [(-float(v[j]) * (_MSE[0] - _MSE[1]), k, j) for k, v in enumerate(block_var) for j in range(len(v))]
    heapq.heapify(heap)
    spent = 0
    while heap:
        _, k, j = heapq.heappop(heap)
        b = int(depth[k][j]) + 1
        opens = not count[:, b - 1].any()
        frees = b > 1 and count[:, b - 2].sum() == _UNIT  # this block was the last one at depth b - 1
        cost = _UNIT + _SCALE_BITS * (int(opens) - int(frees))
        if spent + cost > budget or count[k, b - 1] + _UNIT > _EXACT_CAP[b]:
            continue  # this block stays at its depth; cheaper steps of other blocks may still fit
        spent += cost
        depth[k][j] = b
        count[k, b - 1] += _UNIT
        if b > 1:
            count[k, b - 2] -= _UNIT
        if b < MAX_BITS:
            heapq.heappush(heap, (-float(block_var[k][j]) * (_MSE[b] - _MSE[b + 1]), k, j))
    return count


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """(n, m) codes < 2^bits -> (n, m * bits / 8) bytes, least significant bit first."""
    planes = (codes[..., None] >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(planes.reshape(len(codes), -1).astype(np.uint8), axis=1, bitorder="little")


def _unpack(data: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of ``_pack``: (n, nbytes) uint8 -> (n, nbytes * 8 / bits) uint8 codes."""
    n = len(data)
    if 8 % bits == 0:  # whole codes per byte: shifts of the bytes themselves
        mask = (1 << bits) - 1
        return np.stack([(data >> (bits * i)) & mask for i in range(8 // bits)], axis=-1).reshape(n, -1)
    planes = np.unpackbits(data, axis=1, bitorder="little").reshape(n, -1, bits)
    codes = planes[..., 0].copy()
    for j in range(1, bits):
        codes |= planes[..., j] << j
    return codes


def _codes(units: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    """Codes 0..2^bits-1 of the nearest odd level (2 * code - 2^bits + 1) * scale to each value."""
    ratio = np.divide(units, scale, out=np.zeros_like(units), where=scale > 0)
    return np.clip(np.floor(ratio / 2 + 2 ** (bits - 1)), 0, 2**bits - 1).astype(np.uint8)


def _best_scale(units: list[np.ndarray], weights: list[np.ndarray], bits: int) -> np.ndarray:
    """Per blob the scale (float16) of one bit depth that minimises its squared error: the RMS of the
    coefficients times the Gaussian step, or one of a few multiples of it (hidden states are not Gaussian,
    and a blob holds few values)."""
    rms = np.sqrt(sum(np.square(u, dtype=np.float64).sum(1) for u in units) / sum(u.shape[1] for u in units))
    best, best_err = None, None
    for m in _SCALE_TRIES:
        s = np.minimum(rms * _STEP[bits] / 2 * m, 65504).astype(np.float16)
        s32 = s.astype(np.float32)[:, None]
        err = sum(((u - (2 * _codes(u, s32, bits).astype(np.float32) - (2**bits - 1)) * s32) ** 2) @ w
                  for u, w in zip(units, weights, strict=True))
        if best is None:
            best, best_err = s, err
        else:
            better = err < best_err
            best, best_err = np.where(better, s, best), np.where(better, err, best_err)
    return best


class TimeGroupCodec(Codec):
    """What the transform codecs share: frames in groups of ``group`` through a DCT along time, ``bits`` a
    value on average."""

    bits_range: tuple[float, float] = (0.5, MAX_BITS)
    transcode_tolerance = 0.4

    def __init__(self, level: int = ZSTD_LEVEL, bits: float = 2.0, group: int = 4) -> None:
        super().__init__(level)
        lo, hi = self.bits_range
        if not lo <= float(bits) <= hi:
            raise ValueError(f"{self.name} bits per value must be within {lo:g}..{hi:g}, got {bits}")
        if not 1 <= int(group) <= 16:
            raise ValueError(f"{self.name} group must be 1..16 frames, got {group}")
        self.bits, self.group = float(bits), int(group)
        self._time = dct_matrix(self.group)

    @property
    def params(self) -> dict[str, Any]:
        return {"level": self.level, "bits": self.bits, "group": self.group}

    @property
    def bytes_per_value(self) -> float:  # type: ignore[override]
        return self.bits / 8  # tpca: exact when bits * D is a multiple of 8; tpcae: its rate control's target

    def decode(self, stored: dict[str, Any], rows: slice, dtype: Any = np.float32) -> np.ndarray:
        """Rows ``rows``: a group's frames decode together, so the rows read widen to the groups overlapping
        them; ``_decode_rows`` fills the widened rows ``a:z`` (groups' first rows and singles relative to a)."""
        total = int(stored[MAIN].shape[0])
        lo, hi, _ = rows.indices(total)
        first, singles = frame_layout(stored.get("starts", np.zeros(1)), total, self.group)
        first = first[(first + self.group > lo) & (first < hi)]  # groups that overlap the rows asked
        singles = singles[(singles >= lo) & (singles < hi)]
        a = min(lo, int(first[0])) if len(first) else lo
        z = max(hi, int(first[-1]) + self.group) if len(first) else hi
        fit = {k: np.asarray(stored[k]) for k in self.fit_suffixes}
        out = np.zeros((z - a, fit["pmean"].shape[0]), np.float32)
        self._decode_rows(stored, a, z, first - a, singles - a, fit, out)
        return out[lo - a:hi - a].astype(dtype, copy=False)

    def _decode_rows(self, stored: dict[str, Any], a: int, z: int, first: np.ndarray, singles: np.ndarray,
                     fit: dict[str, np.ndarray], out: np.ndarray) -> None:
        raise NotImplementedError


class TPCACodec(TimeGroupCodec):
    """About 2 bits per value: frames in groups of ``group`` through a DCT along time, each frame through a
    per-layer PCA rotation, bits allocated by variance, the rest dropped.

    Hidden states are highly redundant: on Whisper tiny.en/base a few hundred principal components hold
    95-99% of the variance, and neighbouring frames correlate at 0.8-0.9. The DCT over a group of frames
    moves the shared part into its first coefficient, the rotation concentrates the variance in few
    components, and a greedy allocation gives each (time coefficient, component) 0..8 bits by its variance
    (uniform quantiser, per blob one float16 scale per bit depth). ``bits`` per value on average, scales
    included; D must be a multiple of 8. Fitted per layer once per writer (``fit``: the first part's frames,
    or a first pass of ``transcode``): mean, int8 basis rows (rotation rows times their component's
    deviation), per-column gains, components per depth. Layout: docs/cache_format.md ("Codecs").
    """

    name = "tpca"
    dtype = np.dtype("uint8")
    fit_suffixes = ("pmean", "pbasis", "pgain", "pcount")
    needs_starts = True
    rel_error = 0.12

    def row_bytes(self, dim: int) -> int:
        return int(self.bits * dim) // 8

    def row_shape(self, dim: int) -> tuple[int, ...]:
        return (self.row_bytes(dim),)

    def check_dim(self, dim: int) -> None:
        if dim % _UNIT or self.row_bytes(dim) < 3:
            raise ValueError(f"tpca needs a hidden size that is a multiple of {_UNIT} and at least 24 bits "
                             f"per frame, got {dim} at {self.bits} bits per value")

    # -- fit --

    def fit(self, x: np.ndarray, starts: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Per-layer statistics of a sample of frames (utterances starting at ``starts``)."""
        x = np.asarray(x, dtype=np.float32)
        self.check_dim(x.shape[1])
        mean = x.mean(axis=0).astype(np.float32) if len(x) else np.zeros(x.shape[1], np.float32)
        xc = x - mean
        cov = xc.T.astype(np.float64) @ xc.astype(np.float64)
        eigval, eigvec = np.linalg.eigh(cov)
        rot = eigvec[:, np.argsort(-eigval, kind="stable")].T  # rows: principal axes, largest variance first
        var = self._row_variances(xc @ rot.T.astype(np.float32), starts)
        rb = self.row_bytes(x.shape[1])
        count = np.concatenate([self._allocation(var[:-1], self.group * rb * 8), self._allocation(var[-1:], rb * 8)])
        basis, gain = self._quantised_basis(rot, var, count)
        return {"pmean": mean, "pbasis": basis, "pgain": gain, "pcount": count.astype(np.int32)}

    def _row_variances(self, coef: np.ndarray, starts: np.ndarray | None) -> np.ndarray:
        """Mean square of every (row type, component): the group's DCT coefficients 0..group-1 and single
        frames (last row). Float64, (group + 1, D); tiny where a component never varies."""
        first, _ = frame_layout(np.zeros(1) if starts is None else starts, len(coef), self.group)
        single = np.mean(np.square(coef, dtype=np.float64), axis=0) if len(coef) else np.zeros(coef.shape[1])
        if len(first):
            groups = coef[first[:, None] + np.arange(self.group)]
            grouped = np.mean(np.square(np.einsum("kn,gnd->gkd", self._time, groups), dtype=np.float64), axis=0)
        else:  # no utterance as long as a group: any estimate will do, no group is ever coded
            grouped = np.repeat(single[None], self.group, axis=0)
        return np.concatenate([grouped, single[None]]) + 1e-30

    def _allocation(self, var: np.ndarray, budget: int) -> np.ndarray:
        blocks = [np.sort(v)[::-1].reshape(-1, _UNIT).mean(axis=1) for v in var]
        return _allocate(blocks, budget)

    def _quantised_basis(self, rot: np.ndarray, var: np.ndarray, count: np.ndarray) -> tuple[np.ndarray,
                                                                                           np.ndarray]:
        """int8 basis rows (row type, code order, D): each rotation row times its component's standard
        deviation, so one step per blob and depth is one relative step for all its components. Rows whose
        deviation is below 1/``_FOLD_RATIO`` of the segment's largest take that floor instead: in units of a
        gain per (row type, depth, column) that maps the segment's largest entry to 127, a much smaller row
        would keep only a few int8 levels (and its codes would blow up in the least-squares projection)."""
        kinds, dim = var.shape
        width = max(1, int(count.sum(axis=1).max()))
        basis = np.zeros((kinds, width, dim), np.int8)
        gain = np.ones((kinds, MAX_BITS, dim), np.float32)
        for k in range(kinds):
            order = np.argsort(-var[k], kind="stable")
            for _, _, b, row, n, _ in tpca_segments(count, [k])[0]:
                std = np.sqrt(var[k, order[row:row + n]])
                rows = np.maximum(std, std.max() / _FOLD_RATIO)[:, None] * rot[order[row:row + n]]
                g = (np.abs(rows).max(axis=0) / 127).astype(np.float32)
                g[g == 0] = 1
                basis[k, row:row + n] = np.rint(rows / g).astype(np.int8)
                gain[k, b - 1] = g
        return basis, gain

    # -- encode --

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return self.encode_part(x)

    def encode_part(self, x: np.ndarray, starts: np.ndarray | None = None,
                    fit: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Codes of the part's frames (one utterance when ``starts`` is None); without ``fit`` the codec fits
        itself on ``x`` (a writer always passes its worker's fit, so every part shares one)."""
        x = np.asarray(x, dtype=np.float32)
        self.check_dim(x.shape[1])
        rb, g = self.row_bytes(x.shape[1]), self.group
        out = np.zeros((len(x), rb), np.uint8)
        if not len(x):
            return {MAIN: out}
        fit = fit if fit is not None else self.fit(x, starts)
        xc = x - np.asarray(fit["pmean"], np.float32)
        first, singles = frame_layout(np.zeros(1) if starts is None else starts, len(x), g)
        if len(first):
            rows = first[:, None] + np.arange(g)
            coef = np.einsum("kn,gnd->gkd", self._time, xc[rows])
            out[rows] = self._encode_blobs(coef, fit, list(range(g)), g * rb).reshape(len(first), g, rb)
        if len(singles):
            out[singles] = self._encode_blobs(xc[singles][:, None], fit, [g], rb)
        return {MAIN: out}

    def _encode_blobs(self, coef: np.ndarray, fit: dict[str, np.ndarray], kinds: list[int],
                      nbytes: int) -> np.ndarray:
        """(n, len(kinds), D) coefficients -> (n, nbytes) blobs: scales, then each segment's packed codes."""
        count, basis, gain = (np.asarray(fit[k]) for k in ("pcount", "pbasis", "pgain"))
        segs, depths = tpca_segments(count, kinds)
        units, weights = [], []  # each segment's coefficients in units of its basis rows, and the rows' norms
        for pos, k, b, row, n, _ in segs:
            rows = basis[k, row:row + n].astype(np.float32) * gain[k, b - 1]
            norm2 = np.square(rows).sum(axis=1)
            safe = np.where(norm2 > 0, norm2, 1)
            units.append(np.where(norm2 > 0, coef[:, pos] @ rows.T / safe, 0))
            weights.append(norm2)
        blob = np.zeros((len(coef), nbytes), np.uint8)
        scales = np.zeros((len(coef), len(depths)), np.float16)
        for i, b in enumerate(depths):
            mine = [j for j, seg in enumerate(segs) if seg[2] == b]
            scales[:, i] = _best_scale([units[j] for j in mine], [weights[j] for j in mine], b)
            s = scales[:, [i]].astype(np.float32)
            for j in mine:
                off, n = segs[j][5], segs[j][4]
                blob[:, off:off + n * b // 8] = _pack(_codes(units[j], s, b), b)
        blob[:, :2 * len(depths)] = scales.astype("<f2").view(np.uint8)
        return blob

    # -- decode --

    def _decode_rows(self, stored: dict[str, Any], a: int, z: int, first: np.ndarray, singles: np.ndarray,
                     fit: dict[str, np.ndarray], out: np.ndarray) -> None:
        raw = np.asarray(stored[MAIN][a:z])
        if len(first):
            idx = first[:, None] + np.arange(self.group)
            out[idx] = tpca_decode_blobs(raw[idx].reshape(len(first), -1), fit, list(range(self.group)), self._time)
        if len(singles):
            out[singles] = tpca_decode_blobs(raw[singles], fit, [self.group], self._time)[:, 0]


def tpca_decode_blobs(blobs: np.ndarray, fit: dict[str, np.ndarray], kinds: list[int],
                      time: np.ndarray) -> np.ndarray:
    """(n, nbytes) blobs of row types ``kinds`` -> (n, len(kinds), D) float32 frames. The torch decoder
    (hff_cache/batches/device_decode.py) repeats these operations in this order, so both agree bit for bit
    (in-place operations round as the plain ones; they only save the allocations)."""
    count, basis, gain, mean = (fit[k] for k in ("pcount", "pbasis", "pgain", "pmean"))
    segs, depths = tpca_segments(count, kinds)
    scales = np.ascontiguousarray(blobs[:, :2 * len(depths)]).view("<f2").astype(np.float32)
    parts: list[Any] = [None] * len(kinds)
    for pos, k, b, row, n, off in segs:
        levels = _unpack(blobs[:, off:off + n * b // 8], b).astype(np.float32) * 2 - (2**b - 1)
        y = levels @ basis[k, row:row + n].astype(np.float32)  # integers below 2^24: exact in any order
        y *= gain[k, b - 1]
        y *= scales[:, depths.index(b), None]
        if parts[pos] is None:
            parts[pos] = y
        else:
            parts[pos] += y
    parts = [np.zeros((len(blobs), mean.shape[0]), np.float32) if p is None else p for p in parts]
    return inverse_dct(parts, time, mean)


def inverse_dct(parts: list[np.ndarray], time: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """(n, D) float32 coefficient frames, one per DCT coefficient (one part: single frames) -> (n, len(parts),
    D) frames plus ``mean``, in the fixed order of operations the torch decoders repeat."""
    out = np.empty((len(parts[0]), len(parts), mean.shape[0]), np.float32)
    if len(parts) == 1:
        np.add(parts[0], mean, out=out[:, 0])
        return out
    tmp = np.empty_like(parts[0])
    for t in range(len(parts)):  # inverse DCT, one coefficient at a time in a fixed order
        acc = out[:, t]
        np.multiply(parts[0], time[0, t], out=acc)
        for k in range(1, len(parts)):
            np.multiply(parts[k], time[k, t], out=tmp)
            acc += tmp
        acc += mean
    return out
