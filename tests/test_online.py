"""Online mode: what each method trains, parameter counts, the audio batch source, and that the online
run uses the one training loop (run directory, metrics, resume)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hff_cache.batches.from_audio import AudioBatches
from hff_cache.config import TrainConfig
from hff_cache.encoders.tiny import tiny_encoder
from hff_cache.intake.manifests import load_intake
from hff_cache.intake.selection import spread_subset
from hff_cache.model.adapters import enable_grad_checkpointing, setup_method
from hff_cache.model.fusion import FusionConfig
from hff_cache.testing import tiny_cache, write_corpus
from hff_cache.training.loop import fit
from hff_cache.training.online import prepare_online, train_online

FAMILIES = ("wav2vec2", "whisper")
METHODS = ("hff-adapters", "adapters", "bitfit", "full", "hff-frozen")

# Hand counts for the tiny configs (testing.tiny_encoder: D=32, 3 layers, FFN 64; bottleneck 8).
D, LAYERS, FFN, B = 32, 3, 64, 8
ADAPTER = 2 * D + (D * B + B) + (B * D + D)  # LayerNorm, W_down, W_up
BITFIT = {
    # feature projection LN (16) + Linear (32), positional conv (32), encoder LN (32); per layer q k v o
    # (4D), 2 LNs (2D), FFN in (FFN) and out (D). The CNN's GroupNorm bias is frozen (feature encoder).
    "wav2vec2": 16 + D + D + D + LAYERS * (4 * D + 2 * D + FFN + D),
    # conv1, conv2, final LN; per layer q v o (k has no bias), 2 LNs, fc1, fc2
    "whisper": D + D + D + LAYERS * (3 * D + 2 * D + FFN + D),
}
FULL = {
    # feature projection LN(16)+Linear(16->D); weight-normed positional conv (D x D/2 x 16, g (16), bias);
    # encoder LN; per layer 4 attention Linear(D,D), 2 LNs, FFN; the CNN is excluded
    "wav2vec2": (2 * 16 + 16 * D + D) + (D * (D // 2) * 16 + 16 + D) + 2 * D
    + LAYERS * (4 * (D * D + D) + 4 * D + (D * FFN + FFN) + (FFN * D + D)),
    # conv1 (80 mels, k=3), conv2 (k=3), final LN; per layer q, k (no bias), v, o, 2 LNs, FFN;
    # the sinusoidal position table is excluded
    "whisper": (80 * D * 3 + D) + (D * D * 3 + D) + 2 * D
    + LAYERS * (4 * D * D + 3 * D + 4 * D + (D * FFN + FFN) + (FFN * D + D)),
}
HAND = {fam: {"hff-adapters": LAYERS * ADAPTER, "adapters": ADAPTER, "bitfit": BITFIT[fam], "full": FULL[fam],
              "hff-frozen": 0} for fam in FAMILIES}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("online") / "audio", [0.6, 0.8, 0.7, 0.9],
                        ["A B", "BA", "AB C", "C A"])


def _cfg(corpus: Path, out: Path, family: str, method: str, **kw: object) -> TrainConfig:
    base = dict(online=True, model=f"tiny-random:{family}", data=str(corpus), method=method, bottleneck=B,
                out=str(out), epochs=1, lr=1e-3, warmup_steps=0, spec_time_masks=0, device="cpu",
                fusion=FusionConfig(width=16, blocks=1, dropout=0.0), batch_seconds=100.0, num_workers=1,
                threads=1)
    return TrainConfig(**{**base, **kw})


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_one_step_changes_exactly_what_the_method_trains(corpus: Path, tmp_path: Path, family: str,
                                                          method: str) -> None:
    cfg = _cfg(corpus, tmp_path / "run", family, method, max_train_utts=2)
    setup, cfg = prepare_online(cfg, log=lambda s: None)
    encoder = setup.model.encoder
    before, body_before = _params(encoder), _params(setup.model.body)
    metrics = fit(setup, cfg, log=lambda s: None)  # the one training loop
    assert metrics["steps"] == 1
    after = _params(encoder)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    adapter_names = {n for n in before if n.startswith("layer_transforms.")}
    own = set(before) - adapter_names
    cnn = {n for n, p in encoder.named_parameters()
           if any(p is q for q in encoder.frozen_feature_encoder_parameters())}
    assert bool(cnn) == (family == "wav2vec2")
    assert not changed & cnn  # the wav2vec2 CNN never moves
    if method in ("hff-adapters", "adapters"):
        assert not changed & own  # every original weight bit-for-bit unchanged
        n_adapters = LAYERS if method == "hff-adapters" else 1
        assert len(adapter_names) == 6 * n_adapters and changed == adapter_names  # every adapter tensor moved
    elif method == "bitfit":
        assert changed and all(n.endswith("bias") for n in changed)
        trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
        assert changed <= trainable and len(changed) >= 0.9 * len(trainable)
    elif method == "full":
        assert len(changed) >= 0.9 * len(own - cnn) - 1
        assert any(n.endswith("weight") and n in changed for n in own)
    else:  # hff-frozen: the encoder is read, never written
        assert not changed
    body_after = _params(setup.model.body)
    assert any(not torch.equal(body_before[n], body_after[n]) for n in body_before)

    # metrics.json: the paper's count (trainable encoder params, adapters included), separate from fusion+head
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["trainable_encoder_params"] == HAND[family][method]
    assert saved["trainable_fusion_head_params"] == sum(
        p.numel() for n, p in setup.model.named_parameters() if p.requires_grad and not n.startswith("encoder."))
    assert saved["encoder_params"] == sum(p.numel() for p in encoder.encoder_parameters())
    for key in ("step_time_ms", "epoch_seconds", "peak_rss_mb"):
        assert saved[key] > 0
    assert saved["mode"] == "online" and saved["cache_id"] is None

    # the checkpoint holds what the method trained, not the frozen foundation model
    ckpt = load_file(str(tmp_path / "run" / "checkpoints" / "last.safetensors"))
    enc_keys = {k[len("encoder."):] for k in ckpt if k.startswith("encoder.")}
    assert enc_keys == {n for n, p in encoder.named_parameters() if p.requires_grad}


def test_checkpoint_round_trip_rebuilds_the_trained_model(corpus: Path, tmp_path: Path) -> None:
    from hff_cache.runs.loading import load_run

    for method in ("bitfit", "hff-adapters"):
        cfg = _cfg(corpus, tmp_path / method, "wav2vec2", method, max_train_utts=2)
        setup, cfg = prepare_online(cfg, log=lambda s: None)
        fit(setup, cfg, log=lambda s: None)
        loaded = load_run(tmp_path / method, "last", with_encoder=True)
        want, got = setup.model.state_dict(), loaded.model.state_dict()
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want)


def test_adapters_start_near_identity_and_hierarchical_reads_adapted_states() -> None:
    enc = tiny_encoder("wav2vec2").eval()
    waves = [np.random.default_rng(0).standard_normal(8000).astype(np.float32)]
    batch = enc.prepare(waves)
    with torch.no_grad():
        plain = enc(batch)
        setup_method(enc, "hff-adapters", bottleneck=B)
        adapted = enc(batch)
        assert all(torch.allclose(a, b, atol=1e-2) for a, b in zip(plain, adapted, strict=True))
        for adapter in enc.layer_transforms:
            adapter.up.weight.add_(0.5)
        moved = enc(batch)
    assert torch.equal(moved[0], plain[0])  # h_0 precedes every adapter
    assert all(not torch.allclose(m, p, atol=1e-2) for m, p in zip(moved[1:], plain[1:], strict=True))


@pytest.mark.parametrize("family", FAMILIES)
def test_grad_checkpointing_gives_the_same_gradients(family: str) -> None:
    waves = [np.random.default_rng(1).standard_normal(n).astype(np.float32) for n in (9000, 12000)]
    grads = []
    for ckpt in (False, True):
        enc = tiny_encoder(family).eval()
        setup_method(enc, "full")
        if ckpt:
            enable_grad_checkpointing(enc)
        out = enc(enc.prepare(waves), [LAYERS])[0]
        out.pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    assert all(torch.allclose(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-6) for k in grads[0])


def test_audio_batches_plan(corpus: Path) -> None:
    utts = load_intake(corpus) * 3  # 12 utterances (ids repeat; the plan only uses positions)
    enc = tiny_encoder("wav2vec2")
    src = AudioBatches(utts, enc, batch_seconds=2.0, shuffle=True, seed=3, max_batch_utts=4)
    plans = [src.plan(e) for e in (0, 0, 1)]
    assert plans[0] == plans[1] and plans[0] != plans[2]  # a pure function of (seed, epoch)
    for plan in plans:
        assert sorted(p for b in plan for p in b) == list(range(len(utts)))
        for b in plan:
            assert len(b) <= 4 and (len(b) == 1 or max(src.lengths[b]) * len(b) <= 2000)
    batch = next(iter(AudioBatches(utts[:2], enc, targets=[[1, 2], [3]], batch_seconds=10).epoch(0)))
    assert batch.feats is None and batch.inputs is not None
    assert torch.equal(batch.lengths, batch.inputs.frame_lengths)
    assert batch.target_lengths.tolist() == [2, 1] or batch.target_lengths.tolist() == [1, 2]


def test_spread_subset_covers_the_range(corpus: Path) -> None:
    utts = load_intake(corpus)
    assert [u.id for u in spread_subset(utts, 2)] == ["utt000", "utt002"]
    assert len(spread_subset(utts, None)) == len(utts)


def test_hff_frozen_online_features_equal_the_cache(tmp_path: Path) -> None:
    from hff_cache.cache import CacheReader
    from hff_cache.model.batch import Batch
    from hff_cache.model.hff import HFFModel, ModelSpec

    cache = tiny_cache(tmp_path, durations=[0.7, 1.1, 0.9])
    reader = CacheReader(str(cache))
    enc = tiny_encoder("wav2vec2")
    setup_method(enc, "hff-frozen")
    layers = list(range(enc.num_hidden_states))
    model = HFFModel(ModelSpec(fusion={"width": 8, "blocks": 1}, num_layers=len(layers), hidden_size=D,
                               head="ctc", vocab_size=4, layers=layers), encoder=enc).train()
    assert not model.encoder.training  # the encoder stays in eval mode (see model.py)
    utts = load_intake(tmp_path / "audio" / "manifest.jsonl")
    src = AudioBatches(utts, enc, batch_seconds=100)
    batch: Batch = next(iter(src.epoch(0)))
    feats = model.features(batch)
    assert not feats.requires_grad  # no graph through a frozen encoder
    for i, uid in enumerate(batch.ids):
        n = int(batch.lengths[i])
        cached = torch.from_numpy(reader.read(uid, layers)).float()  # (T, L, D) in fp16
        assert cached.shape == feats[i, :n].shape
        torch.testing.assert_close(feats[i, :n], cached, rtol=2e-3, atol=2e-3)
        assert not feats[i, n:].any()


def test_online_resume_equals_uninterrupted(corpus: Path, tmp_path: Path) -> None:
    kw = dict(batch_seconds=1.6, epochs=2, valid_data=str(corpus), lr_schedule="constant")
    full = train_online(_cfg(corpus, tmp_path / "a", "wav2vec2", "hff-adapters", **kw), log=lambda s: None)
    train_online(_cfg(corpus, tmp_path / "b", "wav2vec2", "hff-adapters", **{**kw, "epochs": 1}),
                 log=lambda s: None)
    resumed = train_online(_cfg(corpus, tmp_path / "b", "wav2vec2", "hff-adapters", **kw, resume=True),
                           log=lambda s: None)
    assert full["steps"] == resumed["steps"] >= 4
    a = load_file(str(tmp_path / "a" / "checkpoints" / "last.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoints" / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert full["wer"] == resumed["wer"]
    doc = json.loads((tmp_path / "a" / "config.json").read_text())
    assert doc["mode"] == "online" and doc["encoder"]["method"] == "hff-adapters"
    assert (tmp_path / "a" / "curves.png").exists() and (tmp_path / "a" / "log.csv").exists()


def test_online_config_is_resolved_for_last_layer_methods(corpus: Path, tmp_path: Path) -> None:
    setup, cfg = prepare_online(_cfg(corpus, tmp_path / "r", "whisper", "full"), log=lambda s: None)
    assert cfg.fusion.kind == "last" and cfg.layers == [LAYERS] and cfg.encoder_lr == 5e-5
    assert setup.model.spec.layers == [LAYERS]
    with pytest.raises(ValueError, match="method must be one of"):
        TrainConfig(method="lora")


def test_hff_frozen_starts_from_the_cached_models_weights(tmp_path: Path) -> None:
    """For one seed, online hff-frozen is the cached model: same spec, same initial fusion and head."""
    from hff_cache.training.cached import prepare

    cache = tiny_cache(tmp_path, durations=[0.7, 1.1], texts=["A B", "BA"])
    fusion = FusionConfig(width=16, blocks=1)
    cached = prepare(TrainConfig(cache=str(cache), out=str(tmp_path / "c"), fusion=fusion, seed=7),
                     log=lambda s: None)
    online, _ = prepare_online(TrainConfig(online=True, model="tiny-random:wav2vec2", method="hff-frozen",
                                           data=str(tmp_path / "audio" / "manifest.jsonl"), seed=7,
                                           out=str(tmp_path / "o"), fusion=fusion), log=lambda s: None)
    assert online.model.spec == cached.model.spec
    want = cached.model.state_dict()
    got = {k: v for k, v in online.model.state_dict().items() if not k.startswith("encoder.")}
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_evaluate_on_audio_reproduces_the_runs_validation(corpus: Path, tmp_path: Path) -> None:
    """`evaluate RUN --data MANIFEST` runs the run's encoder: for an online run it is the loop's own validation,
    and --group-by reports each value of a manifest field."""
    from hff_cache.evaluation.evaluate import evaluate_run

    cfg = _cfg(corpus, tmp_path / "run", "wav2vec2", "hff-adapters", valid_data=str(corpus), epochs=2)
    metrics = train_online(cfg, log=lambda s: None)
    got = evaluate_run(tmp_path / "run", data=str(corpus), checkpoint="best", device="cpu", group_by="speaker")
    assert got["wer"] == pytest.approx(metrics["wer"]) and got["cer"] == pytest.approx(metrics["cer"])
    assert got["loss"] == pytest.approx(metrics["valid_loss"], rel=1e-5)
    assert set(got["groups"]) == {"spk0", "spk1"} and sum(g["utterances"] for g in got["groups"].values()) == 4
    assert (tmp_path / "run" / "eval" / "manifest" / "hyps.jsonl").exists()
    with pytest.raises(ValueError, match="--cache or --data"):
        evaluate_run(tmp_path / "run")
