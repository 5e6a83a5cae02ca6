"""tpcae: tpca's transform, one uniform step for every coefficient, the levels entropy-coded (docs/cache_format.md)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..format import CHUNK_FRAMES, ZSTD_LEVEL
from .ans import LEVEL_MAX, LaplaceANSCodec, laplace_bits, require_entropy_coder
from .base import MAIN
from .tpca import TimeGroupCodec, frame_layout, inverse_dct
from .tpcap import Matrix, exact_product

_SCALE_BITS = 16  # one float16 scale per group of frames (stored with each of its frames; zstd folds the copies)
_STEP_RANGE = (1e-3, 1e3)  # the rate control's search range of the step, in units of a group's RMS
_STEP_TRIES = 24  # bisection steps on log(step): the rate lands within ~0.1% of the target
_FLUSH_BITS = 64  # the ANS coder's last words per chunk
_CODER_OVERHEAD = 1.01  # ANS with 24-bit probabilities codes ~0.4-1% above the models' information content
_MAX_CENTROID = 0.5  # a nonzero level's reconstruction moves at most half a step towards 0
# ``exact``: centroid offsets on a 1/128-step grid, so sign(level) * offset * 128 is an integer of at most 64 and
# its product with the int8 basis is exact in float32; levels split as 128 * hi + lo (|lo| <= 64, |hi| <= 256)
BIAS_GRID = 128
_HI_BLOCK = 512  # 256 * 127 * 512 < 2^24: each block of the hi product is exact too
_ONE_PRODUCT_L1 = 2**24 // 127  # a row of integers this small in L1 times an int8 basis: every partial sum exact
# Bits a value that compressed residency spends above the rate (bit planes per column, and outliers stored
# apart; hff_cache/batches/packed_levels.py): 1.23 measured on Whisper tiny.en at 1.96 bits. An estimate for
# --in-memory auto's planning; the loader reports the real size.
PACKED_EXTRA_BITS = 1.2


class TPCAECodec(TimeGroupCodec):
    """``bits`` per value on average, entropy-coded: frames in groups of ``group`` through a DCT along time,
    each frame through a per-layer PCA rotation, every coefficient divided by one step (``pstep`` times its
    group's RMS) and rounded, the integer levels coded by an adaptive Laplace model per column (``ans``).

    Why not tpca's fixed-width codes: with one step for all coefficients, every coefficient gets the same
    error, which is what minimises the total squared error at a given rate (reverse water-filling), a
    coefficient much smaller than the step simply rounds to 0 and costs almost nothing, and the entropy coder
    spends on each column what its distribution needs, not whole bits (docs/results.md: at 0.25 B/value,
    30% less error than tpca on Whisper tiny.en's residuals). The step is fitted with the rest (the rate
    control estimates the coder's bits on the fit's frames). Codes: int16 levels, one row per frame, a
    group's ``group`` x D coefficients dealt over its rows by variance rank (rank r to row r mod group, column
    r // group) so that each column holds coefficients of about the same variance, as the per-column model
    assumes; ``pscale``, the group's RMS, float16 per frame. Fit per layer: ``pmean``, ``pbasis`` (int8
    rotation rows), ``pgain`` (per column), ``pstep`` and ``pdeal`` (which coefficient each row type's column
    holds), and with ``centroids`` ``pbias`` (where in its bin a nonzero level decodes). ``deadzone``: levels
    round up only ``deadzone`` steps past the half (fewer bits for values at a threshold, so the rate control
    affords a finer step); with centroid decoding, 13% less error at the same bytes on Whisper tiny.en
    (docs/results.md). Levels are int16: with one step for all, the few largest coefficients (Whisper's outlier
    dimensions) need levels in the hundreds. ``exact`` (the default; caches written before 2026-12-08 lack it):
    the offsets lie on a 1/128-step grid and the levels' product with the basis is summed in exact integer
    blocks (``exact_residual``), so the torch decoder (compressed residency) equals this one bit for bit.
    """

    name = "tpcae"
    dtype = np.dtype("<i2")
    side_suffixes = ("pscale",)
    frame_suffixes = ("pscale",)
    fit_suffixes = ("pmean", "pbasis", "pgain", "pstep", "pdeal")
    needs_starts = True
    rel_error = 0.12
    bits_range = (0.25, 7.0)
    packed_residency = True
    holds_gil = True  # constriction's AnsCoder.decode
    # caches written before 2026-12-07 round to the nearest level and decode it at the bin's centre
    # and from then until 2026-12-08 multiply the levels with the basis in BLAS's order
    legacy_params = {"deadzone": 0.0, "centroids": False, "exact": False}

    def __init__(self, level: int = ZSTD_LEVEL, bits: float = 2.0, group: int = 8, deadzone: float = 0.1,
                 centroids: bool = True, exact: bool = True) -> None:
        require_entropy_coder()  # before any work: a writer or reader without it fails at once, saying why
        super().__init__(level, bits, group)
        if not 0 <= float(deadzone) < 0.5:
            raise ValueError(f"{self.name} deadzone must be in 0..0.5 (a fraction of the step), got {deadzone}")
        self.deadzone, self.centroids, self.exact = float(deadzone), bool(centroids), bool(exact)
        self.fit_suffixes = (*type(self).fit_suffixes, *(("pbias",) if self.centroids else ()))

    @property
    def params(self) -> dict[str, Any]:
        return {**super().params, "deadzone": self.deadzone, "centroids": self.centroids, "exact": self.exact}

    @property
    def torch_decodable(self) -> bool:  # type: ignore[override]
        return self.exact

    def levels(self, u: np.ndarray, step: float | np.ndarray) -> np.ndarray:
        """Integer levels (float) of ``u`` / ``step``: rounded, with |u| / step rounded up only from
        ``0.5 + deadzone`` past a level. A deadzone spends fewer bits on values just past a rounding
        threshold, and the rate control buys a finer step with them (docs/cache_format.md)."""
        v = u / step
        if self.deadzone:
            v = np.copysign(np.floor(np.abs(v) + (0.5 - self.deadzone)), v)
        else:
            v = np.rint(v)
        return np.clip(v, -LEVEL_MAX, LEVEL_MAX)

    def compressors(self) -> list[Any]:
        return [LaplaceANSCodec()]

    def frame_nbytes(self, dim: int) -> float:
        # what compressed residency holds: the levels bit-packed (an estimate; the loader reports the real
        # size), and the scale
        return dim * min(16.0, self.bits + PACKED_EXTRA_BITS) / 8 + 2.0

    # -- fit --

    def fit(self, x: np.ndarray, starts: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Per-layer statistics of a sample of frames (utterances starting at ``starts``)."""
        x = np.asarray(x, dtype=np.float32)
        dim = x.shape[1]
        mean = x.mean(axis=0).astype(np.float32) if len(x) else np.zeros(dim, np.float32)
        xc = x - mean
        eigval, eigvec = np.linalg.eigh(xc.T.astype(np.float64) @ xc.astype(np.float64))
        rot = eigvec[:, np.argsort(-eigval, kind="stable")].T  # rows: principal axes, largest variance first
        gain = (np.abs(rot).max(axis=0) / 127).astype(np.float32)
        gain[gain == 0] = 1
        basis = np.rint(rot / gain).astype(np.int8)
        fit = {"pmean": mean, "pbasis": basis, "pgain": gain, "pstep": np.ones(1, np.float32)}
        grouped, singles = self._normalised(xc, starts, fit)
        fit["pdeal"] = self._deal(grouped, singles, dim)
        fit["pstep"] = np.asarray([self._rate_control(grouped, singles, dim)], np.float32)
        if self.centroids:
            fit["pbias"] = self._centroids(grouped, singles, dim, float(fit["pstep"][0]))
        return fit

    def _centroids(self, grouped: np.ndarray, singles: np.ndarray, dim: int, step: float) -> np.ndarray:
        """(group + 1, D) float32, per coefficient (row type k, component; the last row: singles) how far below
        its level a nonzero level decodes, in steps: the mean of |level| - |u| / step over the fit's nonzero
        levels. The coefficients are about Laplacian, so within every bin the values crowd towards 0, and the
        bin's centroid, not its centre, is the least-squares reconstruction (the same offset for every level
        of a Laplacian)."""
        g = self.group
        out = np.zeros((g + 1, dim), np.float32)
        for u, rows in ((grouped.reshape(-1, g, dim), slice(0, g)), (singles[:, None], slice(g, g + 1))):
            if not len(u):
                continue
            level = self.levels(u, step)
            nonzero = level != 0
            gap = np.where(nonzero, np.abs(level) - np.abs(u) / step, 0).sum(axis=0, dtype=np.float64)
            out[rows] = np.clip(gap / np.maximum(nonzero.sum(axis=0), 1), 0, _MAX_CENTROID)
        return np.round(out * BIAS_GRID) / BIAS_GRID if self.exact else out

    def _deal(self, grouped: np.ndarray, singles: np.ndarray, dim: int) -> np.ndarray:
        """(group + 1, D) int32: the coefficient (k * D + component; singles: the component) in each column of
        each row type, by variance rank."""
        g = self.group
        var_g = np.mean(np.square(grouped, dtype=np.float64), axis=0).ravel() if len(grouped) else np.zeros(g * dim)
        var_s = np.mean(np.square(singles, dtype=np.float64), axis=0) if len(singles) else var_g.reshape(g, dim)[0]
        deal = np.empty((g + 1, dim), np.int32)
        deal[:g] = np.argsort(-var_g, kind="stable").reshape(dim, g).T
        deal[g] = np.argsort(-var_s, kind="stable")
        return deal

    def _rate_control(self, grouped: np.ndarray, singles: np.ndarray, dim: int) -> float:
        """The step (in units of a group's RMS) whose estimated coded size is ``bits`` a value, scales
        included: bisection on log(step)."""
        values = grouped.size + singles.size
        if not values:
            return 1.0
        rows = len(grouped) * self.group + len(singles)
        header = (8 * dim + _FLUSH_BITS) * rows / CHUNK_FRAMES  # each chunk's column scales and final ANS words
        budget = (self.bits * values - _SCALE_BITS * (len(grouped) + len(singles)) - header) / _CODER_OVERHEAD
        lo, hi = np.log(_STEP_RANGE[0]), np.log(_STEP_RANGE[1])
        for _ in range(_STEP_TRIES):
            step = float(np.exp((lo + hi) / 2))
            spent = sum(laplace_bits(self.levels(u, step).reshape(len(u), u[0].size))
                        for u in (grouped, singles) if len(u))
            lo, hi = (lo, np.log(step)) if spent <= budget else (np.log(step), hi)
        return float(np.exp(hi))  # the smallest step tried that fits

    def _normalised(self, xc: np.ndarray, starts: np.ndarray | None, fit: dict[str, np.ndarray]
                    ) -> tuple[np.ndarray, np.ndarray]:
        """(groups, group, D) and (singles, D) coefficients, each divided by its group's RMS."""
        grouped, singles, gs, ss, _, _ = self._coefficients(xc, starts, fit)
        return grouped / _safe(gs)[:, None, None], singles / _safe(ss)[:, None]

    def _coefficients(self, xc: np.ndarray, starts: np.ndarray | None, fit: dict[str, np.ndarray]
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The rotated coefficients of centred frames: (groups, group, D) after the DCT and (singles, D), each
        group's (and single's) RMS rounded to float16, as stored, and the groups' first rows and the singles'
        rows (``frame_layout``)."""
        rows = fit["pbasis"].astype(np.float32) * fit["pgain"]
        norm2 = np.square(rows).sum(axis=1)
        coef = (xc @ rows.T) / np.where(norm2 > 0, norm2, 1)  # least squares on the near-orthonormal int8 rows
        first, single = frame_layout(np.zeros(1) if starts is None else starts, len(xc), self.group)
        grouped = np.einsum("kn,gnd->gkd", self._time, coef[first[:, None] + np.arange(self.group)])
        singles = coef[single]
        gs = _rms16(grouped.reshape(len(grouped), self.group * xc.shape[1]))
        return grouped, singles, gs, _rms16(singles), first, single

    # -- encode --

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return self.encode_part(x)

    def encode_part(self, x: np.ndarray, starts: np.ndarray | None = None,
                    fit: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Levels and scales of the part's frames (one utterance when ``starts`` is None); without ``fit`` the
        codec fits itself on ``x`` (a writer always passes its worker's fit)."""
        x = np.asarray(x, dtype=np.float32)
        dim, g = x.shape[1], self.group
        levels, scale = np.zeros((len(x), dim), np.int16), np.zeros(len(x), np.float16)
        if not len(x):
            return {MAIN: levels, "pscale": scale}
        fit = fit if fit is not None else self.fit(x, starts)
        grouped, singles, gs, ss, first, single = self._coefficients(x - fit["pmean"], starts, fit)
        step, deal = float(fit["pstep"][0]), np.asarray(fit["pdeal"])

        def quantise(u: np.ndarray, s: np.ndarray) -> np.ndarray:
            return self.levels(u, (step * _safe(s))[:, None]).astype(np.int16)

        if len(first):
            rows = first[:, None] + np.arange(g)
            levels[rows] = quantise(grouped.reshape(len(first), -1), gs)[:, deal[:g]]
            scale[rows] = gs[:, None]
        if len(single):
            levels[single] = quantise(singles, ss)[:, deal[g]]
            scale[single] = ss
        return {MAIN: levels, "pscale": scale}

    # -- decode --

    def _decode_rows(self, stored: dict[str, Any], a: int, z: int, first: np.ndarray, singles: np.ndarray,
                     fit: dict[str, np.ndarray], out: np.ndarray) -> None:
        levels, scale = np.asarray(stored[MAIN][a:z]), np.asarray(stored["pscale"][a:z])
        if len(first):
            idx = first[:, None] + np.arange(self.group)
            out[idx] = tpcae_decode_groups(levels[idx], scale[first], fit, self._time, exact=self.exact)
        if len(singles):
            out[singles] = tpcae_decode_groups(levels[singles][:, None], scale[singles], fit, self._time,
                                               singles=True, exact=self.exact)[:, 0]


