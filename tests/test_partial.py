"""Partial caching (`train --online --from-layer K`): the encoder's top layers run from a cached h_K.

Exactness against the full encoder on audio (tiny Whisper and tiny wav2vec2), equal gradients from cached and
from computed bottom states, refusal of caches that do not fit, resume, and evaluate/transcribe of such a run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hff_cache.cache import CacheReader
from hff_cache.config import ExtractConfig, TrainConfig
from hff_cache.encoders.tiny import tiny_encoder
from hff_cache.evaluation.evaluate import evaluate_run
from hff_cache.evaluation.transcribe import Transcriber
from hff_cache.extraction.extract import extract
from hff_cache.model.adapters import setup_method
from hff_cache.model.batch import Batch
from hff_cache.model.fusion import FusionConfig
from hff_cache.model.hff import HFFModel, ModelSpec
from hff_cache.runs.document import RunError
from hff_cache.runs.loading import load_run
from hff_cache.testing import synthetic_waves, tiny_cache
from hff_cache.training.partial import train_partial

DURATIONS = [0.6, 0.9, 0.7, 1.1, 0.8, 1.0]
TEXTS = ["A B", "BA", "AB C", "C A", "B C", "A C B"]
L = 3  # the tiny encoders' layers


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("partial")
    return {fam: tiny_cache(root / fam, DURATIONS, TEXTS, family=fam) for fam in ("whisper", "wav2vec2")}


def _config(cache: Path, out: Path, family: str = "whisper", **kw: object) -> TrainConfig:
    base = dict(online=True, model=f"tiny-random:{family}", cache=str(cache), valid_cache=str(cache), out=str(out),
                from_layer=1, method="hff-adapters", bottleneck=8, epochs=2, lr=3e-3, warmup_steps=0,
                spec_time_masks=0, batch_frames=400, threads=1, num_workers=1,
                fusion=FusionConfig(kind="hierarchical", width=32, blocks=1, dropout=0.0))
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("family", ["whisper", "wav2vec2"])
def test_top_layers_from_the_cache_match_the_full_encoder(caches, family):
    """Zero-initialised adapters: layers K+1..L from the cached (fp16) h_K give the full encoder's states."""
    reader = CacheReader(caches[family])
    encoder = tiny_encoder(family)
    waves = synthetic_waves(DURATIONS)[:3]  # the cache's own audio (testing.write_corpus, seed 0)
    with torch.no_grad():
        batch = encoder.prepare(waves)
        full = encoder(batch)
        for k in range(L + 1):
            setup_method(encoder, "hff-adapters", 8, from_layer=k)
            for adapter in encoder.layer_transforms:
                if hasattr(adapter, "up"):
                    torch.nn.init.zeros_(adapter.up.weight)
            for i in range(3):
                n = int(batch.frame_lengths[i])
                cached = torch.from_numpy(reader.read(f"utt{i:03d}", layers=[k]).astype("float32"))[None, :, 0]
                top = encoder.forward_from(cached, torch.tensor([n]), k, list(range(k + 1, L + 1)))
                for state, j in zip(top, range(k + 1, L + 1), strict=True):
                    ref = full[j][i, :n]
                    rel = float((state[0] - ref).norm() / ref.norm())
                    assert rel < 5e-3, (family, k, j, rel)  # fp16 storage of h_K, carried up the layers
    # training frees what it never runs; the top still computes the same, the full forward is refused
    encoder.release_below(2)
    assert encoder.released_params > 0
    with torch.no_grad():
        again = encoder.forward_from(full[2], batch.frame_lengths, 2, [3])[0]
    torch.testing.assert_close(again, full[3])
    with pytest.raises(RuntimeError, match="released"):
        encoder(batch)


