"""Entropy coding of int16 code arrays inside zarr: one Laplace model per column and chunk, ANS (constriction).

Fixed-width codes spend whole bits on every value; a component whose codes are almost always 0 still costs a
bit, and a uniform quantiser loses ~0.25 bit a value to the Gaussian rate-distortion bound on top. Coding
the integer levels of a uniform quantiser with an entropy coder (ECSQ) spends what each column's
distribution needs. The model is adaptive and travels with the chunk: per column one Laplace scale, a byte
on a log grid, fitted to the chunk's own levels; the ANS coder of ``constriction`` (a Rust entropy-coding
library) codes the levels with it. A column is the same coefficient in every row, so its levels share one
distribution (``tpcae`` lays its codes out so that holds). Layout of a chunk (docs/cache_format.md):
``cols`` scale codes (uint8), then the ANS words (little-endian uint32).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np
from zarr.abc.codec import BytesBytesCodec
from zarr.core.buffer.cpu import as_numpy_array_wrapper
from zarr.registry import register_codec

if TYPE_CHECKING:
    from zarr.core.array_spec import ArraySpec
    from zarr.core.buffer import Buffer

ENTROPY_EXTRA = "pip install 'hff-cache[entropy]'"
NAME = "hff.laplace_ans"
LEVEL_MIN, LEVEL_MAX = -(2**15), 2**15 - 1
_GRID, _ZERO = 12, 96  # scale codes: scale = 2 ** ((code - _ZERO) / _GRID), 2^-8 .. 2^13.25; within 3%
_LOG2E = float(np.log2(np.e))


def require_entropy_coder() -> None:
    """ImportError naming the extra when constriction is missing."""
    _constriction()


@cache
def _constriction() -> Any:
    try:
        import constriction
    except ImportError as e:
        raise ImportError(f"the entropy-coded codecs (tpcae, tpcape) need constriction, which is not installed: "
                          f"{ENTROPY_EXTRA}") from e
    return constriction


def scale_codes(levels: np.ndarray) -> np.ndarray:
    """(rows, cols) integer levels -> per column the byte of its Laplace scale: the grid point that codes the
    column in the fewest bits (the maximum-likelihood scale on the grid; mean |level| would badly
    underestimate a column that is almost always 0)."""
    return np.argmin(_column_costs(levels), axis=1).astype(np.uint8)


def code_scales(codes: np.ndarray) -> np.ndarray:
    return 2.0 ** ((codes.astype(np.float64) - _ZERO) / _GRID)


def laplace_bits(levels: np.ndarray) -> float:
    """Bits the coder spends on (rows, cols) ``levels`` with the models it fits (no ANS run: what a rate
    control can afford to call many times)."""
    return float(_column_costs(levels).min(axis=1).sum()) if len(levels) else 0.0


def _column_costs(levels: np.ndarray) -> np.ndarray:
    """(cols, 256): the bits of each column under each scale of the grid. The quantised Laplace's cost of a
    level n != 0 is linear in |n|, 1 + (|n| - 1/2) log2(e) / b - log2(1 - e^(-1/b)), and of 0 it is
    -log2(1 - e^(-1/(2b))), so three sums per column give them all."""
    mags = np.abs(levels.astype(np.int64))
    nonzero = (mags > 0).sum(axis=0)[:, None]
    zeros, total = len(levels) - nonzero, mags.sum(axis=0)[:, None]
    b = code_scales(np.arange(256))[None]
    per_nonzero = 1 - 0.5 * _LOG2E / b - np.log2(-np.expm1(-1 / b))
    return zeros * -np.log2(-np.expm1(-0.5 / b)) + nonzero * per_nonzero + total * _LOG2E / b


def encode_levels(levels: np.ndarray) -> bytes:
    """(rows, cols) integer levels in LEVEL_MIN..LEVEL_MAX -> the chunk's bytes."""
    c = _constriction()
    rows, cols = levels.shape
    codes = scale_codes(levels)
    coder = c.stream.stack.AnsCoder()
    if levels.size:
        coder.encode_reverse(levels.astype(np.int32).ravel(), _model(), np.zeros(levels.size),
                             np.tile(code_scales(codes), rows))
    return codes.tobytes() + coder.get_compressed().astype("<u4").tobytes()


def decode_levels(data: bytes | np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Inverse of ``encode_levels``: (rows, cols) int16."""
    c = _constriction()
    buf = np.frombuffer(data, np.uint8)
    if len(buf) < cols or (len(buf) - cols) % 4:
        raise ValueError(f"an entropy-coded chunk of {rows} x {cols} levels cannot be {len(buf)} bytes: it is damaged "
                         "(hff-cache verify locates it)")
    b = code_scales(buf[:cols])
    words = buf[cols:].view("<u4").astype(np.uint32)
    if not rows * cols:
        return np.zeros((rows, cols), np.int16)
    levels = c.stream.stack.AnsCoder(words).decode(_model(), np.zeros(rows * cols), np.tile(b, rows))
    return np.asarray(levels, np.int16).reshape(rows, cols)


@cache
def _model() -> Any:
    return _constriction().stream.model.QuantizedLaplace(LEVEL_MIN, LEVEL_MAX)


@dataclass(frozen=True)
class LaplaceANSCodec(BytesBytesCodec):
    """The zarr (v3) codec of an int16 array's chunks: ``encode_levels`` over the chunk's rows (first axis)."""

    is_fixed_size = False

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LaplaceANSCodec:
        return cls()

    def to_dict(self) -> dict[str, Any]:
        return {"name": NAME, "configuration": {}}

    @staticmethod
    def _shape(spec: ArraySpec) -> tuple[int, int]:
        rows = int(spec.shape[0]) if spec.shape else 1
        return rows, int(np.prod(spec.shape[1:], dtype=np.int64))

    def _decode_sync(self, chunk_bytes: Buffer, spec: ArraySpec) -> Buffer:
        rows, cols = self._shape(spec)
        return as_numpy_array_wrapper(lambda b: decode_levels(b, rows, cols).astype("<i2").view(np.uint8).ravel(),
                                      chunk_bytes, spec.prototype)

    def _encode_sync(self, chunk_bytes: Buffer, spec: ArraySpec) -> Buffer | None:
        rows, cols = self._shape(spec)
        return as_numpy_array_wrapper(
            lambda b: np.frombuffer(encode_levels(np.frombuffer(b, "<i2").reshape(rows, cols)), np.uint8),
            chunk_bytes, spec.prototype)

    async def _decode_single(self, chunk_bytes: Buffer, spec: ArraySpec) -> Buffer:
        return await asyncio.to_thread(self._decode_sync, chunk_bytes, spec)

    async def _encode_single(self, chunk_bytes: Buffer, spec: ArraySpec) -> Buffer | None:
        return await asyncio.to_thread(self._encode_sync, chunk_bytes, spec)

    def compute_encoded_size(self, _input_byte_length: int, _chunk_spec: ArraySpec) -> int:
        raise NotImplementedError


register_codec(NAME, LaplaceANSCodec)
