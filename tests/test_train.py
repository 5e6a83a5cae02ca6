"""The cached training path: HFFModel without an encoder, overfitting, resume, refusals, classification."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hff_cache.cache import CacheReader
from hff_cache.config import TrainConfig
from hff_cache.intake.manifests import IntakeError
from hff_cache.model.augment import SpecAugment
from hff_cache.model.batch import Batch
from hff_cache.model.fusion import FusionConfig
from hff_cache.model.hff import HFFModel, ModelSpec
from hff_cache.runs.directory import RunError
from hff_cache.runs.loading import load_run
from hff_cache.tasks.task import LabelError, LabelWarning
from hff_cache.testing import tiny_cache
from hff_cache.training.cached import train

DURATIONS = [1.0, 1.2, 0.8, 1.5, 1.1, 0.9]
TEXTS = ["AB", "BA", "ABBA", "BAB", "A B", "BB A"]
KINDS = ["last", "single:1", "weighted", "hierarchical"]


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    torch.set_num_threads(1)  # tiny models: extra OpenMP threads only add contention on 2 shared cores
    return tiny_cache(tmp_path_factory.mktemp("train"), DURATIONS, TEXTS)


@pytest.fixture(scope="module")
def other_cache(cache, tmp_path_factory):
    """The same frames, but claiming another encoder (what a cache of another model looks like)."""
    dst = tmp_path_factory.mktemp("other") / "other.zarr"
    shutil.copytree(cache, dst)
    meta_path = dst / "zarr.json"
    doc = json.loads(meta_path.read_text())
    doc["attributes"]["hff_cache"]["encoder"]["name"] = "tiny-random:hubert"
    meta_path.write_text(json.dumps(doc))
    return dst


def config(cache, out, **kw) -> TrainConfig:
    fusion = FusionConfig(kind=kw.pop("kind", "hierarchical"), width=kw.pop("width", 32), blocks=1,
                          dropout=kw.pop("dropout", 0.0), downstream=kw.pop("downstream", "conv"))
    base = dict(cache=str(cache), valid_cache=str(cache), out=str(out), fusion=fusion, epochs=2, lr=3e-3,
                batch_frames=400, spec_time_masks=0, warmup_steps=5, threads=1, num_workers=1)
    return TrainConfig(**{**base, **kw})


def fake_batch(b=3, t=9, layers=4, dim=32, vocab=5):
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([t, t - 3, 4])[:b]
    feats = torch.randn(b, t, layers, dim, generator=g) * torch.logspace(-1, 1, layers)[None, None, :, None]
    targets = torch.randint(1, vocab, (b, 3), generator=g)
    return Batch(ids=[f"u{i}" for i in range(b)], lengths=lengths, targets=targets,
                 target_lengths=torch.tensor([3, 2, 1])[:b], feats=feats)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("head", ["ctc", "classify"])
def test_every_fusion_shapes_and_gradients_without_encoder(kind, head):
    spec = ModelSpec(fusion={"kind": kind, "width": 16, "blocks": 1, "groups": 2}, num_layers=4, hidden_size=32,
                     head=head, vocab_size=5, layers=[0, 1, 2, 3])
    model = HFFModel(spec, augment=SpecAugment(time_masks=1, time_width=2))
    assert model.encoder is None
    batch = fake_batch()
    if head == "classify":
        batch.targets, batch.target_lengths = torch.tensor([0, 4, 2]), None
    model.train()
    out = model(batch, generator=torch.Generator().manual_seed(1))
    assert out.shape == ((3, 9, 5) if head == "ctc" else (3, 5))
    loss = model.loss(out, batch)
    loss.backward()
    assert torch.isfinite(loss)
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if n.startswith("body.fusion"))
    if kind in ("weighted", "hierarchical"):
        assert grads["body.fusion.logits"].abs().sum() > 0  # the layer weights learn


def test_overfits_tiny_cache_without_instantiating_an_encoder(cache, tmp_path, monkeypatch):
    import transformers

    def forbidden(*a, **k):
        raise AssertionError("cached training must not build a transformers model")

    monkeypatch.setattr(transformers.PreTrainedModel, "__init__", forbidden)
    cfg = config(cache, tmp_path / "run", epochs=40, batch_frames=150, eval_every=20, lr=5e-3,
                 width=64)
    metrics = train(cfg, log=quiet)
    assert metrics["last"]["train_loss"] < 0.1
    assert metrics["wer"] == 0.0 and metrics["cer"] == 0.0
    model = load_run(tmp_path / "run").model
    assert model.encoder is None
    run = tmp_path / "run"
    for name in ("config.json", "metrics.json", "log.csv", "curves.png", "layer_weights.png",
                 "checkpoints/best.safetensors", "checkpoints/last.safetensors", "checkpoints/last.state.pt"):
        assert (run / name).exists(), name
    m = json.loads((run / "metrics.json").read_text())
    for key in ("trainable_params", "step_time_ms", "epoch_seconds", "peak_rss_mb", "epochs", "cache_id",
                "best_epoch"):
        assert m[key] is not None, key
    doc = json.loads((run / "config.json").read_text())
    assert {"config", "environment", "caches", "task", "model"} <= set(doc)
    assert doc["task"]["tokenizer"]["type"] == "char"
    log = (run / "log.csv").read_text().splitlines()
    assert log[0].startswith("epoch,step,train_loss,train_utterances,valid_loss,wer,cer") and len(log) == 41
    # every labelled utterance once per epoch
    assert {row.split(",")[3] for row in log[1:]} == {str(len(CacheReader(str(cache))))}


def test_lstm_downstream_trains_and_its_run_replays(cache, tmp_path):
    """A run with the lstm downstream learns the tiny cache, and its config.json rebuilds the same model."""
    cfg = config(cache, tmp_path / "run", epochs=40, batch_frames=150, eval_every=40, lr=5e-3, width=64,
                 downstream="lstm")  # width 64: 32 a direction (16 learns too slowly for 40 epochs)
    metrics = train(cfg, log=quiet)
    assert metrics["last"]["train_loss"] < 0.5 and metrics["cer"] < 30
    run = load_run(tmp_path / "run")
    assert type(run.model.body.downstream).__name__ == "LSTMDownstream"
    assert json.loads((tmp_path / "run/config.json").read_text())["config"]["fusion"]["downstream"] == "lstm"
    with pytest.raises(ValueError, match="downstream must be one of conv, lstm, not 'gru'"):
        config(cache, tmp_path / "bad", downstream="gru")


class Kill(Exception):
    pass


def test_resume_continues_the_same_run(cache, tmp_path):
    kw = dict(epochs=2, dropout=0.1, spec_time_masks=1, spec_time_width=5, batch_frames=150)
    full = train(config(cache, tmp_path / "full", **kw), log=quiet)

    def kill(epoch, row):
        raise Kill

    with pytest.raises(Kill):  # killed right after epoch 1's checkpoint
        train(config(cache, tmp_path / "cut", **kw), on_epoch_end=kill, log=quiet)
    with pytest.raises(RunError, match="--resume"):
        train(config(cache, tmp_path / "cut", **kw), log=quiet)
    resumed = train(config(cache, tmp_path / "cut", resume=True, **kw), log=quiet)
    assert resumed["steps"] == full["steps"] > 2
    assert resumed["epochs"] == 2
    a = load_file(str(tmp_path / "full/checkpoints/last.safetensors"))
    b = load_file(str(tmp_path / "cut/checkpoints/last.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    assert len((tmp_path / "cut/log.csv").read_text().splitlines()) == 3


def test_run_directory_refusals(cache, other_cache, tmp_path):
    train(config(cache, tmp_path / "r", epochs=1), log=quiet)
    with pytest.raises(RunError, match="another config.*lr"):
        train(config(cache, tmp_path / "r", epochs=1, lr=1e-2), log=quiet)
    with pytest.raises(RunError, match="cannot --resume.*lr"):
        train(config(cache, tmp_path / "r", epochs=2, lr=1e-2, resume=True), log=quiet)
    # another encoder's cache: refused, naming what differs
    with pytest.raises(RunError, match="encoder.name"):
        train(config(other_cache, tmp_path / "r", valid_cache=str(other_cache), epochs=2, resume=True), log=quiet)
    with pytest.raises(RunError, match="validation cache.*encoder.name"):
        train(config(cache, tmp_path / "v", valid_cache=str(other_cache)), log=quiet)
    m = train(config(cache, tmp_path / "r", epochs=1, lr=1e-2, force=True), log=quiet)
    assert m["epochs"] == 1


def test_tokenizer_mismatch_is_refused(cache, tmp_path):
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps({"id": f"utt{i:03d}", "text": t + " C"}) + "\n"
                              for i, t in enumerate(TEXTS)))
    train(config(cache, tmp_path / "a", epochs=1), log=quiet)
    train(config(cache, tmp_path / "b", epochs=1, labels=str(labels)), log=quiet)
    with pytest.raises(RunError, match="tokenizer"):  # labels changed the vocabulary under the run
        train(config(cache, tmp_path / "a", epochs=2, resume=True, labels=str(labels)), log=quiet)
    # a checkpoint from another vocabulary dropped into the run
    shutil.copy(tmp_path / "b/checkpoints/best.safetensors", tmp_path / "a/checkpoints/best.safetensors")
    with pytest.raises(RunError, match="tokenizer"):
        load_run(tmp_path / "a")


def test_classify_speaker(cache, tmp_path):
    cfg = config(cache, tmp_path / "spk", task="classify:speaker", epochs=30, eval_every=15,
                 batch_frames=150, lr=1e-2)
    m = train(cfg, log=quiet)
    assert m["metric"] == "accuracy" and m["accuracy"] == 100.0  # memorises 6 utterances of 2 speakers
    doc = json.loads((tmp_path / "spk/config.json").read_text())
    assert doc["task"]["tokenizer"] == {"type": "label", "format": 1, "labels": ["spk0", "spk1"]}


def test_a_labels_file_is_the_split(cache, tmp_path):
    """Cache ids without a row in --labels are left out, even where the cache has its own text or speaker:
    a 1-hour subset of a cache, or a speaker-id split over one cache, must not train on the other rows."""
    def write(name, rows):
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    subset = write("subset.jsonl", [{"id": "utt000"}, {"id": "utt002", "text": "BA"}])  # text: from the cache
    with pytest.warns(LabelWarning, match="4 of 6 utterances"):
        train(config(cache, tmp_path / "asr", labels=subset, valid_labels=subset, epochs=1), log=quiet)
    caches = json.loads((tmp_path / "asr/config.json").read_text())["caches"]
    assert caches["train"]["utterances"] == caches["valid"]["utterances"] == 2
    spk = write("spk.jsonl", [{"id": f"utt{i:03d}"} for i in range(4)])
    with pytest.warns(LabelWarning):
        train(config(cache, tmp_path / "spk", task="classify:speaker", labels=spk, epochs=1), log=quiet)
    assert json.loads((tmp_path / "spk/config.json").read_text())["caches"]["train"]["utterances"] == 4


def test_label_coverage_is_reported(cache, tmp_path):
    labels = tmp_path / "phones.jsonl"
    rows = [{"id": f"utt{i:03d}", "phones": " ".join(t.replace(" ", ""))} for i, t in enumerate(TEXTS)][:4]
    rows.append({"id": "nope-1", "phones": "A"})
    labels.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.warns(LabelWarning) as record:
        m = train(config(cache, tmp_path / "ph", task="phones", labels=str(labels), epochs=1), log=quiet)
    text = " ".join(str(w.message) for w in record)
    assert "'nope-1'" in text and "1 of 5 label ids" in text
    assert "2 of 6 utterances have no usable 'phones' label (2 have no row in the labels file" in text
    assert "'utt004'" in text
    assert "per" in m
    empty = tmp_path / "none.jsonl"
    empty.write_text(json.dumps({"id": "x", "phones": "A"}) + "\n")
    with pytest.raises(LabelError, match="none of its 6 utterances"), pytest.warns(LabelWarning):
        train(config(cache, tmp_path / "none", task="phones", labels=str(empty), epochs=1), log=quiet)
    with pytest.raises(LabelError, match="needs --labels"):
        train(config(cache, tmp_path / "nol", task="phones", epochs=1), log=quiet)


def test_config_round_trip_and_validation():
    cfg = TrainConfig(cache="c", in_memory="no", fusion={"kind": "weighted", "width": 8})
    assert cfg.in_memory is False and cfg.fusion.width == 8
    from hff_cache.config import to_dict

    assert TrainConfig.from_dict(to_dict(cfg)) == cfg
    with pytest.raises(ValueError, match="task"):
        TrainConfig(task="translate")
    assert Path  # keep the import list honest


TEXTGRID = '''File type = "ooTextFile"
Object class = "TextGrid"

xmin = 0.0
xmax = 1.2
tiers? <exists>
size = 2
item []:
	item [1]:
		class = "IntervalTier"
		name = "words"
		xmin = 0.0
		xmax = 1.2
		intervals: size = 1
			intervals [1]:
				xmin = 0.0
				xmax = 1.2
				text = "hello"
	item [2]:
		class = "IntervalTier"
		name = "phones"
		xmin = 0.0
		xmax = 1.2
		intervals: size = 6
			intervals [1]:
				xmin = 0.0
				xmax = 0.1
				text = ""
			intervals [2]:
				xmin = 0.1
				xmax = 0.3
				text = "HH"
			intervals [3]:
				xmin = 0.3
				xmax = 0.5
				text = "AH0"
			intervals [4]:
				xmin = 0.5
				xmax = 0.6
				text = "sp"
			intervals [5]:
				xmin = 0.6
				xmax = 0.9
				text = "L"
			intervals [6]:
				xmin = 0.9
				xmax = 1.2
				text = "OW1"
'''


def test_phone_labels_from_textgrids(tmp_path):
    from typer.testing import CliRunner

    from hff_cache.cli import app
    from hff_cache.tasks.phones import parse_textgrid, phone_labels

    (tmp_path / "al/19/198").mkdir(parents=True)
    (tmp_path / "al/19/198/19-198-0001.TextGrid").write_text(TEXTGRID)
    tiers = parse_textgrid(tmp_path / "al/19/198/19-198-0001.TextGrid")
    assert tiers["words"] == [(0.0, 1.2, "hello")] and len(tiers["phones"]) == 6
    assert phone_labels(tmp_path / "al") == [{"id": "19-198-0001", "phones": "HH AH L OW"}]
    assert phone_labels(tmp_path / "al", strip_stress=False)[0]["phones"] == "HH AH0 L OW1"
    out = tmp_path / "phones.jsonl"
    result = CliRunner().invoke(app, ["labels", "phones", "--alignments", str(tmp_path / "al"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text()) == {"id": "19-198-0001", "phones": "HH AH L OW"}
    with pytest.raises(LabelError, match="no .TextGrid"):
        phone_labels(tmp_path / "empty-dir-that-does-not-exist")


def test_manifest_selection(tmp_path):
    from hff_cache.intake.selection import select_utterances
    from hff_cache.testing import write_corpus

    manifest = write_corpus(tmp_path, [0.2] * 10, ["A"] * 10)  # speakers spk0/spk1 alternate
    assert len(select_utterances(manifest, speakers=["spk1"])) == 5
    held = select_utterances(manifest, holdout=3, take="holdout")
    rest = select_utterances(manifest, holdout=3, take="rest")
    assert {r["speaker"] for r in held} == {"spk0", "spk1"}  # every speaker on both sides
    assert sorted(r["id"] for r in held + rest) == [f"utt{i:03d}" for i in range(10)]
    assert not {r["id"] for r in held} & {r["id"] for r in rest}
    assert Path(rest[0]["audio"]).is_absolute()
    with pytest.raises(IntakeError, match="spk9"):
        select_utterances(manifest, speakers=["spk9"])
