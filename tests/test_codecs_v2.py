"""Codecs, second round: every codec within its stated error, torch decoding equal to numpy decoding bit for
bit, transcode then verify, old caches still read, compressed residency equal to float16 residency, and the
tpca codec's fit part, layout, resume and damage."""

from __future__ import annotations

import dataclasses
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from hff_cache.batches import device_decode
from hff_cache.batches.from_cache import CacheBatches, hours_per_gib
from hff_cache.cache import (
    CODECS,
    CacheFormatError,
    CacheMeta,
    CacheReader,
    CacheWriter,
    CodecSpec,
    EncoderInfo,
    get_codec,
    transcode_cache,
    verify_cache,
)
from hff_cache.cache.codecs import MAIN, ans, frame_layout, recorded_codec
from hff_cache.cache.codecs.ans import LEVEL_MAX, LEVEL_MIN, decode_levels, encode_levels, laplace_bits
from hff_cache.cache.codecs.tpcap import exact_product
from hff_cache.cache.format import array_checksum
from hff_cache.cache.reader import decode_codes
from hff_cache.tasks.task import Task
from hff_cache.testing import as_older_cache, tiny_cache, unlabelled

D = 64
LAYERS = [0, 1, 2]
V1_CACHE = Path(__file__).parent / "fixtures" / "v1_run" / "cache"  # fp16, written by the code of b945023
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DECODABLE = [n for n in CODECS if device_decode.can_decode(get_codec(n))]
TEXTS = ["AB", "BA", "ABBA", "BAB", "A B", "BB A", "AAB", "B", "ABA", "BBA", "AB BA", "A"]
DURATIONS = [0.5, 1.6, 0.7, 1.2, 0.9, 2.0, 0.6, 1.4, 1.0, 0.8, 1.8, 0.55]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    torch.set_num_threads(1)  # tiny ops: OpenMP threads only add contention on a shared 2-core box


def params(name: str, dim: int = D) -> dict:
    """Block codecs need a block dividing the hidden size (default 64; the tiny encoders have 32)."""
    return {"block": 16} if "block" in get_codec(name).params and dim % 64 else {}


