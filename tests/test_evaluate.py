"""Metrics agree with jiwer; `evaluate` decodes a run on a cache and writes hyps.jsonl; CLI wiring."""

import json
import shutil

import jiwer
import pytest
import torch
from typer.testing import CliRunner

from hff_cache.cli import app
from hff_cache.evaluation.evaluate import cache_name, evaluate_run
from hff_cache.evaluation.metrics import accuracy, error_rates, task_metrics
from hff_cache.runs.directory import RunError
from hff_cache.testing import tiny_cache

TEXTS = ["AB", "BA", "ABBA", "BAB", "A B", "BB A"]


def test_error_rates_agree_with_jiwer_and_hand_counts():
    refs = ["the cat sat on the mat", "hello world", "a b c"]
    hyps = ["the cat sit on mat", "hello world", "a x b c"]
    r = error_rates(refs, hyps)
    # 1 substitution + 1 deletion + 1 insertion over 11 reference words
    assert r["wer"] == pytest.approx(100 * 3 / 11)
    assert r["wer"] == pytest.approx(100 * jiwer.wer(refs, hyps))
    assert r["cer"] == pytest.approx(100 * jiwer.cer(refs, hyps))
    assert error_rates(["abc"], ["abd"]) == {"wer": 100.0, "cer": pytest.approx(100 / 3)}
    assert task_metrics("phones", ["HH AH L OW"], ["HH L OW"]) == {"per": 25.0}
    assert accuracy(["a", "b", "b", "c"], ["a", "b", "c", "c"]) == 75.0
    with pytest.raises(ValueError):
        error_rates(["a"], [])


def test_cache_name():
    assert cache_name("/x/y/valid.zarr") == "valid"
    assert cache_name("s3://bucket/caches/dev.zarr/") == "dev"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("eval")
    cache = tiny_cache(root, [1.0, 1.2, 0.8, 1.5, 1.1, 0.9], TEXTS)
    run = root / "run"
    result = CliRunner().invoke(app, [
        "train", "--cache", str(cache), "--valid-cache", str(cache), "--out", str(run), "--fusion", "weighted",
        "--width", "32", "--blocks", "1", "--epochs", "3", "--batch-frames", "200", "--threads", "1",
        "--spec-time-masks", "0"])
    assert result.exit_code == 0, result.output
    assert "wer" in result.output
    return cache, run


def test_evaluate_writes_hyps_and_matching_metrics(trained):
    cache, run = trained
    summary = evaluate_run(run, str(cache), checkpoint="last")
    hyps = [json.loads(line) for line in (run / "eval/cache/hyps.jsonl").read_text().splitlines()]
    assert [h["id"] for h in hyps] == [f"utt{i:03d}" for i in range(6)]
    assert [h["ref"] for h in hyps] == TEXTS
    again = error_rates([h["ref"] for h in hyps], [h["hyp"] for h in hyps])
    assert summary["wer"] == pytest.approx(again["wer"]) and summary["cer"] == pytest.approx(again["cer"])
    assert summary["utterances"] == 6
    saved = json.loads((run / "eval/cache/metrics.json").read_text())
    assert saved["wer"] == pytest.approx(summary["wer"])
    # the run's own last-epoch validation on the same cache gives the same numbers
    last = json.loads((run / "metrics.json").read_text())["last"]
    assert last["wer"] == pytest.approx(summary["wer"]) and last["cer"] == pytest.approx(summary["cer"])


def test_evaluate_cli_json(trained):
    cache, run = trained
    result = CliRunner().invoke(app, ["evaluate", str(run), "--cache", str(cache), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert {"wer", "cer", "loss", "hyps", "cache_id"} <= set(out)


def test_evaluate_refuses_another_encoders_cache(trained, tmp_path):
    cache, run = trained
    other = tmp_path / "other.zarr"
    shutil.copytree(cache, other)
    doc = json.loads((other / "zarr.json").read_text())
    doc["attributes"]["hff_cache"]["layers"] = [0, 1, 2, 4]
    (other / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(RunError, match="layers"):
        evaluate_run(run, str(other))
    result = CliRunner().invoke(app, ["evaluate", str(run), "--cache", str(other)])
    assert result.exit_code == 2 and "layers" in result.output


def test_train_cli_refuses_existing_run(trained):
    cache, run = trained
    result = CliRunner().invoke(app, ["train", "--cache", str(cache), "--out", str(run), "--epochs", "1"])
    assert result.exit_code == 2
    assert "--resume" in result.output and "--force" in result.output


def test_evaluate_group_by_reports_each_value_apart(trained):
    cache, run = trained
    summary = evaluate_run(run, str(cache), checkpoint="last", group_by="speaker")
    assert summary["group_by"] == "speaker" and list(summary["groups"]) == ["spk0", "spk1"]
    hyps = {h["id"]: h for h in map(json.loads, (run / "eval/cache/hyps.jsonl").read_text().splitlines())}
    for value, ids in (("spk0", ["utt000", "utt002", "utt004"]), ("spk1", ["utt001", "utt003", "utt005"])):
        group = summary["groups"][value]
        want = error_rates([hyps[i]["ref"] for i in ids], [hyps[i]["hyp"] for i in ids])
        assert group["utterances"] == 3
        assert group["wer"] == pytest.approx(want["wer"]) and group["cer"] == pytest.approx(want["cer"])
    saved = json.loads((run / "eval/cache/metrics.json").read_text())
    assert saved["groups"] == summary["groups"] and saved["wer"] == pytest.approx(summary["wer"])

    result = CliRunner().invoke(app, ["evaluate", str(run), "--cache", str(cache), "--group-by", "speaker"])
    assert result.exit_code == 0, result.output
    assert "speaker=spk0: wer" in result.output and "speaker=spk1: wer" in result.output
    with pytest.raises(RunError, match=r"--group-by corpus: no utterance .* \(fields: speaker\)"):
        evaluate_run(run, str(cache), group_by="corpus")


def test_group_metrics_put_utterances_without_the_field_apart():
    from hff_cache.evaluation.evaluate import MISSING_GROUP, group_metrics

    rows = [{"id": "a", "ref": "x y", "hyp": "x y"}, {"id": "b", "ref": "x", "hyp": "z"},
            {"id": "c", "ref": "x", "hyp": "x"}]
    groups = group_metrics("asr", rows, {"a": "librispeech", "b": "speechocean762", "c": MISSING_GROUP})
    assert groups == {MISSING_GROUP: {"wer": 0.0, "cer": 0.0, "utterances": 1},
                      "librispeech": {"wer": 0.0, "cer": 0.0, "utterances": 1},
                      "speechocean762": {"wer": 100.0, "cer": 100.0, "utterances": 1}}
