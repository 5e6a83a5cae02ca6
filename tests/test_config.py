"""One source of configuration: CLI options derived from the dataclasses, names checked against the registries
before any model loads, config files and `--set`, replay of a run from its config.json, --valid-labels."""

from __future__ import annotations

import dataclasses
import inspect
import json
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
import torch
import typer
from typer.testing import CliRunner

from hff_cache.batches.from_cache import CacheBatches
from hff_cache.cache.codecs import CODECS, FP16Codec
from hff_cache.cli import app
from hff_cache.cli import data as cli_data
from hff_cache.cli import runs as cli_runs
from hff_cache.config import ConfigError, ExtractConfig, TrainConfig, train_config
from hff_cache.model.adapters import METHODS
from hff_cache.model.fusion import FusionConfig, fusion_choices
from hff_cache.tasks.task import LabelWarning, task_choices
from hff_cache.testing import tiny_cache, write_corpus

DURATIONS = [1.0, 1.2, 0.8, 1.5, 1.1, 0.9]
TEXTS = ["AB", "BA", "ABBA", "BAB", "A B", "BB A"]
runner = CliRunner()


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)  # tiny models: more threads only add contention on shared cores
    return tiny_cache(tmp_path_factory.mktemp("config"), DURATIONS, TEXTS)


def _command(name: str) -> Any:
    return typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]


def _at(cfg: Any, key: tuple[str, ...]) -> Any:
    for k in key:
        cfg = getattr(cfg, k)
    return cfg


