"""Torch decoders of the cache codecs, for compressed residency: the stored codes stay in RAM and each batch is
decoded where the model runs (CPU or CUDA; every tensor is made on the codes' device).

One decoder per codec name in ``DECODERS``; a codec without one is held as decoded float16 instead (fp16
needs none: its codes are float16 already). Each decoder repeats its numpy codec's operations
(``hff_cache.cache.codecs``) in the same order and precision, so a batch decoded here equals, bit for bit,
the one the numpy reader gives after the same final conversion (tests/test_codecs_v2.py). The one reduction,
tpca's basis product, multiplies integers whose sums stay below 2^24, which float32 adds exactly in any
order, so BLAS, cuBLAS and TF32 give the same numbers; autocast is switched off around it. tpcap's
prediction from the layer below is such a product too (int8 inputs and weights, ``LinearPrediction``): a
chained codec's layer decodes from the layer below it decoded (``DeviceCodes.below``), in layer order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hff_cache.cache.codecs import MAIN, Codec, frame_layout, tpca_segments
from hff_cache.cache.codecs.tpcae import BIAS_GRID, exact_residual
from hff_cache.cache.codecs.tpcap import exact_product

__all__ = ["DECODERS", "DeviceCodes", "can_decode", "decode", "register_decoder"]


@dataclass
class DeviceCodes:
    """The stored codes of one layer for some utterances (rows of all of them, in order), on one device.

    ``rows``: the per-frame arrays (``"layer"`` and per-frame side arrays), (N, ...) tensors. ``lengths``:
    frames of each utterance (numpy; utterance i owns the next ``lengths[i]`` rows). ``utt_group``: which of
    ``groups`` (per-part side arrays, a worker's fit; tensors on the device, ``groups_np`` the same in numpy)
    each utterance decodes with. ``below``: for a chained codec, the same rows of the stored layer below
    decoded (float32; None for the first stored layer).
    """

    rows: dict[str, torch.Tensor]
    lengths: np.ndarray
    utt_group: np.ndarray
    groups: list[dict[str, torch.Tensor]]
    groups_np: list[dict[str, np.ndarray]] = field(default_factory=list)
    below: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.rows[MAIN].device

    def row_group(self) -> torch.Tensor:
        """(N,) group of every row."""
        per_row = np.repeat(np.asarray(self.utt_group, np.int64), np.asarray(self.lengths, np.int64))
        return torch.from_numpy(per_row).to(self.device)

    def stacked(self, name: str) -> torch.Tensor:
        """One per-part array of every group stacked, (groups, ...): gathered by row_group, it gives each row
        its part's array in one op."""
        return torch.stack([g[name] for g in self.groups])


Decoder = Callable[[Codec, DeviceCodes], torch.Tensor]


def _int8(codec: Codec, c: DeviceCodes) -> torch.Tensor:
    scale = c.stacked("scale").float()[c.row_group()]
    return c.rows[MAIN].to(torch.float32) * scale


def _nibbles(b: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
    """(N, D/2) bytes -> (N, D) float32: dimension 2j from the low nibble, 2j+1 from the high one; the
    nibble itself minus 8 (int4), or the level it indexes in ``table`` (int4b, nf4b)."""
    lo, hi = b & 0x0F, b >> 4
    if table is None:
        pair = (lo.to(torch.float32) - 8, hi.to(torch.float32) - 8)
    else:
        pair = (table[lo.long()], table[hi.long()])
    return torch.stack(pair, dim=-1).reshape(b.shape[0], -1)


def _int4(codec: Codec, c: DeviceCodes) -> torch.Tensor:
    return _nibbles(c.rows[MAIN]) * c.stacked("scale").float()[c.row_group()]


def _int4b(codec: Codec, c: DeviceCodes) -> torch.Tensor:
    b = c.rows[MAIN]
    table = np.zeros(16, dtype=np.float32)
    table[codec.first_code: codec.first_code + len(codec.levels)] = codec.levels  # type: ignore[attr-defined]
    out = _nibbles(b, torch.from_numpy(table).to(b.device))
    out = out.reshape(len(b), -1, codec.block) * c.rows["bscale"].float()[:, :, None]  # type: ignore[attr-defined]
    return out.reshape(len(b), -1) + c.stacked("mean").float()[c.row_group()]


# --- tpca -------------------------------------------------------------------------------------------------


def _unpack(data: torch.Tensor, bits: int) -> torch.Tensor:
    """(n, nbytes) uint8 -> (n, nbytes * 8 / bits) uint8 codes, least significant bit first (codecs._unpack)."""
    n = data.shape[0]
    if 8 % bits == 0:  # whole codes per byte: shifts of the bytes themselves
        mask = (1 << bits) - 1
        parts = [(data >> (bits * i)) & mask for i in range(8 // bits)]
        return torch.stack(parts, dim=-1).reshape(n, -1)
    shifts = torch.arange(8, dtype=torch.uint8, device=data.device)
    planes = ((data.unsqueeze(-1) >> shifts) & 1).reshape(n, -1, bits)
    codes = planes[..., 0].clone()
    for j in range(1, bits):
        codes |= planes[..., j] << j
    return codes


def _tpca_blobs(blobs: torch.Tensor, fit: dict[str, torch.Tensor], count: np.ndarray, kinds: list[int],
                time: torch.Tensor) -> torch.Tensor:
    """Torch twin of ``codecs.tpca_decode_blobs``: (n, nbytes) blobs -> (n, len(kinds), D) float32."""
    segs, depths = tpca_segments(count, kinds)
    scales = blobs[:, :2 * len(depths)].contiguous().view(torch.float16).to(torch.float32)
    mean = fit["pmean"]
    parts: list[Any] = [None] * len(kinds)
    for pos, k, b, row, n, off in segs:
        levels = _unpack(blobs[:, off:off + n * b // 8], b).to(torch.float32) * 2 - (2**b - 1)
        y = levels @ fit["pbasis32"][k, row:row + n]  # integers below 2^24: exact in any order
        y.mul_(fit["pgain"][k, b - 1])
        y.mul_(scales[:, depths.index(b), None])
        if parts[pos] is None:
            parts[pos] = y
        else:
            parts[pos].add_(y)
    parts = [torch.zeros((len(blobs), mean.shape[0]), dtype=torch.float32, device=blobs.device) if p is None else p
             for p in parts]
    return _inverse_dct(parts, time, mean)


def _inverse_dct(parts: list[torch.Tensor], time: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Torch twin of ``codecs.inverse_dct``: (n, D) coefficient frames -> (n, len(parts), D) frames + mean."""
    out = torch.empty((len(parts[0]), len(parts), mean.shape[0]), dtype=torch.float32, device=parts[0].device)
    if len(parts) == 1:
        torch.add(parts[0], mean, out=out[:, 0])
        return out
    for t in range(len(parts)):  # inverse DCT in the numpy decoder's order
        acc = parts[0] * time[0, t]
        for k in range(1, len(parts)):
            acc.add_(parts[k] * time[k, t])
        acc.add_(mean)
        out[:, t] = acc
    return out


GroupDecoder = Callable[[torch.Tensor, int, bool], torch.Tensor]


def _time_groups(codec: Codec, c: DeviceCodes, decode_groups: GroupDecoder) -> torch.Tensor:
    """The frames of a time-group codec (tpca, tpcae): each utterance's groups of ``group`` frames and its
    single frames (``frame_layout``), per fit group, through ``decode_groups(rows, group index, singles)``,
    rows (n, frames, ...) -> (n, frames, D)."""
    main, g = c.rows[MAIN], codec.group  # type: ignore[attr-defined]
    dev = main.device
    lengths = np.asarray(c.lengths, np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    first, singles = frame_layout(starts, len(main), g)
    utt = np.repeat(np.arange(len(lengths)), lengths)  # utterance of every row
    out = torch.zeros((len(main), c.groups_np[0]["pmean"].shape[0] if c.groups_np else 0), dtype=torch.float32,
                      device=dev)
    for gi in range(len(c.groups)):
        mine = first[c.utt_group[utt[first]] == gi] if len(first) else first
        if len(mine):
            idx = torch.from_numpy(mine[:, None] + np.arange(g)).to(dev)
            dec = decode_groups(idx, gi, False)
            out[idx.reshape(-1)] = dec.reshape(-1, dec.shape[-1])
        alone = singles[c.utt_group[utt[singles]] == gi] if len(singles) else singles
        if len(alone):
            idx = torch.from_numpy(alone).to(dev)
            out[idx] = decode_groups(idx[:, None], gi, True)[:, 0]
    return out


def _tpca(codec: Codec, c: DeviceCodes) -> torch.Tensor:
    main, g = c.rows[MAIN], codec.group  # type: ignore[attr-defined]
    time = torch.from_numpy(codec._time).to(main.device)  # type: ignore[attr-defined]

    def groups(idx: torch.Tensor, gi: int, singles: bool) -> torch.Tensor:
        kinds = [g] if singles else list(range(g))
        return _tpca_blobs(main[idx].reshape(len(idx), -1), c.groups[gi], c.groups_np[gi]["pcount"], kinds, time)

    return _time_groups(codec, c, groups)


def tpca_device_fit(fit: dict[str, np.ndarray], device: torch.device | str) -> dict[str, torch.Tensor]:
    """A tpca (or tpcap) fit as the decoder uses it: on the device, the int8 basis (and prediction weights)
    converted to float32 once."""
    out = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in fit.items()}
    out["pbasis32"] = out["pbasis"].to(torch.float32)
    if "pqw" in out:
        out["pqw32"] = out["pqw"].to(torch.float32)
    return out


# --- tpcap: tpca of the residual plus the int8 prediction from the layer below -------------------------------


def _tpcap(codec: Codec, c: DeviceCodes) -> torch.Tensor:
    return _add_prediction(codec, c, _tpca(codec, c))


def _add_prediction(codec: Codec, c: DeviceCodes, out: torch.Tensor) -> torch.Tensor:
    """``out`` (the decoded residual) plus the int8 prediction from ``c.below`` (``LinearPrediction``)."""
    if not c.groups or not len(c.groups[0]["pqw"]):
        return out  # the first stored layer: no prediction
    if c.below is None:
        raise ValueError(f"{codec.name}: this hidden state decodes from the decoded state below it "
                         "(pass DeviceCodes.below, the layer below decoded)")
    row_group = c.row_group()
    for gi, fit in enumerate(c.groups):
        rows = torch.nonzero(row_group == gi).flatten() if len(c.groups) > 1 else None
        below = c.below if rows is None else c.below[rows]
        q = torch.round(below * fit["pqin"]).clamp_(-127, 127)  # LinearPrediction.predict's operations
        pred = exact_product(q, fit["pqw32"])  # the numpy decoder's own blocks, on tensors
        pred.mul_(fit["pqcol"][0])
        pred.add_(fit["pqcol"][1])
        if rows is None:
            out.add_(pred)
        else:
            out[rows] = out[rows] + pred
    return out


# --- tpcae / tpcape: one uniform step, entropy-coded levels (decoded to int16 on the CPU before they get here) --


def _tpcae(codec: Codec, c: DeviceCodes) -> torch.Tensor:
    """Torch twin of ``codecs.tpcae_decode_groups`` with ``exact``: the levels' product in exact integer blocks
    (``exact_residual``), then the numpy decoder's elementwise operations in its order."""
    levels, scale = c.rows[MAIN], c.rows["pscale"]
    time, dim = torch.from_numpy(codec._time).to(levels.device), levels.shape[1]  # type: ignore[attr-defined]

    def groups(idx: torch.Tensor, gi: int, singles: bool) -> torch.Tensor:
        fit, n, rows = c.groups[gi], len(idx), idx.shape[1]
        deal = fit["pdeal"][-1:] if singles else fit["pdeal"][:rows]
        coded = torch.zeros((n, rows * dim), dtype=torch.float32, device=levels.device)
        coded[:, deal] = levels[idx].to(torch.float32)
        offsets = None
        if "pbias" in fit:
            bias = fit["pbias"][-1] if singles else fit["pbias"][:rows].reshape(-1)
            offsets = torch.sign(coded) * torch.round(bias * BIAS_GRID)
        step = scale[idx[:, 0]].to(torch.float32) * fit["pstep"][0]
        parts = []
        for k in range(rows):
            cols = slice(k * dim, (k + 1) * dim)
            y = exact_residual(coded[:, cols], None if offsets is None else offsets[:, cols], fit["pbasis32"])
            y.mul_(fit["pgain"])
            y.mul_(step[:, None])
            parts.append(y)
        return _inverse_dct(parts, torch.ones((1, 1), device=levels.device) if singles else time, fit["pmean"])

    return _time_groups(codec, c, groups)


def _tpcape(codec: Codec, c: DeviceCodes) -> torch.Tensor:
    return _add_prediction(codec, c, _tpcae(codec, c))


DECODERS: dict[str, Decoder] = {
    "int8": _int8,
    "int4": _int4,
    "int4b": _int4b,
    "nf4b": _int4b,  # the same layout; the codec's level table differs
    "tpca": _tpca,
    "tpcap": _tpcap,  # pred int8 only (``Codec.torch_decodable``)
    "tpcae": _tpcae,  # exact only (caches written before 2026-12-08 reside as float16)
    "tpcape": _tpcape,  # exact and pred int8
}

# How a decoder wants a group's per-part arrays on the device (default: as they are).
GROUP_PREPARE: dict[str, Callable[[dict[str, np.ndarray], torch.device | str], dict[str, torch.Tensor]]] = {
    "tpca": tpca_device_fit,
    "tpcap": tpca_device_fit,
    "tpcae": tpca_device_fit,
    "tpcape": tpca_device_fit,
}


def can_decode(codec: Codec) -> bool:
    """Whether compressed residency can hold ``codec``'s codes: a torch decoder for it, bit for bit."""
    return codec.name in DECODERS and codec.torch_decodable


def register_decoder(name: str, decoder: Decoder) -> None:
    """A torch decoder for codec ``name`` (without one, compressed residency falls back to float16)."""
    DECODERS[name] = decoder


def device_groups(codec: Codec, groups: list[dict[str, np.ndarray]], device: torch.device | str
                  ) -> list[dict[str, torch.Tensor]]:
    """Per-part arrays of every group, moved to ``device`` once (they are small) in the decoder's form."""
    prep = GROUP_PREPARE.get(codec.name)
    if prep is not None:
        return [prep(g, device) for g in groups]
    return [{k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in g.items()} for g in groups]


def decode(codec: Codec, codes: DeviceCodes) -> torch.Tensor:
    """(N, D) float32 frames of ``codes`` on their device; ``KeyError`` for a codec without a decoder."""
    with torch.autocast(codes.device.type, enabled=False):  # a caller's autocast must not round the product
        return DECODERS[codec.name](codec, codes)
