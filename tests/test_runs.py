"""The run directory (hff_cache.runs): old runs and caches still read, the run document round-trips, a run is
locked while it trains, damage gives a one-line error naming the file and the fix, `verify RUN`, redaction of
storage secrets, TensorBoard scalars."""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from hff_cache.cache import CacheReader
from hff_cache.cache.verify import verify_cache
from hff_cache.cli import app
from hff_cache.config import TrainConfig
from hff_cache.evaluation.evaluate import evaluate_run
from hff_cache.model.fusion import FusionConfig
from hff_cache.runs.directory import RunDir, RunError
from hff_cache.runs.document import REDACTED, RunDocument
from hff_cache.runs.loading import load_run
from hff_cache.runs.verify import verify_run
from hff_cache.testing import tiny_cache, write_corpus
from hff_cache.training.cached import train
from hff_cache.training.loop import LoopState

FIXTURE = Path(__file__).parent / "fixtures" / "v1_run"  # made by the code of b945023 (see its README)
TEXTS = ["AB", "BA", "ABBA", "BAB"]
SECRETS = {"key": "AKIA-not-a-real-key", "secret": "s3cr3t", "endpoint_url": "http://127.0.0.1:9000",
           "client_kwargs": {"aws_session_token": "tok", "region_name": "eu-west-1"}}


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)  # tiny models: extra threads only add contention on shared cores
    return tiny_cache(tmp_path_factory.mktemp("runs"), [0.6, 0.8, 0.7, 0.9], TEXTS)


def config(cache: Path, out: Path, **kw: object) -> TrainConfig:
    base = dict(cache=str(cache), valid_cache=str(cache), out=str(out), epochs=2, lr=3e-3, batch_frames=400,
                spec_time_masks=0, warmup_steps=5, threads=1, num_workers=1,
                fusion=FusionConfig(kind="weighted", width=16, blocks=1, dropout=0.0))
    return TrainConfig(**{**base, **kw})