def _flat_keys(cls: type, within: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Every field's key, a nested config's fields included: ("epochs",), ("fusion", "width"), ..."""
    hints = typing.get_type_hints(cls)
    keys: set[tuple[str, ...]] = set()
    for f in dataclasses.fields(cls):
        key = (*within, f.name)
        keys |= _flat_keys(hints[f.name], key) if dataclasses.is_dataclass(hints[f.name]) else {key}
    return keys


@pytest.fixture()
def captured(monkeypatch: pytest.MonkeyPatch) -> list[TrainConfig]:
    """`train` resolves its config and stops there: the TrainConfig the command would have trained."""
    seen: list[TrainConfig] = []

    def fake_train(cfg: TrainConfig, **_: Any) -> dict[str, Any]:
        seen.append(cfg)
        return {"wer": 0.0}

    monkeypatch.setattr("hff_cache.training.cached.train", fake_train)
    monkeypatch.setattr("hff_cache.training.online.train_online", fake_train)
    return seen


@pytest.fixture()
def nothing_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any encoder load or training run fails the test: the refusal must come first."""
    def boom(*_: Any, **__: Any) -> Any:
        raise AssertionError("a model was loaded before the config was checked")

    for target in ("hff_cache.encoders.load_encoder", "hff_cache.extraction.extract.load_encoder",
                   "hff_cache.training.cached.train", "hff_cache.training.online.train_online",
                   "hff_cache.training.cached.prepare"):
        monkeypatch.setattr(target, boom)


# --- options derived from the dataclasses -------------------------------------------------------------------


def test_train_options_are_the_dataclass_fields_with_their_defaults() -> None:
    params = {p.name: p for p in _command("train").params}
    options = {o.key: o for o in cli_runs.TRAIN_OPTIONS}
    assert set(options) == _flat_keys(TrainConfig)  # every field (fusion's too) is an option, nothing else
    defaults = TrainConfig()
    for key, opt in options.items():
        shown = params[opt.parameter.name].default
        assert opt.parse(shown) == _at(defaults, key), key
    assert params["batch_frames"].default == 10_000 == TrainConfig.batch_frames
    # the batch source has no default of its own that could drift from the config's
    source_defaults = inspect.signature(CacheBatches.__init__).parameters
    for name in ("batch_frames", "max_batch_utts", "shuffle_frames", "num_workers", "prefetch", "in_memory"):
        assert source_defaults[name].default == getattr(defaults, name), name


def test_the_flags_of_the_reference_keep_their_names_and_forms() -> None:
    def names(command: str) -> dict[str, tuple[list[str], list[str]]]:
        return {p.name: (sorted(p.opts), sorted(p.secondary_opts)) for p in _command(command).params}

    train = names("train")
    assert train["out"] == (["--out", "-o"], []) and train["model"] == (["--model", "-m"], [])
    assert train["data"] == (["--data", "-d"], [])
    assert train["fusion_kind"] == (["--fusion"], []) and train["fusion_width"] == (["--width"], [])
    assert train["fusion_layer_norm"] == (["--layer-norm"], ["--no-layer-norm"])
    assert train["online"] == (["--online"], [])  # a switch, no --no-online
    assert train["resume"] == (["--resume"], ["--no-resume"])
    assert train["storage_options"] == (["--storage-option"], [])
    flags = {o for opts, secondary in train.values() for o in (*opts, *secondary)}
    reference = ("--cache --valid-cache --task --labels --layers --groups --blocks --kernel --dropout --top-init "
                 "--rung-gate-init --pooling --normalize --epochs --lr --fusion-lr --weight-decay --lr-schedule "
                 "--warmup-steps --grad-clip --batch-frames --max-batch-utts --spec-time-masks --spec-time-width "
                 "--spec-feat-masks --spec-feat-width --seed --in-memory --num-workers --prefetch --device "
                 "--threads --eval-every --force --valid-data --method --bottleneck --encoder-lr "
                 "--grad-checkpointing --batch-seconds --max-train-utts --max-valid-utts --config --set").split()
    assert set(reference) <= flags
    extract = names("extract")
    assert extract["model"] == (["--model", "-m"], []) and extract["out"] == (["--out", "-o"], [])
    assert extract["progress"] == (["--progress"], ["--no-progress"])
    assert [p.name for p in _command("probe").params if p.required] == ["cache", "valid_cache", "out"]


def test_extract_and_probe_defaults_come_from_the_configs() -> None:
    ext = {p.name: p.default for p in _command("extract").params}
    base = ExtractConfig(model="m", data="d", out="o")
    for opt in cli_data.EXTRACT_OPTIONS:
        name = opt.parameter.name
        if name in ("model", "data", "out", "num_shards", "shard_index"):  # required; torchrun's by default
            continue
        assert opt.parse(ext[name]) == _at(base, opt.key), name
    probe = {p.name: p.default for p in _command("probe").params}
    assert probe["lr"] == TrainConfig.lr and probe["fusion_width"] == FusionConfig.width
    assert probe["batch_frames"] == TrainConfig.batch_frames and probe["epochs"] == cli_runs.PROBE_EPOCHS


# --- names checked against the registries before any model loads ---------------------------------------------


def test_a_bad_codec_fails_before_the_encoder_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    nothing_loads: None) -> None:
    manifest = write_corpus(tmp_path / "audio", [0.5])  # real data: only the codec can stop it early
    monkeypatch.setitem(CODECS, "fp16-test", FP16Codec)  # the message lists the registry as it is now
    res = runner.invoke(app, ["extract", "-m", "tiny-random:wav2vec2", "-d", str(manifest), "-o",
                              str(tmp_path / "c.zarr"), "--codec", "bogus", "--no-progress"])
    assert res.exit_code == 2, res.output
    assert "unknown codec 'bogus'" in res.output
    assert all(name in res.output for name in CODECS) and "fp16-test" in res.output
    assert not (tmp_path / "c.zarr").exists()


@pytest.mark.parametrize("argv,choices", [
    (["--method", "lora"], list(METHODS)),
    (["--fusion", "mean-pool"], [fusion_choices()]),
    (["--task", "translate"], [task_choices()]),
    (["--set", "method=lora"], list(METHODS)),
    (["--set", "fusion.kind=bogus"], [fusion_choices()]),
])
def test_bad_names_are_refused_with_the_registry_choices(cache: Path, tmp_path: Path, nothing_loads: None,
                                                         argv: list[str], choices: list[str]) -> None:
    res = runner.invoke(app, ["train", "--cache", str(cache), "--out", str(tmp_path / "r"), *argv])
    assert res.exit_code == 2, res.output
    assert all(c in res.output for c in choices), res.output
    assert not (tmp_path / "r").exists()