def whisper_like(rng: np.random.Generator, lengths: np.ndarray, dim: int, rho: float = 0.8
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Frames like a speech encoder's: per-dimension spread over ~2 decades, three dimensions 60x larger
    (Whisper's outliers), an all-zero dimension, neighbouring frames correlated at ``rho``. (x, starts)."""
    scale = np.exp(rng.normal(0.0, 0.7, dim)).astype(np.float32)
    scale[:3] *= 60.0
    utts = []
    for n in lengths:
        z = np.empty((int(n), dim), np.float32)
        z[0] = rng.standard_normal(dim)
        for t in range(1, int(n)):
            z[t] = rho * z[t - 1] + np.sqrt(1 - rho**2) * rng.standard_normal(dim)
        utts.append(z * scale)
    x = np.concatenate(utts)
    x[:, 5] = 0.0
    return x, np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)


def round_trip(name: str, x: np.ndarray, starts: np.ndarray, dim: int = D) -> np.ndarray:
    codec = get_codec(name, **params(name, dim))
    fit = codec.fit(x, starts)
    stored = codec.encode_part(x, starts, fit or None)
    return codec.decode({**stored, **fit, "starts": starts}, slice(None))


# --- every codec ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [D, 512])
@pytest.mark.parametrize("name", list(CODECS))
def test_round_trip_within_the_stated_error(name: str, dim: int) -> None:
    rng = np.random.default_rng(1)
    x, starts = whisper_like(rng, rng.integers(20, 200, 12), dim)
    y = round_trip(name, x, starts, dim)
    assert y.shape == x.shape and y.dtype == np.float32
    rel = float(np.linalg.norm(y - x) / np.linalg.norm(x))
    assert rel <= get_codec(name, **params(name, dim)).rel_error, rel
    assert np.all(y[:, 5] == 0) or name.startswith("tpca")  # per-dimension codecs keep a zero dimension exactly


def test_tpca_stores_a_quarter_byte_per_value_and_beats_nf4b_per_byte() -> None:
    rng = np.random.default_rng(2)
    x, starts = whisper_like(rng, rng.integers(50, 300, 10), 512)
    codec = get_codec("tpca")
    assert codec.bytes_per_value == 0.25 and codec.frame_nbytes(512) == 128
    assert codec.encode_part(x, starts)[MAIN].shape == (len(x), 128)
    err = {n: float(np.square(round_trip(n, x, starts, 512) - x).mean()) for n in ("tpca", "nf4b")}
    assert err["tpca"] < err["nf4b"]  # at less than half the bytes (0.25 vs 0.531)


# Checksums of what today's codecs store and decode for fixed data (computed with the code before tpca
# existed): a cache written by them must keep reading as it did.
GOLDEN = {
    "fp16": ({"layer": "bb121cc4"}, "3a8d80d5"),
    "int8": ({"layer": "d1098eeb", "scale": "5eb09660"}, "eb618a65"),
    "int4": ({"layer": "3c1ba674", "scale": "af9c890d"}, "c317e7c0"),
    "int4b": ({"layer": "6e45877b", "mean": "ad927499", "bscale": "91c68cf5"}, "e9074bd2"),
    "nf4b": ({"layer": "874ee291", "mean": "ad927499", "bscale": "a0ee1501"}, "e8b3c108"),
}


@pytest.mark.parametrize("name", list(GOLDEN))
def test_todays_codecs_store_and_decode_as_before(name: str) -> None:
    rng = np.random.default_rng(7)  # uniform values and powers of two: the same bits on every machine
    scale = (2.0 ** rng.integers(-3, 3, D)).astype(np.float32)
    scale[:3] *= 64
    x = ((rng.random((300, D), dtype=np.float32) - 0.5) * scale).astype(np.float32)
    x[:, 5] = 0
    codec = get_codec(name, **({"block": 16} if name in ("int4b", "nf4b") else {}))
    stored = codec.encode(x)
    assert {k: array_checksum(v) for k, v in stored.items()} == GOLDEN[name][0]
    assert array_checksum(codec.decode(stored, slice(None))) == GOLDEN[name][1]


# --- torch decoding --------------------------------------------------------------------------------------


def make_meta(codec: str, dim: int = D) -> CacheMeta:
    enc = EncoderInfo(name="tiny-test", model_class="WhisperEncoder", sample_rate=16000, frame_rate=50.0,
                      hidden_size=dim, num_hidden_states=4)
    return CacheMeta(encoder=enc, layers=list(LAYERS), codec=CodecSpec(codec, params(codec, dim)))


def write_cache(url: Path, codec: str, seed: int = 0, workers: tuple[str, ...] = ("w000", "w001"),
                n: int = 16, part_frames: int = 400) -> dict[str, np.ndarray]:
    """Two workers (two tpca fits), several parts each; returns the features written, by id."""
    rng = np.random.default_rng(seed)
    utts = {}
    for w, worker in enumerate(workers):
        with CacheWriter(str(url), make_meta(codec), worker=worker, part_frames=part_frames) as writer:
            for i in range(n):
                x, _ = whisper_like(rng, [int(rng.integers(5, 120))], D)
                x *= 1 + 3 * w  # the workers' data differ, so do their scales and fits
                feats = np.stack([x * (j + 1) for j in range(len(LAYERS))])
                uid = f"{worker}-utt{i:03d}"
                writer.add(uid, feats)
                utts[uid] = feats
    return utts


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("v2")
    out = {}
    for name in CODECS:
        write_cache(root / name, name)
        out[name] = str(root / name)
    return out


def _device_codes(codec, codes, device: str, below: torch.Tensor | None = None) -> device_decode.DeviceCodes:
    rows = {k: torch.from_numpy(v).to(device) for k, v in codes.rows.items()}
    return device_decode.DeviceCodes(rows, codes.lengths, codes.group,
                                     device_decode.device_groups(codec, codes.groups, device), codes.groups, below)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", DECODABLE)
def test_torch_decoding_equals_numpy_decoding(caches: dict[str, str], name: str, device: str) -> None:
    r = CacheReader(caches[name])
    idx = np.random.default_rng(3).permutation(len(r))[:20].tolist()  # both workers, several parts, any order
    ref32 = r.read_many(idx, dtype=np.float32)
    ref16 = r.read_many(idx, dtype=np.float16)
    below, below_t = None, None  # a chained codec (tpcap) decodes each layer from the one below
    for j, codes in enumerate(r.read_codes(idx)):
        want32 = np.concatenate([f[:, j] for f in ref32])
        below = decode_codes(r.codec, codes, below=below)
        np.testing.assert_array_equal(below, want32)  # the numpy decode of the codes
        got = device_decode.decode(r.codec, _device_codes(r.codec, codes, device, below_t))
        assert got.device.type == device and got.dtype == torch.float32
        assert torch.equal(got.cpu(), torch.from_numpy(want32))  # float32, bit for bit
        assert torch.equal(got.half().cpu(), torch.from_numpy(np.concatenate([f[:, j] for f in ref16])))
        below_t = got if r.codec.chained else None
    if name == "tpca":
        assert len(codes.groups) == 2  # one fit per worker


@pytest.mark.parametrize("name", ["tpca", "nf4b", "tpcap"])
def test_torch_decoding_is_exact_under_autocast_and_fast_matmul(caches: dict[str, str], name: str) -> None:
    r = CacheReader(caches[name])
    first, codes = r.read_codes(range(len(r)), [0, 1])
    below = decode_codes(r.codec, first) if r.codec.chained else None
    want = decode_codes(r.codec, codes, below=below)
    precision = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")  # bfloat16 inputs allowed: integers <= 256 stay exact
        with torch.autocast("cpu", dtype=torch.bfloat16):
            below_t = None if below is None else torch.from_numpy(below)
            got = device_decode.decode(r.codec, _device_codes(r.codec, codes, "cpu", below_t))
    finally:
        torch.set_float32_matmul_precision(precision)
    assert torch.equal(got, torch.from_numpy(want))


def test_fp16_has_no_torch_decoder_and_stays_float16_in_ram(caches: dict[str, str]) -> None:
    assert "fp16" not in device_decode.DECODERS  # its codes are float16 already
    r = CacheReader(caches["fp16"])
    src = CacheBatches(r, unlabelled(r), ctc=False, in_memory=True)
    assert src.resident == "fp16" and src.resident_nbytes == src.nbytes_fp16


# --- transcode, residency --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tiny_cache(tmp_path_factory.mktemp("tiny"), DURATIONS, TEXTS))


@pytest.fixture(scope="module")
def transcoded(tiny: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("transcoded")
    out = {}
    for name in CODECS:
        summary = transcode_cache(tiny, str(root / f"{name}.zarr"), name, codec_params=params(name, 32))
        assert summary["ok"], summary["problems"]
        assert summary["rel_error"] <= summary["rel_tolerance"] == get_codec(name).transcode_tolerance
        out[name] = summary["dst"]
    return out


@pytest.mark.parametrize("name", list(CODECS))
def test_transcode_then_verify(transcoded: dict[str, str], tiny: str, name: str) -> None:
    rep = verify_cache(transcoded[name])
    assert rep.ok, [str(p) for p in rep.problems]
    assert not rep.warnings
    a, b = CacheReader(tiny), CacheReader(transcoded[name])
    assert b.ids == a.ids and b.meta.codec.name == name
    below = None  # a chained codec's layer decodes from the layer below it
    for j, codes in enumerate(b.read_codes(range(len(b)))):
        below = decode_codes(b.codec, codes, below=below)
        np.testing.assert_array_equal(below, np.concatenate([f[:, j] for f in b.read_many(range(len(b)))]))


@pytest.mark.parametrize("name", list(CODECS))
def test_compressed_residency_epoch_equals_the_float16_epoch(transcoded: dict[str, str], name: str) -> None:
    r = CacheReader(transcoded[name])
    data = Task.from_labels("asr", r).prepare(r)
    kw = dict(ctc=True, batch_frames=200, shuffle_frames=150, block_frames=100, in_memory=True)
    codes, fp16 = CacheBatches(r, data, **kw), CacheBatches(r, data, resident="fp16", **kw)
    streamed = CacheBatches(r, data, **{**kw, "in_memory": False})
    # a codec without a torch decoder (fp16) is held as decoded float16
    assert codes.resident == ("codes" if name in DECODABLE else "fp16") and fp16.resident == "fp16"
    epochs = [list(s.epoch(2)) for s in (codes, fp16, streamed)]
    assert len(epochs[0]) == len(epochs[1]) == len(epochs[2]) > 1
    for a, b, c in zip(*epochs, strict=True):
        assert a.ids == b.ids == c.ids and a.feats.dtype == torch.float16
        assert torch.equal(a.feats, b.feats) and torch.equal(a.feats, c.feats)  # exactly, not within rounding
        assert a.lengths.tolist() == b.lengths.tolist() and torch.equal(a.targets, b.targets)
    if name in DECODABLE:
        assert codes.resident_nbytes < fp16.resident_nbytes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("tf32", [False, True])
@pytest.mark.parametrize("name", DECODABLE)
def test_compressed_residency_decodes_on_cuda(transcoded: dict[str, str], name: str, tf32: bool) -> None:
    r = CacheReader(transcoded[name])
    data = Task.from_labels("asr", r).prepare(r)
    kw = dict(ctc=True, batch_frames=200, in_memory=True)
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = tf32  # TF32 inputs keep tpca's integers exact
        on_gpu = list(CacheBatches(r, data, device="cuda", **kw).epoch(0))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    on_cpu = list(CacheBatches(r, data, **kw).epoch(0))
    assert all(b.feats.is_cuda for b in on_gpu)
    assert all(torch.equal(a.feats.cpu(), b.feats) for a, b in zip(on_gpu, on_cpu, strict=True))


def test_hours_of_audio_per_gib() -> None:
    base = (7, 512)  # Whisper base: 7 hidden states x 512
    h = {n: hours_per_gib(get_codec(n), *base) for n in CODECS}
    assert h["fp16"] == pytest.approx(2**30 / (7 * 512 * 2) / 50 / 3600)  # 0.83 h
    assert h["int8"] == pytest.approx(2 * h["fp16"]) and h["int4"] == pytest.approx(4 * h["fp16"])
    assert h["tpca"] == pytest.approx(8 * h["fp16"])  # 6.7 h per GiB
    assert h["tpcap"] == h["tpca"]  # its int8 prediction decodes on the device too
    assert hours_per_gib(get_codec("tpcap", pred="float32"), *base) == h["fp16"]  # no torch decoder: float16
    assert hours_per_gib(get_codec("tpca"), *base, resident="fp16") == pytest.approx(h["fp16"])
    # the entropy-coded levels reside bit-packed: an estimate until loaded (the loader reports the real size)
    assert 4 * h["fp16"] < h["tpcae"] < 8 * h["fp16"]
    assert h["tpcape"] == h["tpcae"]  # its int8 prediction decodes on the device too
    assert hours_per_gib(get_codec("tpcape", pred="float32"), *base) == h["fp16"]
    assert hours_per_gib(get_codec("tpcae", exact=False), *base) == h["fp16"]  # written before the exact decoder


# --- old caches ------------------------------------------------------------------------------------------


def test_v1_cache_reads_as_codes_resides_and_transcodes_to_tpca(tmp_path: Path) -> None:
    shutil.copytree(V1_CACHE, tmp_path / "v1")
    old = CacheReader(str(tmp_path / "v1"))
    assert old.meta.codec.name == "fp16" and old.cache_id == "da880b2dea5a"  # identity unchanged
    feats = old.read_many(range(len(old)))
    for j, codes in enumerate(old.read_codes(range(len(old)))):
        assert codes.rows[MAIN].dtype == np.float16 and not codes.groups[0]
        np.testing.assert_array_equal(decode_codes(old.codec, codes), np.concatenate([f[:, j] for f in feats]))
    data = unlabelled(old)
    batches = list(CacheBatches(old, data, ctc=False, in_memory=True).epoch(0))
    assert sum(len(b) for b in batches) == len(old)
    summary = transcode_cache(str(tmp_path / "v1"), str(tmp_path / "tpca.zarr"), "tpca")
    assert summary["ok"], summary["problems"]
    assert verify_cache(summary["dst"]).ok
    new = CacheReader(summary["dst"])
    a = list(CacheBatches(new, unlabelled(new), ctc=False, in_memory=True).epoch(0))
    b = list(CacheBatches(new, unlabelled(new), ctc=False, in_memory=True, resident="fp16").epoch(0))
    assert all(torch.equal(x.feats, y.feats) for x, y in zip(a, b, strict=True))


# --- tpca ------------------------------------------------------------------------------------------------


def test_tpca_fit_part_comes_first_and_every_part_names_it(caches: dict[str, str]) -> None:
    r = CacheReader(caches["tpca"])
    parts = r.parts()
    for worker in ("w000", "w001"):
        mine = [p for p in parts if p.worker == worker]
        assert mine[0].num_utterances == 0 and mine[0].num_frames == 0 and len(mine) > 2
        names = {r._part_attrs[r._part_ids.index(p.part_id)]["codec_fit"] for p in mine}
        assert names == {mine[0].part_id}
    sizes = {s: r._fit_arrays(parts[0].part_id, 0)[s].shape for s in r.codec.fit_suffixes}
    assert sizes["pmean"] == (D,) and sizes["pbasis"][0] == 5 and sizes["pcount"] == (5, 8)


def test_tpca_decodes_any_range_of_rows() -> None:
    rng = np.random.default_rng(4)
    x, starts = whisper_like(rng, np.array([9, 1, 14, 4, 30, 7]), D)
    codec = get_codec("tpca")
    fit = codec.fit(x, starts)
    stored = {**codec.encode_part(x, starts, fit), **fit, "starts": starts}
    full = codec.decode(stored, slice(None))
    for lo, hi in [(0, 1), (3, 17), (9, 10), (10, 24), (23, 65), (50, 65), (64, 65)]:
        np.testing.assert_array_equal(codec.decode(stored, slice(lo, hi)), full[lo:hi])
    first, singles = frame_layout(starts, len(x), 4)
    assert sorted(np.concatenate([first[:, None] + np.arange(4), singles[:, None]], axis=None)) == list(range(65))
    assert singles.tolist() == [8, 9, 22, 23, 56, 57, 62, 63, 64]  # each utterance's last length % 4 frames


def test_tpca_decodes_stored_codes_as_defined() -> None:
    # The layout in docs/cache_format.md: a blob starts with one little-endian float16 scale per bit depth
    # in use, then each segment's codes, least significant bit first; level = 2 * code - (2^b - 1); value =
    # mean + sum over segments of scale * gain[row type, b - 1] * (levels @ basis rows).
    codec = get_codec("tpca", bits=3.0, group=1)  # D=8: 3 bytes a frame; groups of one frame, no DCT
    count = np.zeros((2, 8), np.int32)
    count[:, 0] = 8  # eight components at 1 bit
    basis = np.zeros((2, 8, 8), np.int8)
    basis[:, np.arange(8), np.arange(8)] = 2
    fit = {"pmean": np.full(8, 1.0, np.float32), "pbasis": basis, "pgain": np.full((2, 8, 8), 0.5, np.float32),
           "pcount": count}
    blob = np.concatenate([np.array([0.25], "<f2").view(np.uint8), [0b10100101]]).astype(np.uint8)[None]
    y = codec.decode({MAIN: blob, **fit, "starts": np.zeros(1, np.int64)}, slice(None))
    levels = np.array([1, -1, 1, -1, -1, 1, -1, 1], np.float32)
    np.testing.assert_array_equal(y, [1.0 + 0.25 * 0.5 * 2 * levels])


def test_tpca_resume_keeps_the_committed_fit(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    x, _ = whisper_like(rng, [200], D)
    feats = np.stack([x] * len(LAYERS))
    url = str(tmp_path / "c")
    with CacheWriter(url, make_meta("tpca"), part_frames=150) as w:
        w.add("a", feats[:, :160])
        fit = w.codec_fit
        assert fit is not None
    with CacheWriter(url, make_meta("tpca"), part_frames=150) as w:  # a later run of the same worker
        assert all(np.array_equal(a["pbasis"], b["pbasis"]) for a, b in zip(w.codec_fit, fit, strict=True))
        assert not w.offer_codec_fit(fit)  # a committed fit stays
        w.add("b", feats[:, 160:] * 2)
    r = CacheReader(url)
    assert [p.num_utterances for p in r.parts()] == [0, 1, 1]
    assert {a["codec_fit"] for a in r._part_attrs} == {r.parts()[0].part_id}
    assert verify_cache(url).ok


def test_tpca_missing_fit_part_is_a_clear_error_and_verify_reports_it(tmp_path: Path) -> None:
    url = tmp_path / "c"
    write_cache(url, "tpca", workers=("w000",), n=6)
    fit_part = CacheReader(str(url)).parts()[0].part_id
    shutil.rmtree(url / "parts" / fit_part)
    with pytest.raises(CacheFormatError, match=f"codec fit is in part {fit_part}, which is missing"):
        CacheReader(str(url))
    rep = verify_cache(str(url))
    assert not rep.ok and rep.problems[-1].kind == "reader"


def test_tpca_refuses_what_it_cannot_code() -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        get_codec("tpca").check_dim(30)
    with pytest.raises(ValueError, match="bits per value"):
        get_codec("tpca", bits=0.1)
    with pytest.raises(ValueError, match="group"):
        get_codec("tpca", group=0)


@pytest.mark.parametrize("group", [1, 4, 8])
def test_tpca_copes_with_variances_over_many_decades(group: int) -> None:
    # The top block of eight components spans 10^4 in deviation and sits at the 8-bit cap: a basis row far
    # smaller than its segment's largest must neither vanish in int8 nor blow up the blob's scale (without
    # the floor of _FOLD_RATIO: relative error 0.28, single frames off by 2-10x their norm).
    rng = np.random.default_rng(6)
    rot, _ = np.linalg.qr(rng.standard_normal((D, D)))
    x, starts = whisper_like(rng, rng.integers(30, 200, 10), D)
    std = np.concatenate([np.logspace(4, 0, 8), np.logspace(-0.5, -3, D - 8)])
    x = (x / x.std(axis=0).clip(1e-6) * std) @ rot.T.astype(np.float32)
    codec = get_codec("tpca", group=group)
    fit = codec.fit(x, starts)
    y = codec.decode({**codec.encode_part(x, starts, fit), **fit, "starts": starts}, slice(None))
    frame_err = np.linalg.norm(y - x, axis=1) / np.linalg.norm(x, axis=1)
    assert frame_err.max() < 0.5 and np.linalg.norm(y - x) / np.linalg.norm(x) < 0.03


def test_extract_to_tpca_fits_on_the_first_part(tmp_path: Path) -> None:
    cache = tiny_cache(tmp_path, DURATIONS, TEXTS, codec="tpca")  # what `extract --codec tpca` writes
    r = CacheReader(str(cache))
    assert [p.num_utterances for p in r.parts()] == [0, len(DURATIONS)]  # the fit part, then the data
    assert verify_cache(str(cache)).ok
    x = np.concatenate(r.read_many(range(len(r))))
    assert x.shape[1:] == (len(r.layers), 32) and np.isfinite(x).all()


def test_tpca_on_disk_stays_within_a_quarter_byte_per_value(tmp_path: Path) -> None:
    dim, frames = 512, 6000
    rng = np.random.default_rng(8)
    x, _ = whisper_like(rng, [1000] * 6, dim)
    meta = CacheMeta(encoder=EncoderInfo(name="t", hidden_size=dim, num_hidden_states=1), layers=[0],
                     codec=CodecSpec("tpca"))
    with CacheWriter(str(tmp_path / "c"), meta) as w:
        for i in range(6):
            w.add(f"u{i}", x[None, i * 1000:(i + 1) * 1000])
    data_part = tmp_path / "c" / "parts" / "w000-000001" / "layer_00"
    stored = sum(f.stat().st_size for f in data_part.rglob("*") if f.is_file() and f.name != "zarr.json")
    print(f"tpca: {stored / (frames * dim):.3f} bytes/value on disk (D={dim}, {frames} frames; fit apart)")
    assert stored / (frames * dim) <= 0.25


# --- tpcap: tpca of what the layer below does not predict -------------------------------------------------


def residual_stream(rng: np.random.Generator, lengths: np.ndarray, n_layers: int, dim: int
                    ) -> tuple[list[np.ndarray], np.ndarray]:
    """Hidden states like a transformer's: each layer the one below, mixed by a random map, plus a smaller
    update of its own (so the layer below predicts most, not all, of it)."""
    x, starts = whisper_like(rng, lengths, dim)
    layers = [x]
    for _ in range(1, n_layers):
        mix = np.eye(dim, dtype=np.float32) + 0.2 * rng.standard_normal((dim, dim)).astype(np.float32) / np.sqrt(dim)
        update, _ = whisper_like(rng, lengths, dim)
        layers.append(layers[-1] @ mix + 0.3 * update)
    return layers, starts


def chain_round_trip(name: str, layers: list[np.ndarray], starts: np.ndarray, **params: Any) -> list[np.ndarray]:
    """Every layer through the codec as a writer and a reader do: fit, encode and decode in layer order."""
    codec = get_codec(name, **params)
    fits = codec.fit_layers(lambda j: layers[j], len(layers), starts)
    out: list[np.ndarray] = []
    for j, stored in enumerate(codec.encode_layers(lambda j: layers[j], len(layers), starts, fits)):
        below = out[-1] if out and codec.chained else None
        out.append(codec.decode({**stored, **fits[j], "starts": starts, "below": below}, slice(None)))
    return out


def ln_mse(x: np.ndarray, y: np.ndarray) -> float:
    def ln(z: np.ndarray) -> np.ndarray:
        return (z - z.mean(-1, keepdims=True)) / (z.std(-1, keepdims=True) + 1e-5)
    return float(np.mean((ln(x) - ln(y)) ** 2))


@pytest.mark.parametrize("plain_name, chained_name", [("tpca", "tpcap"), ("tpcae", "tpcape")])
def test_tpcap_codes_what_the_layer_below_misses_at_tpcas_bytes(plain_name: str, chained_name: str) -> None:
    rng = np.random.default_rng(7)
    layers, starts = residual_stream(rng, rng.integers(40, 160, 12), 4, 64)
    plain, chained = chain_round_trip(plain_name, layers, starts), chain_round_trip(chained_name, layers, starts)
    assert get_codec(chained_name).frame_nbytes(64) == get_codec(plain_name).frame_nbytes(64)
    np.testing.assert_array_equal(chained[0], plain[0])  # the first layer has nothing below: plain tpca
    for j in range(1, len(layers)):
        assert ln_mse(layers[j], chained[j]) < 0.7 * ln_mse(layers[j], plain[j]), j


@pytest.mark.parametrize("name", ["tpcap", "tpcape"])
def test_tpcap_cache_decodes_any_layer_from_the_ones_below(caches: dict[str, str], name: str) -> None:
    r = CacheReader(caches[name])
    fit, top = (r._fit_arrays(r.parts()[0].part_id, j) for j in (0, 2))
    if r.codec.pred == "int8":
        assert fit["pqw"].shape == (0, D)  # the first stored layer: no prediction
        assert top["pqw"].shape == (D, D) and top["pqw"].dtype == np.int8 and top["pqcol"].shape == (2, D)
        assert top["pqin"].shape == (D,) and "ppred" not in top
    else:
        assert fit["ppred"].shape == (0, D) and top["ppred"].shape == (D + 1, D)
    idx = list(range(0, len(r), 3))
    every = r.read_many(idx)
    for layers in ([2], [1], [2, 0], [1, 2]):  # each decoded through the layers below it, whatever is asked
        for a, b in zip(r.read_many(idx, layers), every, strict=True):
            np.testing.assert_array_equal(a, b[:, [LAYERS.index(k) for k in layers]])
    half = r.read_many(idx, dtype=np.float16)  # the loader's float16 is the float32 chain, rounded once
    for a, b in zip(half, every, strict=True):
        np.testing.assert_array_equal(a, b.astype(np.float16))
    x = np.concatenate([f[:, 2] for f in every])
    assert np.linalg.norm(x - np.concatenate([f[:, 1] for f in every]) * 1.5) < 0.2 * np.linalg.norm(x)


@pytest.mark.parametrize("name", ["tpcap", "tpcape"])
def test_int8_prediction_codes_as_well_as_the_float32_one(name: str) -> None:
    rng = np.random.default_rng(9)
    layers, starts = residual_stream(rng, rng.integers(40, 160, 12), 4, 64)
    codec = get_codec(name, pred="int8")
    assert codec.params["pred"] == "int8" and codec.torch_decodable
    assert not get_codec(name, pred="float32").torch_decodable
    assert get_codec(name).pred == "int8" and get_codec(name).torch_decodable
    fits = codec.fit_layers(lambda j: layers[j], len(layers), starts)
    int8 = chain_round_trip(name, layers, starts, pred="int8")
    float32 = chain_round_trip(name, layers, starts, pred="float32")
    # rounding w and the state below to int8 costs tpcap < 10%; tpcape codes the residual finer (deadzone,
    # centroids, groups of 8), so the same rounding is a larger share of its smaller error (1.17x here on
    # synthetic frames; +1.7% on Whisper tiny.en's, docs/results.md)
    limit = {"tpcap": 1.1, "tpcape": 1.25}[name]
    for j in range(1, len(layers)):
        assert ln_mse(layers[j], int8[j]) < limit * ln_mse(layers[j], float32[j]), j
        assert np.all(np.abs(fits[j]["pqw"].astype(int)).max(axis=0) == 127)  # every column uses the range
    with pytest.raises(ValueError, match="pred must be one of"):
        get_codec(name, pred="int4")


def test_exact_product_is_exact_beyond_one_block() -> None:
    rng = np.random.default_rng(10)
    for dim in (64, 1024, 1280, 2100):  # 1280: Whisper large's width, two blocks
        q = rng.integers(-127, 128, (50, dim)).astype(np.float32)
        w = rng.integers(-127, 128, (dim, 40)).astype(np.float32)
        q[:, :3], w[:3] = 127, 127  # the largest sums there are
        want = q.astype(np.int64) @ w.astype(np.int64)
        got = exact_product(q, w)
        blocks = [want_block.astype(np.float32) for want_block in
                  (q[:, lo:lo + 1024].astype(np.int64) @ w[lo:lo + 1024].astype(np.int64)
                   for lo in range(0, dim, 1024))]
        np.testing.assert_array_equal(got, np.sum(blocks, axis=0, dtype=np.float32) if len(blocks) > 1
                                      else want.astype(np.float32))
        t = exact_product(torch.from_numpy(q), torch.from_numpy(w))  # what the torch decoder calls
        assert torch.equal(t, torch.from_numpy(got))


def test_one_product_rows_equal_the_blocked_residual() -> None:
    """On the CPU, rows small in L1 take one float32 product of 128 levels - offsets; it must give the blocked
    product's numbers bit for bit (which CUDA computes), in numpy and torch, for a mix of small rows and rows
    with outlier levels (which keep the blocks)."""
    from hff_cache.cache.codecs.tpcae import _ONE_PRODUCT_L1, _blocked_residual, exact_residual

    rng = np.random.default_rng(12)
    dim = 384
    levels = rng.integers(-3, 4, (64, dim)).astype(np.float32)
    levels[::7, 5] = rng.integers(-32767, 32768, len(levels[::7]))  # outliers: too large for one product
    levels[1] = 63  # just inside or near the bound
    offsets = np.sign(levels) * rng.integers(0, 65, dim).astype(np.float32)
    basis = rng.integers(-127, 128, (dim, dim)).astype(np.float32)
    fits = np.abs(levels * 128 - offsets).sum(1) < _ONE_PRODUCT_L1
    assert fits.any() and not fits.all()
    want = _blocked_residual(levels, offsets, basis)
    np.testing.assert_array_equal(exact_residual(levels, offsets, basis), want)
    np.testing.assert_array_equal(exact_residual(levels[fits], offsets[fits], basis), want[fits])  # all fit
    np.testing.assert_array_equal(exact_residual(levels, None, basis), _blocked_residual(levels, None, basis))
    exact = (levels.astype(np.float64) - offsets / 128) @ basis.astype(np.float64)
    np.testing.assert_array_equal(want[fits], exact[fits].astype(np.float32))  # and both are the exact value
    t = exact_residual(*(torch.from_numpy(a) for a in (levels, offsets, basis)))
    assert torch.equal(t, torch.from_numpy(want))


def write_then_strip(url: Path, name: str, old: dict[str, Any]) -> list[np.ndarray]:
    """A cache written with ``old`` params (how the codec behaved before they existed), then those params
    removed from its root, as a cache written then records them; returns what it read before the removal."""
    meta = dataclasses.replace(make_meta(name), codec=CodecSpec(name, old))
    with CacheWriter(str(url), meta, worker="w000") as writer:
        rng = np.random.default_rng(11)
        for i in range(6):
            x, _ = whisper_like(rng, [int(rng.integers(20, 90))], D)
            writer.add(f"u{i}", np.stack([x * (j + 1) for j in range(len(LAYERS))]))
    want = CacheReader(str(url)).read_many(range(6))
    as_older_cache(url, drop_codec_params=tuple(old))
    return want


def test_a_tpcap_cache_from_before_pred_reads_with_its_float32_prediction(tmp_path: Path) -> None:
    want = write_then_strip(tmp_path / "old", "tpcap", {"pred": "float32"})
    r = CacheReader(str(tmp_path / "old"))
    assert "pred" not in r.meta.codec.params and r.codec.pred == "float32"
    assert r._fit_arrays(r.parts()[0].part_id, 1)["ppred"].shape == (D + 1, D)
    for a, b in zip(r.read_many(range(6)), want, strict=True):
        np.testing.assert_array_equal(a, b)
    assert verify_cache(str(tmp_path / "old")).ok
    data = unlabelled(r)
    src = CacheBatches(r, data, ctc=False, in_memory=True)
    assert src.resident == "fp16"  # no torch decoder for the float32 prediction: decoded float16 in RAM
    assert recorded_codec("tpcap", {}).pred == "float32" and get_codec("tpcap").pred == "int8"


@pytest.mark.parametrize("before", ["deadzone", "exact"])
@pytest.mark.parametrize("name", ["tpcae", "tpcape"])
def test_an_entropy_coded_cache_from_before_a_param_reads_as_it_was_written(tmp_path: Path, name: str,
                                                                            before: str) -> None:
    # before the deadzone: no deadzone, no centroids, and the levels multiplied in BLAS's order; before the
    # exact decoder (2026-12-07's caches): deadzone and centroids with offsets off the 1/128 grid
    old = {"deadzone": {"deadzone": 0.0, "centroids": False, "exact": False}, "exact": {"exact": False}}[before]
    old = {**old, **({"pred": "float32"} if name == "tpcape" else {})}
    want = write_then_strip(tmp_path / "old", name, old)
    r = CacheReader(str(tmp_path / "old"))
    assert not set(old) & set(r.meta.codec.params) and not r.codec.exact
    assert r.codec.centroids == (before == "exact") and ("pbias" in r.codec.fit_suffixes) == r.codec.centroids
    if before == "exact":  # its offsets were stored as fitted, not on the grid
        pbias = r._fit_arrays(r.parts()[0].part_id, 1)["pbias"]
        assert np.any(pbias * 128 != np.round(pbias * 128))
    for a, b in zip(r.read_many(range(6)), want, strict=True):
        np.testing.assert_array_equal(a, b)
    assert verify_cache(str(tmp_path / "old")).ok
    assert CacheBatches(r, unlabelled(r), ctc=False, in_memory=True).resident == "fp16"  # no exact torch twin
    today = get_codec(name)
    assert today.deadzone > 0 and today.centroids and today.exact and "pbias" in today.fit_suffixes


@pytest.mark.parametrize("name", ["tpcae", "tpcape"])
def test_deadzone_and_centroids_lower_the_error_at_the_same_rate(name: str) -> None:
    rng = np.random.default_rng(9)
    layers, starts = residual_stream(rng, rng.integers(40, 160, 12), 4, 64)
    legacy = {"deadzone": 0.0, "centroids": False}
    new, old = chain_round_trip(name, layers, starts), chain_round_trip(name, layers, starts, **legacy)
    for j in range(len(layers)):
        assert ln_mse(layers[j], new[j]) < 0.97 * ln_mse(layers[j], old[j]), j

    def coded_bytes(**params: Any) -> int:
        codec = get_codec(name, **params)
        fits = codec.fit_layers(lambda j: layers[j], len(layers), starts)
        if codec.centroids:  # each nonzero level moves towards 0 by at most half a step
            assert all(np.all((f["pbias"] >= 0) & (f["pbias"] <= 0.5)) for f in fits)
        return sum(len(encode_levels(np.asarray(stored[MAIN])))
                   for stored in codec.encode_layers(lambda j: layers[j], len(layers), starts, fits))

    assert coded_bytes() < 1.02 * coded_bytes(**legacy)  # the rate control keeps the rate


@pytest.mark.parametrize("layers", [[2], [0, 2], [2, 1]])
def test_tpcap_residency_holds_the_layers_below_the_ones_asked(transcoded: dict[str, str], layers: list[int]) -> None:
    r = CacheReader(transcoded["tpcap"])
    stored = r.meta.layers
    asked = [stored[k] for k in layers]
    data = Task.from_labels("asr", r).prepare(r)
    kw = dict(ctc=True, batch_frames=200, layers=asked)
    codes = CacheBatches(r, data, in_memory=True, **kw)
    streamed = CacheBatches(r, data, in_memory=False, **kw)
    for a, b in zip(codes.epoch(0), streamed.epoch(0), strict=True):
        assert a.feats.shape[2] == len(asked) and torch.equal(a.feats, b.feats)
    assert codes.resident == "codes" and len(codes._codes) == max(layers) + 1  # the chain up to the top asked
    # what --in-memory auto weighs before loading counts the whole chain too
    held = streamed.num_frames * (max(layers) + 1) * r.codec.frame_nbytes(r.meta.encoder.hidden_size)
    assert streamed.resident_nbytes == held


@pytest.mark.parametrize("name", ["tpcap", "tpcape"])
def test_tpcap_layer_without_the_one_below_is_a_clear_error(name: str) -> None:
    rng = np.random.default_rng(8)
    layers, starts = residual_stream(rng, np.array([30, 50]), 2, 64)
    codec = get_codec(name)
    fits = codec.fit_layers(lambda j: layers[j], 2, starts)
    stored = list(codec.encode_layers(lambda j: layers[j], 2, starts, fits))[1]
    with pytest.raises(ValueError, match="decodes from the decoded state below"):
        codec.decode({**stored, **fits[1], "starts": starts}, slice(None))


# --- tpcae / tpcape: one uniform step, the levels entropy-coded -------------------------------------------


def test_ans_codes_levels_losslessly_at_about_the_estimated_bits() -> None:
    rng = np.random.default_rng(11)
    scales = np.exp(rng.uniform(np.log(0.01), np.log(300), 96))
    levels = np.clip(np.rint(rng.laplace(0, scales, (2048, 96))), LEVEL_MIN, LEVEL_MAX).astype(np.int16)
    levels[:, 0] = 0  # a column that never varies
    levels[5, 1], levels[6, 1] = LEVEL_MIN, LEVEL_MAX  # the extremes of the range
    data = encode_levels(levels)
    np.testing.assert_array_equal(decode_levels(data, *levels.shape), levels)
    assert abs(len(data) * 8 / laplace_bits(levels) - 1) < 0.03  # what the rate control plans is what it costs
    for rows in (1, 0):
        np.testing.assert_array_equal(decode_levels(encode_levels(levels[:rows]), rows, 96), levels[:rows])
    with pytest.raises(ValueError, match="damaged"):
        decode_levels(data[:-3], *levels.shape)


def test_entropy_coding_without_constriction_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "constriction", None)  # import constriction now fails
    ans._constriction.cache_clear()
    try:
        with pytest.raises(ImportError, match=re.escape("pip install 'hff-cache[entropy]'")):
            encode_levels(np.zeros((2, 3), np.int16))
        for name in ("tpcae", "tpcape"):  # a writer or a reader asks for the codec first: it fails there
            with pytest.raises(CacheFormatError, match=re.escape("pip install 'hff-cache[entropy]'")):
                get_codec(name)
    finally:
        ans._constriction.cache_clear()


def test_tpcae_beats_tpca_at_equal_bytes_where_variances_span_decades() -> None:
    rng = np.random.default_rng(3)
    lengths = rng.integers(50, 300, 10)
    spread = np.exp(rng.normal(0, 2.0, 128))
    x = (rng.laplace(0, 1, (int(lengths.sum()), 128)) * spread).astype(np.float32)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    codec = get_codec("tpcae")
    stored = codec.encode_part(x, starts, codec.fit(x, starts))
    coded = len(encode_levels(stored[MAIN])) + 2 * len(x) / codec.group  # the levels and one scale per group
    assert coded / x.size <= 0.25
    err = {n: float(np.square(round_trip(n, x, starts, 128) - x).mean()) for n in ("tpca", "tpcae")}
    assert err["tpcae"] < 0.7 * err["tpca"]  # fractional bits where fixed-width codes spend whole ones


@pytest.mark.parametrize("bits", [1.0, 2.0, 3.0])
def test_tpcae_on_disk_lands_on_its_rate(tmp_path: Path, bits: float) -> None:
    rng = np.random.default_rng(8)
    x, _ = whisper_like(rng, [1000] * 6, 256)
    meta = CacheMeta(encoder=EncoderInfo(name="t", hidden_size=256, num_hidden_states=1), layers=[0],
                     codec=CodecSpec("tpcae", {"bits": bits}))
    with CacheWriter(str(tmp_path / "c"), meta) as w:
        for i in range(6):
            w.add(f"u{i}", x[None, i * 1000:(i + 1) * 1000])
    part = tmp_path / "c" / "parts" / "w000-000001"
    stored = sum(f.stat().st_size for f in part.rglob("*") if f.is_file() and f.name != "zarr.json"
                 and f.relative_to(part).parts[0].startswith(("layer_", "pscale_")))  # the codes, not the fit
    assert 0.85 * bits / 8 <= stored / x.size <= 1.03 * bits / 8, stored / x.size
    y = np.concatenate(CacheReader(str(tmp_path / "c")).read_many(range(6)))[:, 0]
    assert np.linalg.norm(y - x) / np.linalg.norm(x) < {1.0: 0.2, 2.0: 0.1, 3.0: 0.065}[bits]