@pytest.fixture
def v1(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the old run directory and its training cache (evaluation writes into the run)."""
    shutil.copytree(FIXTURE, tmp_path / "v1")
    return tmp_path / "v1" / "run", tmp_path / "v1" / "cache"


def _files(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()
            and p.name != ".lock"}


def _one_line_error(result: object) -> str:
    """The CLI's error for a refused command: exit 2, one line (after any progress lines), no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    errors = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert errors == [len(lines) - 1], result.output
    return lines[-1]


# --- old runs and caches ---------------------------------------------------------------------------------


def test_v1_cache_fixture_still_reads(v1: tuple[Path, Path]) -> None:
    _, cache_dir = v1
    reader = CacheReader(str(cache_dir))
    assert reader.meta.format_version == 1 and reader.layers == [0, 1, 2, 3]
    assert dict(zip(reader.ids, reader.texts, strict=True)) == {"utt000": "AB", "utt001": "BA", "utt002": "A B",
                                                                "utt003": "BB A"}
    feats = reader.read("utt001")
    assert feats.shape == (int(reader.lengths[reader.index_of("utt001")]), 4, reader.meta.encoder.hidden_size)
    assert reader.cache_id == "da880b2dea5a"  # the id the old run recorded: the identity did not move
    assert verify_cache(str(cache_dir)).ok


def test_v1_run_loads_and_evaluates_to_its_stored_metrics(v1: tuple[Path, Path]) -> None:
    run, cache_dir = v1
    stored = json.loads((run / "metrics.json").read_text())
    loaded = load_run(run)
    assert loaded.model.encoder is None and loaded.doc.mode == "cached" and loaded.config.epochs == 2
    best = evaluate_run(run, str(cache_dir), checkpoint="best", device="cpu")
    assert best["wer"] == pytest.approx(stored["wer"]) and best["cer"] == pytest.approx(stored["cer"])
    assert best["loss"] == pytest.approx(stored["valid_loss"], rel=1e-5)
    last = evaluate_run(run, str(cache_dir), checkpoint="last", device="cpu")
    assert last["cer"] == pytest.approx(stored["last"]["cer"])
    assert last["loss"] == pytest.approx(stored["last"]["valid_loss"], rel=1e-5)
    assert verify_run(run).ok


def test_v1_document_keeps_its_json_layout(v1: tuple[Path, Path]) -> None:
    run, _ = v1
    old = json.loads((run / "config.json").read_text())
    again = RunDocument.from_json(old).to_json()
    assert list(again) == list(old)  # same sections, same order
    assert _holds(again, old)  # every value as it was; newer config fields may only add keys


def _holds(new: object, old: object) -> bool:
    if isinstance(old, dict):
        return isinstance(new, dict) and all(k in new and _holds(new[k], v) for k, v in old.items())
    return new == old


def test_v1_run_resumes_also_from_a_state_without_weights(v1: tuple[Path, Path], tmp_path: Path) -> None:
    """Old resume states: the v1 file as written, and an older one without its own copy of the weights
    (they then come from last.safetensors); both continue to the same weights."""
    run, cache_dir = v1
    older = tmp_path / "older"
    shutil.copytree(run, older)
    state = torch.load(older / "checkpoints/last.state.pt", weights_only=True)
    del state["model"]
    torch.save(state, older / "checkpoints/last.state.pt")
    cfg = TrainConfig.from_dict(json.loads((run / "config.json").read_text())["config"])
    results = []
    for out in (run, older):
        cfg_now = dataclasses.replace(cfg, cache=str(cache_dir), valid_cache=str(cache_dir), out=str(out),
                                      epochs=3, resume=True, device="cpu")
        results.append(train(cfg_now, log=quiet))
    assert results[0]["steps"] == results[1]["steps"] == 3 and results[0]["epochs"] == 3
    a, b = (load_file(str(r / "checkpoints/last.safetensors")) for r in (run, older))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [int(r["epoch"]) for r in RunDir(run).read_log()] == [1, 2, 3]


def test_loop_state_round_trip_and_old_states() -> None:
    st = LoopState(epoch=2, step=7, best=12.5, best_epoch=1, history=[{"epoch": 1}], step_ms=[1.0])
    assert LoopState.from_dict(st.to_dict()) == st
    # an old state lacks timing fields and carries keys the loop pops itself (optimizer, RNG)
    old = LoopState.from_dict({"epoch": 3, "step": 9, "best": None, "best_epoch": None, "history": [],
                               "optimizer": {}, "future_field": 1})
    assert (old.epoch, old.step, old.wait_ms) == (3, 9, [])


# --- the run document -----------------------------------------------------------------------------------


def test_cached_run_document_round_trips_and_redacts(cache: Path, tmp_path: Path) -> None:
    from hff_cache.training.cached import prepare

    setup = prepare(config(cache, tmp_path / "r", storage_options=SECRETS), log=quiet)
    doc = setup.doc
    assert doc.mode == "cached" and doc.world_size == 1 and doc.encoder is None
    assert doc.caches["train"].cache_id == CacheReader(str(cache)).cache_id
    js = doc.to_json()
    assert {"mode", "config", "model", "task", "caches", "environment"} <= set(js) and "encoder" not in js
    assert js["config"]["storage_options"] == {"key": REDACTED, "secret": REDACTED,
                                               "endpoint_url": "http://127.0.0.1:9000",
                                               "client_kwargs": {"aws_session_token": REDACTED,
                                                                 "region_name": "eu-west-1"}}
    back = RunDocument.from_json(json.loads(json.dumps({**js, "from_a_newer_version": {"x": 1}})))
    assert back.model == doc.model and back.task == doc.task and back.caches == doc.caches
    assert back.to_json()["from_a_newer_version"] == {"x": 1}  # kept when the document is rewritten
    assert dataclasses.replace(back.config, storage_options={}) == dataclasses.replace(doc.config,
                                                                                        storage_options={})


def test_online_run_config_redacts_storage_secrets(tmp_path: Path) -> None:
    from hff_cache.training.online import train_online

    manifest = write_corpus(tmp_path / "audio", [0.5, 0.6], ["A B", "BA"])
    cfg = TrainConfig(online=True, model="tiny-random:wav2vec2", data=str(manifest), method="bitfit",
                      out=str(tmp_path / "online"), epochs=1, warmup_steps=0, spec_time_masks=0, device="cpu",
                      fusion=FusionConfig(width=16, blocks=1), threads=1, num_workers=1,
                      storage_options=SECRETS)
    train_online(cfg, log=quiet)
    text = (tmp_path / "online/config.json").read_text()
    for secret in ("AKIA-not-a-real-key", "s3cr3t", '"tok"'):
        assert secret not in text
    doc = RunDir(tmp_path / "online").read_document()
    assert doc.mode == "online" and doc.encoder is not None and doc.encoder.method == "bitfit"
    assert doc.encoder.counts["trainable_encoder_params"] > 0 and doc.data["train"]["utterances"] == 2
    assert doc.config.storage_options["endpoint_url"] == "http://127.0.0.1:9000"
    assert doc.config.storage_options["secret"] == REDACTED
    from hff_cache.evaluation.summary import summarize_runs

    row = summarize_runs([tmp_path / "online"])[0]  # from audio, extraction included: nothing to add
    assert row["extract_seconds"] == 0 and row["total_seconds"] == row["train_seconds"] > 0
    rep = verify_run(tmp_path / "online")  # an online checkpoint holds encoder weights besides fusion and head
    assert rep.ok and rep.checkpoints == ["best", "last"] and rep.mode == "online"


# --- the lock ---------------------------------------------------------------------------------------------

HOLD = """
import sys
from hff_cache.runs.directory import RunDir
held = RunDir(sys.argv[1])
held.acquire_lock()  # what a live `hff-cache train` holds for its whole run
print("locked", flush=True)
sys.stdin.read()  # hold it until killed
"""


def test_a_second_training_into_a_locked_run_is_refused_naming_the_holder(cache: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(config(cache, run, epochs=1), log=quiet)
    before = _files(run)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        # --force would clear the run: refused before anything is touched, naming who trains it
        with pytest.raises(RunError, match=rf"being trained by another process \(pid {holder.pid} on .* since "):
            train(config(cache, run, epochs=1, force=True), log=quiet)
        line = _one_line_error(CliRunner().invoke(app, [
            "train", "--cache", str(cache), "--out", str(run), "--epochs", "2", "--resume", "--threads", "1"]))
        assert f"pid {holder.pid}" in line and "another --out" in line
        assert _files(run) == before  # the first run's files intact
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: the OS drops its lock
        holder.wait(30)
    m = train(config(cache, run, epochs=2, resume=True), log=quiet)
    assert m["epochs"] == 2


def test_the_lock_is_held_for_the_whole_run_and_released_after(cache: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    seen: list[str] = []

    def try_second(epoch: int, row: dict) -> None:  # a second trainer, while the first is between epochs
        try:
            RunDir(run).acquire_lock()
        except RunError as exc:
            seen.append(str(exc))

    train(config(cache, run, epochs=2), on_epoch_end=try_second, log=quiet)
    assert len(seen) == 2 and all("being trained by another process" in s for s in seen)
    second = RunDir(run)
    second.acquire_lock()  # free again once the first has finished
    second.release_lock()


# --- damage -----------------------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


@pytest.fixture
def trained(cache: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    train(config(cache, run), log=quiet)
    return run


def test_truncated_resume_state_is_a_named_error_on_resume(cache: Path, trained: Path) -> None:
    _truncate(trained / "checkpoints/last.state.pt")
    with pytest.raises(RunError, match=r"cannot --resume .*last\.state\.pt is damaged .*start over with --force"):
        train(config(cache, trained, epochs=3, resume=True), log=quiet)
    line = _one_line_error(CliRunner().invoke(app, [
        "train", "--cache", str(cache), "--valid-cache", str(cache), "--out", str(trained), "--epochs", "3",
        "--resume", "--fusion", "weighted", "--width", "16", "--blocks", "1", "--dropout", "0", "--lr", "3e-3",
        "--batch-frames", "400", "--spec-time-masks", "0", "--warmup-steps", "5", "--threads", "1",
        "--num-workers", "1"]))
    assert "last.state.pt is damaged" in line and "--force" in line


def test_truncated_weights_are_a_named_error_on_evaluate(cache: Path, trained: Path) -> None:
    _truncate(trained / "checkpoints/best.safetensors")
    with pytest.raises(RunError, match=r"best\.safetensors is damaged .*--checkpoint last"):
        evaluate_run(trained, str(cache), device="cpu")
    line = _one_line_error(CliRunner().invoke(app, ["evaluate", str(trained), "--cache", str(cache)]))
    assert "best.safetensors is damaged" in line
    assert evaluate_run(trained, str(cache), checkpoint="last", device="cpu")["utterances"] == 4  # the fix works
    line = _one_line_error(CliRunner().invoke(app, ["transcribe", str(trained), "--data",
                                                    str(cache.parent / "audio/manifest.jsonl"), "--device", "cpu"]))
    assert "best.safetensors is damaged" in line


def test_damaged_config_is_a_named_error(cache: Path, trained: Path) -> None:
    text = (trained / "config.json").read_text()
    (trained / "config.json").write_text(text[: len(text) // 2])
    for argv in (["evaluate", str(trained), "--cache", str(cache)],
                 ["transcribe", str(trained), "--data", str(cache.parent / "audio/manifest.jsonl")],
                 ["train", "--cache", str(cache), "--out", str(trained), "--resume", "--threads", "1"]):
        line = _one_line_error(CliRunner().invoke(app, argv))
        assert "config.json is damaged" in line and "--force" in line, argv
    m = train(config(cache, trained, epochs=1, force=True), log=quiet)  # the fix it names
    assert m["epochs"] == 1 and verify_run(trained).ok


# --- verify RUN -------------------------------------------------------------------------------------------


def test_verify_run_good_and_bad(trained: Path) -> None:
    good = CliRunner().invoke(app, ["verify", str(trained)])
    assert good.exit_code == 0, good.output
    assert "OK: cached run, finished, 2 of 2 epochs done" in good.output and "best, last" in good.output
    report = json.loads(CliRunner().invoke(app, ["verify", str(trained), "--json"]).output)
    assert report["ok"] is True and report["finished"] is True and report["checkpoints"] == ["best", "last"]

    _truncate(trained / "checkpoints/last.safetensors")
    log = (trained / "log.csv").read_text().splitlines()
    (trained / "log.csv").write_text("\n".join(log[:-1]) + "\n")  # the last epoch's row lost
    bad = CliRunner().invoke(app, ["verify", str(trained), "--json"])
    assert bad.exit_code == 1
    problems = {(p["kind"], p["file"]) for p in json.loads(bad.output)["problems"]}
    assert problems == {("checkpoint", "checkpoints/last.safetensors"), ("log", "log.csv")}
    text = CliRunner().invoke(app, ["verify", str(trained)])
    assert text.exit_code == 1 and "2 PROBLEM(S)" in text.output and "damaged" in text.output


def test_verify_run_finds_a_foreign_checkpoint_and_an_unfinished_run(cache: Path, trained: Path,
                                                                     tmp_path: Path) -> None:
    other = tmp_path / "other"
    train(config(cache, other, epochs=1, fusion=FusionConfig(kind="weighted", width=8, blocks=1)), log=quiet)
    shutil.copy(other / "checkpoints/best.safetensors", trained / "checkpoints/best.safetensors")
    rep = verify_run(trained)
    assert [(p.kind, p.file) for p in rep.problems] == [("checkpoint", "checkpoints/best.safetensors")]
    assert "does not fit the run's model" in rep.problems[0].message
    (other / "metrics.json").unlink()  # as a run killed after its first epoch of two looks
    doc = json.loads((other / "config.json").read_text())
    doc["config"]["epochs"] = 2
    (other / "config.json").write_text(json.dumps(doc))
    rep = verify_run(other)
    assert rep.ok and not rep.finished and rep.epochs_done == 1 and "--resume" in rep.warnings[0]


# --- TensorBoard ------------------------------------------------------------------------------------------


def test_tensorboard_holds_the_scalars_of_log_csv(cache: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "tb"
    train(config(cache, run, epochs=2, tensorboard=True), log=quiet)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train_loss", "valid_loss", "wer", "cer", "lr", "train_utterances", "epoch", "seconds"} <= tags
    log = RunDir(run).read_log()
    for tag in ("train_loss", "valid_loss", "cer", "lr"):
        points = events.Scalars(tag)
        assert [p.step for p in points] == [int(r["step"]) for r in log]
        assert [p.value for p in points] == pytest.approx([float(r[tag]) for r in log], rel=1e-4)


def test_tensorboard_missing_is_a_clear_error(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    with pytest.raises(RunError, match=r"--tensorboard needs the tensorboard package: pip install "
                                       r"'hff-cache\[tensorboard\]'"):
        train(config(cache, tmp_path / "tb", tensorboard=True), log=quiet)
    assert not (tmp_path / "tb").exists()  # refused before the run directory was touched


def test_summary_reads_runs_through_the_run_directory(trained: Path, tmp_path: Path) -> None:
    from hff_cache.evaluation.summary import summarize_runs

    damaged = tmp_path / "damaged"
    shutil.copytree(trained, damaged)
    (damaged / "metrics.json").write_text('{"wer": ')
    rows = summarize_runs([trained, tmp_path / "nothing", damaged])
    stored = json.loads((trained / "metrics.json").read_text())
    assert rows[0]["run"] == "run" and rows[0]["wer"] == stored["wer"] and rows[0]["fusion"] == "weighted"
    assert [r["task"] for r in rows] == ["asr", "missing", "damaged"]


def test_summary_adds_groups_times_and_a_plot(cache: Path, trained: Path, tmp_path: Path) -> None:
    from hff_cache.evaluation.evaluate import evaluate_run
    from hff_cache.evaluation.summary import format_table, plot_time_against_error, summarize_runs

    evaluate_run(trained, cache=str(cache), group_by="speaker")
    row = summarize_runs([trained], evaluation="cache")[0]
    logged = sum(float(r["seconds"]) for r in RunDir(trained).read_log())
    assert row["train_seconds"] == pytest.approx(logged) and row["train_seconds"] > 0
    assert row["decoder"] == "greedy" and row["wer[all]"] == pytest.approx(row["wer"])
    records = CacheReader(str(cache)).shard_records()  # extraction records its wall time for the summary
    assert row["extract_seconds"] == pytest.approx(sum(r["seconds"] for r in records)) and row["extract_seconds"] > 0
    assert row["total_seconds"] == pytest.approx(row["train_seconds"] + row["extract_seconds"])
    assert {"wer[spk0]", "wer[spk1]", "cer[spk0]"} <= set(row)
    table = format_table([row], markdown=True)
    assert "wer[spk0]" in table and "train_seconds" in table
    plot_time_against_error([row], tmp_path / "wer_time.png")
    assert (tmp_path / "wer_time.png").stat().st_size > 0
    with pytest.raises(RunError, match="no run has both"):
        plot_time_against_error([{"run": "x"}], tmp_path / "none.png")