def test_config_rejects_other_bad_values_early() -> None:
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, fp16"):
        ExtractConfig(model="m", data="d", out="o", precision="fp8")
    with pytest.raises(ValueError, match="needs --valid-cache"):
        TrainConfig(cache="c", valid_labels="v.jsonl")
    with pytest.raises(ValueError, match="need --online"):
        TrainConfig(cache="c", model="tiny-random:wav2vec2")
    with pytest.raises(ConfigError, match="epochs in --set must be int, not 'many'"):
        train_config(sets=["epochs=many"])


# --- config files, flags and --set ----------------------------------------------------------------------------


def test_precedence_defaults_file_flags_set(tmp_path: Path, captured: list[TrainConfig]) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("cache: c.zarr\nepochs: 7\nlr: 0.01\nseed: 5\nbatch_frames: 500\nresume: true\n"
                      "layers: 0-2\nfusion:\n  kind: weighted\n  width: 48\n")
    res = runner.invoke(app, ["train", "--config", str(recipe), "--epochs", "5", "--width", "24",
                              "--seed", "0", "--set", "epochs=3", "--set", "fusion.dropout=0.25", "-o", "runs/p"])
    assert res.exit_code == 0, res.output
    (cfg,) = captured
    assert cfg.epochs == 3  # --set over the flag over the file
    assert cfg.fusion.width == 24 and cfg.fusion.dropout == 0.25
    assert cfg.seed == 0  # a flag typed at its default value still beats the file
    assert cfg.fusion.kind == "weighted" and cfg.lr == 0.01 and cfg.batch_frames == 500  # the file's
    assert cfg.layers == [0, 1, 2] and cfg.out == "runs/p"
    assert cfg.max_batch_utts == TrainConfig.max_batch_utts and cfg.fusion.groups == FusionConfig.groups
    assert cfg.resume is False  # run control in a file never turns on by itself


def test_json_file_and_set_forms(tmp_path: Path, captured: list[TrainConfig]) -> None:
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"cache": "s3://b/c.zarr", "valid_cache": "s3://b/v.zarr", "in_memory": False,
                                  "storage_options": {"endpoint_url": "http://127.0.0.1:9000"}}))
    res = runner.invoke(app, ["train", "--config", str(recipe), "--storage-option", "key=abc",
                              "--set", "valid_cache=none", "--set", "fusion.rung_gate_init=none",
                              "--set", "layers=0,3", "--set", "storage_options.anon=false"])
    assert res.exit_code == 0, res.output
    (cfg,) = captured
    assert cfg.valid_cache is None and cfg.fusion.rung_gate_init is None and cfg.layers == [0, 3]
    assert cfg.in_memory is False
    assert cfg.storage_options == {"endpoint_url": "http://127.0.0.1:9000", "key": "abc", "anon": False}


def test_a_yaml_config_without_pyyaml_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = tmp_path / "recipe.yml"
    recipe.write_text("epochs: 3\n")
    assert train_config(recipe).epochs == 3
    monkeypatch.setitem(sys.modules, "yaml", None)  # `import yaml` now fails as if PyYAML were not installed
    with pytest.raises(ConfigError, match=r"needs PyYAML \(pip install pyyaml\), or use a .json config"):
        train_config(recipe)


def test_unknown_keys_are_refused_with_the_valid_ones(tmp_path: Path, nothing_loads: None) -> None:
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"cache": "c.zarr", "epoch": 3}))
    res = runner.invoke(app, ["train", "--config", str(recipe)])
    assert res.exit_code == 2
    assert "unknown setting 'epoch'" in res.output and str(recipe) in res.output
    valid = [f.name for f in dataclasses.fields(TrainConfig)]
    assert all(name in res.output for name in valid), res.output
    res = runner.invoke(app, ["train", "--cache", "c.zarr", "--set", "fusion.widht=512"])
    assert res.exit_code == 2 and "unknown setting 'fusion.widht'" in res.output
    assert all(f.name in res.output for f in dataclasses.fields(FusionConfig)), res.output
    for bad in (["--set", "epochs"], ["--set", "fusion=weighted"]):
        res = runner.invoke(app, ["train", "--cache", "c.zarr", *bad])
        assert res.exit_code == 2 and "error:" in res.output, (bad, res.output)