@pytest.mark.parametrize("family", ["whisper", "wav2vec2"])
def test_a_step_from_cached_states_has_the_gradients_of_a_step_from_audio(family):
    """fp32 bottom states (what an fp32 cache holds) and audio give the same adapter and head gradients."""
    torch.manual_seed(0)
    encoder = tiny_encoder(family)
    setup_method(encoder, "hff-adapters", 8, from_layer=2)
    spec = ModelSpec(fusion={"kind": "hierarchical", "width": 16, "blocks": 1, "dropout": 0.0}, num_layers=L + 1,
                     hidden_size=32, head="ctc", vocab_size=5, layers=list(range(L + 1)), from_layer=2)
    model = HFFModel(spec, encoder=encoder).train()
    waves = synthetic_waves([0.7, 0.5])
    inputs = encoder.prepare(waves)
    with torch.no_grad():
        bottom = encoder(inputs, spec.cached_layers)
    lengths = inputs.frame_lengths
    common = dict(ids=["a", "b"], lengths=lengths, targets=torch.tensor([[1, 2], [3, 0]]),
                  target_lengths=torch.tensor([2, 1]))
    grads = []
    for batch in (Batch(**common, feats=torch.stack(bottom, dim=2)), Batch(**common, inputs=inputs)):
        model.zero_grad()
        model.loss(model(batch), batch).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1]) and any("layer_transforms.2" in n for n in grads[0])
    assert not any("layer_transforms.0" in n or "layer_transforms.1" in n for n in grads[0])
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_mismatched_caches_and_methods_are_refused(caches, tmp_path):
    with pytest.raises(RunError, match="model_class.*file_hash|file_hash"):
        train_partial(_config(caches["wav2vec2"], tmp_path / "a", family="whisper"), log=quiet)
    bottom = tmp_path / "bottom.zarr"  # hidden states 0..1 only: enough for K=1, not for K=2
    extract(ExtractConfig(model="tiny-random:whisper", data=str(caches["whisper"].parent / "audio/manifest.jsonl"),
                          out=str(bottom), layers=[0, 1], progress=False), encoder=tiny_encoder("whisper"))
    with pytest.raises(RunError, match=r"hidden states \[2\] are not stored"):
        train_partial(_config(bottom, tmp_path / "b", from_layer=2), log=quiet)
    with pytest.raises(ValueError, match="--from-layer works with --method hff-adapters, adapters, not full"):
        _config(caches["whisper"], tmp_path / "c", method="full")
    with pytest.raises(RunError, match="hidden states 0..3"):
        train_partial(_config(caches["whisper"], tmp_path / "d", from_layer=4), log=quiet)
    with pytest.raises(ValueError, match="needs --online, --model and --cache"):
        TrainConfig(cache=str(caches["whisper"]), from_layer=1, out=str(tmp_path / "e"))


def test_resume_and_evaluate_and_transcribe(caches, tmp_path):
    cache = caches["whisper"]
    whole = train_partial(_config(cache, tmp_path / "whole", epochs=3), log=quiet)
    train_partial(_config(cache, tmp_path / "parts", epochs=1), log=quiet)
    resumed = train_partial(_config(cache, tmp_path / "parts", epochs=3, resume=True), log=quiet)
    assert resumed["steps"] == whole["steps"]
    assert resumed["valid_loss"] == pytest.approx(whole["valid_loss"], rel=1e-5)
    doc = json.loads((tmp_path / "whole/config.json").read_text())
    assert doc["mode"] == "online" and doc["model"]["from_layer"] == 1 and "train" in doc["caches"]
    assert whole["trainable_encoder_params"] == 2 * (2 * 32 + 32 * 8 + 8 + 8 * 32 + 32)  # adapters in layers 2, 3

    on_cache = evaluate_run(tmp_path / "whole", cache=str(cache))
    on_audio = evaluate_run(tmp_path / "whole", data=str(cache.parent / "audio/manifest.jsonl"))
    assert on_cache["loss"] == pytest.approx(whole["valid_loss"], rel=1e-5)
    assert on_audio["loss"] == pytest.approx(on_cache["loss"], rel=1e-2)  # fp16 h_0, h_1 against computed
    cached_hyps = {r["id"]: r["hyp"] for r in map(json.loads, Path(on_cache["hyps"]).read_text().splitlines())}
    transcriber = Transcriber(load_run(tmp_path / "whole", with_encoder=True))
    wavs = sorted((cache.parent / "audio").glob("*.wav"))
    texts = {t.id: t.text for t in transcriber.transcribe_files(wavs, words=False)}
    assert texts == cached_hyps


def test_a_partial_run_loads_without_being_asked_for_its_encoder(caches, tmp_path):
    train_partial(_config(caches["whisper"], tmp_path / "run", epochs=1, method="adapters", from_layer=2), log=quiet)
    loaded = load_run(tmp_path / "run")  # evaluate on a cache: the top layers need the encoder
    assert loaded.model.encoder is not None
    assert loaded.model.spec.layers == [3] and loaded.model.spec.cached_layers == [2]  # `adapters` reads h_L
    assert evaluate_run(tmp_path / "run", cache=str(caches["whisper"]))["utterances"] == len(DURATIONS)


def test_the_cli_trains_a_partial_run(caches, tmp_path):
    from typer.testing import CliRunner

    from hff_cache.cli import app

    cache = str(caches["wav2vec2"])
    args = ["train", "--online", "--model", "tiny-random:wav2vec2", "--from-layer", "2", "--cache", cache,
            "--valid-cache", cache, "--out", str(tmp_path / "cli"), "--epochs", "1", "--bottleneck", "8",
            "--width", "16", "--threads", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "trainable_encoder_params 616" in result.output  # one adapter, layer 3: 32*8+8 + 8*32+32 + 2*32
    bad = CliRunner().invoke(app, [*args[:-6], "--out", str(tmp_path / "bad"), "--method", "bitfit"])
    assert bad.exit_code != 0 and "--from-layer works with --method" in bad.output