def tpcae_decode_groups(levels: np.ndarray, scale: np.ndarray, fit: dict[str, np.ndarray], time: np.ndarray,
                        singles: bool = False, exact: bool = False) -> np.ndarray:
    """(n, rows, D) int16 levels of n groups of ``rows`` frames (``singles``: n single frames, rows = 1) and
    their (n,) float16 scales -> (n, rows, D) float32 frames. The torch decoder (hff_cache/batches/
    device_decode.py) repeats the ``exact`` operations."""
    n, rows, dim = levels.shape
    deal = np.asarray(fit["pdeal"])
    coded = np.zeros((n, rows * dim), np.float32)
    coded[:, deal[-1:] if singles else deal[:rows]] = levels  # each column back to its coefficient
    offsets = None
    if "pbias" in fit:  # nonzero levels decode at their bin's centroid
        bias = np.asarray(fit["pbias"])[-1] if singles else np.asarray(fit["pbias"])[:rows].ravel()
        if exact:
            offsets = np.sign(coded) * np.round(bias * BIAS_GRID)  # integers: the offsets in 1/128 steps
        else:
            coded -= np.sign(coded) * bias
    step = scale.astype(np.float32) * np.float32(fit["pstep"][0])
    basis = fit["pbasis"].astype(np.float32)
    parts = []
    for k in range(rows):
        cols = slice(k * dim, (k + 1) * dim)
        if exact:
            y = exact_residual(coded[:, cols], None if offsets is None else offsets[:, cols], basis)
        else:
            y = coded[:, cols] @ basis
        y *= fit["pgain"]
        y *= step[:, None]
        parts.append(y)
    return inverse_dct(parts, time if not singles else np.ones((1, 1), np.float32), fit["pmean"])


