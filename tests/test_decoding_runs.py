"""Decoding a real (tiny, overfit) run: beam search and LM through `evaluate`, `lm build` and `tune-decoder`,
and subword units end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hff_cache.config import TrainConfig
from hff_cache.evaluation.evaluate import evaluate_run
from hff_cache.model.fusion import FusionConfig
from hff_cache.testing import tiny_cache
from hff_cache.training.cached import train

TEXTS = ["THE CAT SAT", "A DOG RAN", "THE DOG SAT", "A CAT RAN", "THE CAT RAN", "A DOG SAT"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("decode")
    cache = tiny_cache(root / "c", durations=[1.2, 1.0, 1.3, 1.1, 1.2, 1.0], texts=TEXTS)
    # one utterance a step, 40 epochs: close to the training text, with character errors left for an LM to fix
    cfg = TrainConfig(cache=str(cache), valid_cache=str(cache), out=str(root / "run"), epochs=40, lr=3e-3,
                      warmup_steps=5, max_batch_utts=1, spec_time_masks=0, threads=1, seed=0,
                      fusion=FusionConfig(width=64, blocks=2, dropout=0.0))
    train(cfg, log=lambda s: None)
    return root / "run", cache


def _hyps(summary: dict) -> dict[str, str]:
    return {r["id"]: r["hyp"] for r in map(json.loads, Path(summary["hyps"]).read_text().splitlines())}


def test_beam_at_width_one_is_greedy_and_a_wider_beam_is_no_worse(run: tuple[Path, Path]) -> None:
    path, cache = run
    greedy = evaluate_run(path, str(cache), decoder={"kind": "greedy"})
    greedy_hyps = _hyps(greedy)
    one = evaluate_run(path, str(cache), decoder={"kind": "beam", "beam_size": 1})
    assert _hyps(one) == greedy_hyps and one["wer"] == greedy["wer"]
    wide = evaluate_run(path, str(cache), decoder={"kind": "beam", "beam_size": 16})
    assert wide["wer"] <= greedy["wer"] and wide["decoder"]["beam_size"] == 16


def test_lm_from_the_training_text_tuned_and_stored_in_the_run(run: tuple[Path, Path], tmp_path: Path) -> None:
    path, cache = run
    text = tmp_path / "train.txt"
    text.write_text("\n".join(TEXTS) + "\n")
    cli = [sys.executable, "-m", "hff_cache"]
    subprocess.run([*cli, "lm", "build", str(text), "--order", "2", "--out", str(tmp_path / "lm")], check=True,
                   capture_output=True)
    assert "\\data\\" in (tmp_path / "lm" / "lm.arpa").read_text()
    subprocess.run([*cli, "tune-decoder", str(path), "--cache", str(cache), "--lm", str(tmp_path / "lm"),
                    "--lm-weights", "0.5,2", "--word-scores", "0,1", "--beam-size", "16"], check=True,
                   capture_output=True)
    stored = json.loads((path / "decoder.json").read_text())
    assert len(stored["grid"]) == 1 + 4 and stored["decoder"]["kind"] == "beam"
    greedy = evaluate_run(path, str(cache), decoder={"kind": "greedy"})
    tuned = evaluate_run(path, str(cache))  # --decode auto: the run's tuned decoder
    assert tuned["decoder"]["lm_weight"] == stored["decoder"]["lm_weight"]
    assert tuned["wer"] <= greedy["wer"]
    assert min(r["wer"] for r in stored["grid"][1:]) == pytest.approx(tuned["wer"])
    assert greedy["wer"] > 0 and tuned["wer"] < greedy["wer"]  # the training text's LM fixes greedy's errors
    override = evaluate_run(path, str(cache), decoder={"lm_weight": 0.5})
    assert override["decoder"]["lm_weight"] == 0.5 and override["decoder"]["lm"] == stored["decoder"]["lm"]


def test_subword_units_train_and_decode(tmp_path: Path) -> None:
    cache = tiny_cache(tmp_path / "c", texts=TEXTS)
    cfg = TrainConfig(cache=str(cache), valid_cache=str(cache), out=str(tmp_path / "bpe"), units="bpe:20", epochs=2,
                      threads=1, fusion=FusionConfig(width=16, blocks=1))
    metrics = train(cfg, log=lambda s: None)
    doc = json.loads((tmp_path / "bpe" / "config.json").read_text())
    assert doc["task"]["tokenizer"]["type"] == "bpe" and doc["config"]["units"] == "bpe:20"
    beam = evaluate_run(tmp_path / "bpe", str(cache), decoder={"kind": "beam", "beam_size": 1})
    greedy = evaluate_run(tmp_path / "bpe", str(cache), decoder={"kind": "greedy"})
    assert _hyps(beam) == _hyps(greedy) and greedy["wer"] == pytest.approx(metrics["wer"])
    with pytest.raises(ValueError, match="is for --task asr"):
        TrainConfig(cache=str(cache), task="phones", units="bpe:20")
