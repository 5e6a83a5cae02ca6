"""Scalar codecs: fp16, and int8 / int4 / int4b / nf4b quantisation with per-frame or per-block scales."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..format import ZSTD_LEVEL
from .base import MAIN, Codec, _zstd_pipeline


class FP16Codec(Codec):
    name = "fp16"
    dtype = np.dtype("float16")
    bytes_per_value = 2.0
    max_abs = float(np.finfo(np.float16).max)
    buffer_dtype = np.dtype("float16")
    rowwise = True
    rel_error = 5e-4  # float16 rounding: 2^-11 relative per value
    transcode_tolerance = 1e-3

    def __init__(self, level: int = ZSTD_LEVEL, shuffle: bool = True) -> None:
        super().__init__(level)
        self.shuffle = bool(shuffle)

    @property
    def params(self) -> dict[str, Any]:
        return {"level": self.level, "shuffle": self.shuffle}

    def compressors(self) -> list[Any]:
        return _zstd_pipeline(self.level, 2 if self.shuffle else 0)

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return {MAIN: np.asarray(x).astype(np.float16, copy=False)}

    def decode(self, stored: dict[str, Any], rows: slice, dtype: Any = np.float32) -> np.ndarray:
        return np.asarray(stored[MAIN][rows], dtype=dtype)  # float16 out: no conversion at all


def _symmetric_scales(x: np.ndarray, qmax: int) -> np.ndarray:
    # Per-dimension scales: a few outlier dimensions in transformer hidden states are 10-100x larger than
    # the rest, so one global scale would leave the typical dimension only a couple of levels.
    absmax = np.abs(x).max(axis=0).astype(np.float32) if len(x) else np.zeros(x.shape[1], np.float32)
    scale = absmax / np.float32(qmax)
    scale[scale == 0] = 1.0  # an all-zero dimension decodes to zero whatever the scale
    return scale.astype(np.float32)


def _quantize(x: np.ndarray, scale: np.ndarray, qmax: int) -> np.ndarray:
    q = np.rint(np.asarray(x, dtype=np.float32) / scale)
    return np.clip(q, -qmax, qmax).astype(np.int8)


class Int8Codec(Codec):
    """Symmetric int8, one float32 scale per dimension per part (absmax / 127)."""

    name = "int8"
    dtype = np.dtype("int8")
    bytes_per_value = 1.0
    side_suffixes = ("scale",)
    rowwise = True
    rel_error = 0.03
    transcode_tolerance = 0.1

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        scale = _symmetric_scales(x, 127)
        return {MAIN: _quantize(x, scale, 127), "scale": scale}

    def decode(self, stored: dict[str, Any], rows: slice, dtype: Any = np.float32) -> np.ndarray:
        q = np.asarray(stored[MAIN][rows])
        scale = np.asarray(stored["scale"][...], dtype=np.float32)
        return (q.astype(np.float32) * scale).astype(dtype, copy=False)


class Int4Codec(Codec):
    """Symmetric 4-bit (-7..7), per-dimension scales (absmax / 7), two values per uint8.

    Dimension 2j goes in the low nibble, 2j+1 in the high nibble, each stored as q + 8 (1..15).
    D must be even.
    """

    name = "int4"
    dtype = np.dtype("uint8")
    bytes_per_value = 0.5
    side_suffixes = ("scale",)
    rowwise = True
    rel_error = 0.3

    def row_shape(self, dim: int) -> tuple[int, ...]:
        return (dim // 2,)

    def check_dim(self, dim: int) -> None:
        if dim % 2:
            raise ValueError(f"int4 packs two dimensions per byte and needs an even hidden size, got {dim}")

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        self.check_dim(x.shape[1])
        scale = _symmetric_scales(x, 7)
        u = (_quantize(x, scale, 7).astype(np.int16) + 8).astype(np.uint8)
        packed = u[:, 0::2] | (u[:, 1::2] << 4)
        return {MAIN: packed.astype(np.uint8), "scale": scale}

    def decode(self, stored: dict[str, Any], rows: slice, dtype: Any = np.float32) -> np.ndarray:
        b = np.asarray(stored[MAIN][rows])
        scale = np.asarray(stored["scale"][...], dtype=np.float32)
        out = np.empty((b.shape[0], b.shape[1] * 2), dtype=np.float32)
        out[:, 0::2] = (b & 0x0F).astype(np.float32) - 8
        out[:, 1::2] = (b >> 4).astype(np.float32) - 8
        return (out * scale).astype(dtype, copy=False)


class Int4BlockCodec(Codec):
    """4-bit with a per-dimension mean and one float16 scale per frame per block of ``block`` dimensions.

    Plain int4 keeps one scale per dimension for a whole part, so the rare frames where a dimension is
    huge (Whisper base's middle layers) set a step size that leaves ordinary frames 1-2 levels; after the
    per-frame LayerNorm the fusion applies, that error is large (relative MSE 0.35 on layer 4). Centring
    each dimension and scaling each frame's block separately brings it to 0.03 for 2/block bytes more per
    value (0.031 at block 64). Packing as ``int4``: q + 8 in nibbles, dimension 2j low, 2j+1 high.
    Side arrays: ``mean`` (D,) float32 per part, ``bscale`` (N, D/block) float16 per frame.
    """

    name = "int4b"
    dtype = np.dtype("uint8")
    side_suffixes = ("mean", "bscale")
    frame_suffixes = ("bscale",)
    rel_error = 0.2
    transcode_tolerance = 0.3  # nf4b inherits it

    def __init__(self, level: int = ZSTD_LEVEL, block: int = 64) -> None:
        super().__init__(level)
        if block < 2 or block % 2:
            raise ValueError(f"{self.name} block must be an even number >= 2, got {block}")
        self.block = int(block)

    @property
    def bytes_per_value(self) -> float:  # type: ignore[override]
        return 0.5 + 2.0 / self.block

    @property
    def params(self) -> dict[str, Any]:
        return {"level": self.level, "block": self.block}

    def row_shape(self, dim: int) -> tuple[int, ...]:
        return (dim // 2,)

    def frame_nbytes(self, dim: int) -> float:
        return dim / 2 + 2.0 * dim / self.block  # packed codes + the float16 block scales of the frame

    def check_dim(self, dim: int) -> None:
        if dim % self.block:
            raise ValueError(f"{self.name} needs the hidden size ({dim}) to be a multiple of its block "
                             f"({self.block})")

    # Levels in units of the stored block scale (absmax / max level): -7..7, code = level index + 1 (0
    # unused), i.e. int4's q + 8. Stored scales keep that meaning, so existing caches decode unchanged.
    levels = np.arange(-7, 8, dtype=np.float32)
    first_code = 1

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        self.check_dim(x.shape[1])
        x = np.asarray(x, dtype=np.float32)
        mean = x.mean(axis=0).astype(np.float32) if len(x) else np.zeros(x.shape[1], np.float32)
        xb = (x - mean).reshape(len(x), -1, self.block)
        scale = (np.abs(xb).max(axis=2) / self.levels[-1]).astype(np.float16)
        scale[scale == 0] = 1  # an all-zero block decodes to zero whatever the scale
        unit = (xb / scale[:, :, None].astype(np.float32)).reshape(x.shape)
        mids = (self.levels[1:] + self.levels[:-1]) / 2
        u = (np.searchsorted(mids, unit) + self.first_code).astype(np.uint8)  # the nearest level
        return {MAIN: (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8), "mean": mean, "bscale": scale}

    def decode(self, stored: dict[str, Any], rows: slice, dtype: Any = np.float32) -> np.ndarray:
        b = np.asarray(stored[MAIN][rows])
        scale = np.asarray(stored["bscale"][rows], dtype=np.float32)
        table = np.zeros(16, dtype=np.float32)
        table[self.first_code: self.first_code + len(self.levels)] = self.levels
        out = np.empty((b.shape[0], b.shape[1] * 2), dtype=np.float32)
        out[:, 0::2] = table[b & 0x0F]
        out[:, 1::2] = table[b >> 4]
        out = out.reshape(len(out), -1, self.block) * scale[:, :, None]
        return (out.reshape(len(b), -1) + np.asarray(stored["mean"], dtype=np.float32)).astype(dtype, copy=False)


class NF4BlockCodec(Int4BlockCodec):
    """``int4b`` with the 16 NormalFloat4 levels (QLoRA's: quantiles of a normal distribution scaled to
    [-1, 1]) instead of 15 evenly spaced ones. Centred hidden states are bell-shaped within a block, so
    levels dense near zero halve the error at the same size: LN-space MSE 0.008-0.013 on Whisper base's
    layers 3-6 versus int4b's 0.015-0.029 (docs/results/codecs.md). Codes 0..15 index the table."""

    name = "nf4b"
    levels = np.array([-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
                       0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0],
                      dtype=np.float32)
    first_code = 0
    rel_error = 0.12


# --- tpca: time groups + PCA rotation, bits allocated by variance ------------------------------------------

# Optimal steps of a uniform b-bit quantiser (odd multiples of step/2, 2^b levels) for a unit normal, and its
# mean squared error (Max 1960 for b <= 5, the same search for 6..8). ``TPCACodec`` allocates bits with them.
