"""The CTranslate2 -> transformers WhisperEncoder loader reproduces ctranslate2's own encoder output."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from hff_cache.encoders.ctranslate2 import (
    FASTER_WHISPER_PACKAGES,
    FasterWhisperPackage,
    ModelNotFoundError,
    load_whisper_encoder,
    read_ctranslate2_model,
    resolve_faster_whisper,
)


@pytest.fixture(autouse=True)
def _tmp_cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HFF_CACHE_HOME", str(tmp_path / "hff-home"))


def _model_dir(name: str) -> Path:
    try:
        return resolve_faster_whisper(name)
    except ModelNotFoundError as exc:
        pytest.skip(str(exc))


def _features() -> np.ndarray:
    """30 s of deterministic pseudo log-mel features in Whisper's usual range."""
    rng = np.random.default_rng(1234)
    return rng.uniform(-1.0, 1.5, size=(1, 80, 3000)).astype(np.float32)


@pytest.mark.parametrize(
    ("name", "d_model", "layers", "heads"),
    [("tiny.en", 384, 4, 6), ("base", 512, 6, 8)],
)
def test_encoder_matches_ctranslate2(name: str, d_model: int, layers: int, heads: int) -> None:
    ctranslate2 = pytest.importorskip("ctranslate2")
    model_dir = _model_dir(name)
    encoder, config, sha = load_whisper_encoder(model_dir)
    assert (config.d_model, config.encoder_layers, config.encoder_attention_heads) == (d_model, layers, heads)
    assert (config.num_mel_bins, config.max_source_positions) == (80, 1500)
    assert not encoder.training
    assert sha == hashlib.sha256((model_dir / "model.bin").read_bytes()).hexdigest()

    x = _features()
    ct2 = ctranslate2.models.Whisper(str(model_dir), device="cpu", compute_type="float32")
    ref = np.array(ct2.encode(ctranslate2.StorageView.from_array(x), to_cpu=True))
    with torch.no_grad():
        out = encoder(torch.from_numpy(x)).last_hidden_state.numpy()
    assert out.shape == ref.shape == (1, 1500, d_model)
    scale = float(np.abs(ref).max())
    max_diff = float(np.abs(out - ref).max())
    print(f"{name}: max|hf - ct2| = {max_diff:.3g} (activation abs max {scale:.3g})")
    # Same fp16 weights, both computed in fp32: only summation-order noise is allowed
    # (measured ~3e-5 for tiny.en, ~2e-4 for base); a wrong mapping gives O(1) errors.
    assert max_diff <= 1e-4 * scale, (max_diff, scale)


def test_weights_are_copied_exactly() -> None:
    model_dir = _model_dir("tiny.en")
    variables, aliases = read_ctranslate2_model(model_dir / "model.bin")
    assert aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert int(variables["encoder/num_heads"]) == 6
    assert variables["encoder/conv1/weight"].dtype == np.float16
    encoder, _, _ = load_whisper_encoder(model_dir)
    qkv = variables["encoder/layer_2/self_attention/linear_0/weight"]
    attn = encoder.layers[2].self_attn
    for i, proj in enumerate((attn.q_proj, attn.k_proj, attn.v_proj)):
        np.testing.assert_array_equal(proj.weight.detach().numpy(), qkv[i * 384 : (i + 1) * 384])
    np.testing.assert_array_equal(
        variables["encoder/layer_2/self_attention/linear_0/bias"][384:768], 0
    )  # k bias: zero-filled, rightly dropped
    np.testing.assert_array_equal(
        encoder.embed_positions.weight.detach().numpy(), variables["encoder/position_encodings/encodings"]
    )
    only_encoder, _ = read_ctranslate2_model(model_dir / "model.bin", prefix="encoder/")
    assert set(only_encoder) == {k for k in variables if k.startswith("encoder/")}


def test_unknown_model_names_pip_install() -> None:
    with pytest.raises(ModelNotFoundError, match="pip install"):
        resolve_faster_whisper("no-such-whisper")


def test_missing_package_gives_exact_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FasterWhisperPackage(("hff-no-such-pkg",), ("hff_no_such_pkg_xyz",), "data")
    monkeypatch.setitem(FASTER_WHISPER_PACKAGES, "fake", fake)
    with pytest.raises(ModelNotFoundError, match="pip install hff-no-such-pkg"):
        resolve_faster_whisper("fake")


def test_base_assembly_is_idempotent(tmp_path: Path) -> None:
    first = _model_dir("base")
    assert first == tmp_path / "hff-home" / "models" / "faster-whisper-base"
    model_bin = first / "model.bin"
    st = model_bin.stat()
    assert (first / "config.json").is_file() and (first / "vocabulary.txt").is_file()
    assert not [p for p in first.iterdir() if p.name.endswith(".tmp")]

    second = resolve_faster_whisper("base")
    assert second == first
    st2 = model_bin.stat()
    assert (st2.st_mtime_ns, st2.st_ino, st2.st_size) == (st.st_mtime_ns, st.st_ino, st.st_size)
    variables, _ = read_ctranslate2_model(model_bin, prefix="encoder/")  # parses to the end: complete
    assert variables["encoder/conv1/weight"].shape == (512, 80, 3)


def test_exported_encoder_loads_the_same_weights(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from hff_cache.cli import app

    model_dir = _model_dir("tiny.en")
    result = CliRunner().invoke(app, ["export-encoder", "faster-whisper:tiny.en", "--out", str(tmp_path / "enc")])
    assert result.exit_code == 0, result.output
    exported = tmp_path / "enc"
    original, _ = read_ctranslate2_model(model_dir / "model.bin")
    kept, aliases = read_ctranslate2_model(exported / "model.bin")
    assert set(kept) == {k for k in original if k.startswith("encoder/")} and not aliases
    assert (exported / "model.bin").stat().st_size < (model_dir / "model.bin").stat().st_size / 4
    a, config_a, sha_a = load_whisper_encoder(model_dir)
    b, config_b, sha_b = load_whisper_encoder(exported)
    assert config_a.to_dict() == config_b.to_dict()
    assert sha_b == sha_a  # the same encoder bytes keep the source's identity: its runs and caches load
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    bad = CliRunner().invoke(app, ["export-encoder", str(tmp_path), "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "CTranslate2 model.bin" in bad.output

    data = bytearray((exported / "model.bin").read_bytes())
    data[len(data) // 2] ^= 0xFF  # one weight byte changed
    (exported / "model.bin").write_bytes(bytes(data))
    assert load_whisper_encoder(exported)[2] != sha_a  # a changed file no longer claims the source's identity


def test_exported_folder_stands_in_for_a_missing_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FasterWhisperPackage(("hff-no-such-pkg",), ("hff_no_such_pkg_xyz",), "data")
    monkeypatch.setitem(FASTER_WHISPER_PACKAGES, "fake", fake)
    with pytest.raises(ModelNotFoundError, match="export-encoder"):
        resolve_faster_whisper("fake")
    home = tmp_path / "hff-home" / "models" / "faster-whisper-fake"  # HFF_CACHE_HOME, set by the fixture
    home.mkdir(parents=True)
    (home / "model.bin").write_bytes(b"stand-in")
    assert resolve_faster_whisper("fake") == home