def test_a_redacted_secret_must_be_given_again(tmp_path: Path, captured: list[TrainConfig]) -> None:
    run_doc = tmp_path / "config.json"
    run_doc.write_text(json.dumps({"mode": "cached", "model": {}, "task": {}, "config": {
        "cache": "s3://b/c.zarr", "storage_options": {"endpoint_url": "http://x", "secret": "<redacted>",
                                                     "client_kwargs": {"aws_session_token": "<redacted>"}}}}))
    res = runner.invoke(app, ["train", "--config", str(run_doc)])
    assert res.exit_code == 2 and not captured
    assert "secret, client_kwargs.aws_session_token are redacted" in res.output and "--storage-option" in res.output
    res = runner.invoke(app, ["train", "--config", str(run_doc), "--storage-option", "secret=s3cr3t",
                              "--storage-option", 'client_kwargs={"aws_session_token": "t"}'])
    assert res.exit_code == 0, res.output
    assert captured[0].storage_options == {"endpoint_url": "http://x", "secret": "s3cr3t",
                                           "client_kwargs": {"aws_session_token": "t"}}


def test_replay_from_a_runs_config_json_gives_the_same_metrics(cache: Path, tmp_path: Path) -> None:
    first, replay = tmp_path / "x", tmp_path / "y"
    res = runner.invoke(app, ["train", "--cache", str(cache), "--valid-cache", str(cache), "-o", str(first),
                              "--fusion", "weighted", "--width", "16", "--blocks", "1", "--epochs", "2",
                              "--batch-frames", "300", "--seed", "3", "--threads", "1", "--num-workers", "1",
                              "--lr", "3e-3", "--warmup-steps", "2", "--force"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["train", "--config", str(first / "config.json"), "--out", str(replay)])
    assert res.exit_code == 0, res.output
    a, b = (json.loads((run / "metrics.json").read_text()) for run in (first, replay))
    for key in ("wer", "cer", "valid_loss"):
        assert a[key] == b[key], key
    assert a["last"]["train_loss"] == b["last"]["train_loss"]
    ca, cb = (json.loads((run / "config.json").read_text())["config"] for run in (first, replay))
    assert ca["force"] is True and cb["force"] is False  # --force of the first run is not replayed
    assert {k: v for k, v in ca.items() if k not in ("out", "force")} == \
        {k: v for k, v in cb.items() if k not in ("out", "force")}
    assert ca["seed"] == 3 and ca["fusion"]["width"] == 16


# --- --valid-labels -----------------------------------------------------------------------------------------


def test_valid_labels_label_the_validation_cache(cache: Path, tmp_path: Path) -> None:
    """A train/valid split kept in two label files over one cache (a field the cache does not hold)."""
    from hff_cache.training.cached import prepare

    def labels(path: Path, rows: dict[str, str]) -> str:
        path.write_text("".join(json.dumps({"id": uid, "accent": a}) + "\n" for uid, a in rows.items()))
        return str(path)

    train_rows = {"utt000": "north", "utt001": "south", "utt002": "north", "utt003": "south"}
    valid_rows = {"utt004": "south", "utt005": "north"}
    cfg = TrainConfig(cache=str(cache), valid_cache=str(cache), out=str(tmp_path / "r"), task="classify:accent",
                      labels=labels(tmp_path / "train.jsonl", train_rows),
                      valid_labels=labels(tmp_path / "valid.jsonl", valid_rows),
                      fusion=FusionConfig(width=8, blocks=1), num_workers=1)
    with pytest.warns(LabelWarning):  # each cache has utterances its file leaves out
        setup = prepare(cfg, log=lambda _: None)
    assert setup.valid_refs == valid_rows
    assert sorted(setup.train.data.ids) == sorted(train_rows)
    assert setup.doc.config.valid_labels == cfg.valid_labels  # recorded, so a replay reads the same split