def exact_residual(levels: Matrix, offsets: Matrix | None, basis: Matrix) -> Matrix:
    """``(levels - offsets / 128) @ basis`` for float32 integers (|levels| <= 32767, |offsets| <= 64, the basis
    int8), every partial product an exact integer in float32 and the parts added in a fixed order: the same
    numbers from numpy and torch (CPU or GPU, any BLAS) alike.

    On the CPU, the rows whose ``128 levels - offsets`` have an L1 norm below 2^24 / 127 (nearly all at tpcae's
    rates) take one product of those integers: any order of summing them is exact, so it gives the same
    numbers as the blocks below at a third of their work. The other rows, and every row on a GPU (where
    TF32 could round integers of 14 bits), take the blocks: ``levels = 128 * hi + lo``, the hi product only over
    the columns some hi is nonzero in (the few outlier coefficients)."""
    if not _on_cpu(levels):
        return _blocked_residual(levels, offsets, basis)
    scaled = levels * BIAS_GRID
    if offsets is not None:
        scaled -= offsets
    fits = abs(scaled).sum(1) < _ONE_PRODUCT_L1
    out = scaled @ basis  # exact on the rows that fit; the others are redone below
    out *= 1 / BIAS_GRID
    slow = ~fits
    if bool(slow.any()):
        # the hi columns of the whole call, so the blocked rows' sums run in the same blocks as when every row
        # took the blocks
        cols = ((levels >= 64) | (levels < -64)).any(0)
        out[slow] = _blocked_residual(levels[slow], None if offsets is None else offsets[slow], basis, cols)
    return out


def _on_cpu(x: Matrix) -> bool:
    return isinstance(x, np.ndarray) or x.device.type == "cpu"


def _blocked_residual(levels: Matrix, offsets: Matrix | None, basis: Matrix, hi_cols: Matrix | None = None
                      ) -> Matrix:
    """The blocks of ``exact_residual``; ``hi_cols``: a mask of the columns the hi product runs over (default:
    those where some row of ``levels`` has a nonzero hi)."""
    hi = (levels + 64) // BIAS_GRID
    lo = levels - hi * BIAS_GRID
    out = exact_product(lo, basis)
    mask = hi.any(0) if hi_cols is None else hi_cols
    cols = mask.nonzero()[0] if isinstance(hi, np.ndarray) else mask.nonzero()[:, 0]
    if len(cols):
        top = exact_product(hi[:, cols], basis[cols], block=_HI_BLOCK)
        top *= BIAS_GRID
        out += top
    if offsets is not None:
        below = exact_product(offsets, basis)
        below *= 1 / BIAS_GRID
        out -= below
    return out


def _rms16(u: np.ndarray) -> np.ndarray:
    """Per row the RMS, rounded to float16 (what is stored, and what the encoder divides by)."""
    if not len(u):
        return np.zeros(0, np.float16)
    return np.minimum(np.sqrt(np.mean(np.square(u, dtype=np.float64), axis=1)), 65504).astype(np.float16)


def _safe(s: np.ndarray) -> np.ndarray:
    s = np.asarray(s, np.float32)
    return np.where(s > 0, s, 1).astype(np.float32)
