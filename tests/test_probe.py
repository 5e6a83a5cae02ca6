"""Layer probe: one run per stored hidden state, each reading only its layer; csv + png."""

import csv
import json

import torch
from typer.testing import CliRunner

from hff_cache.cache import CacheReader
from hff_cache.cli import app
from hff_cache.config import TrainConfig
from hff_cache.model.fusion import FusionConfig
from hff_cache.testing import tiny_cache
from hff_cache.training.probe import probe


def test_probe_one_row_per_layer_reading_one_layer(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    cache = tiny_cache(tmp_path, [0.8, 1.0, 0.6, 1.2], ["AB", "BA", "ABBA", "B A"])
    asked = set()
    real = CacheReader.read_many

    def spy(self, indices, layers=None, **kw):
        asked.add(None if layers is None else tuple(layers))
        return real(self, indices, layers, **kw)

    monkeypatch.setattr(CacheReader, "read_many", spy)
    base = TrainConfig(cache=str(cache), valid_cache=str(cache), fusion=FusionConfig(width=16, blocks=1),
                       epochs=1, batch_frames=300, threads=1, num_workers=1)
    rows = probe(base, tmp_path / "probe", log=lambda s: None)
    assert [r["layer"] for r in rows] == [0, 1, 2, 3]
    assert asked == {(0,), (1,), (2,), (3,)}  # never the full stack
    with (tmp_path / "probe/probe.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [int(r["layer"]) for r in table] == [0, 1, 2, 3]
    assert {"wer", "cer"} <= set(table[0])
    assert (tmp_path / "probe/probe.png").stat().st_size > 1000
    doc = json.loads((tmp_path / "probe/layer_02/config.json").read_text())
    assert doc["model"]["layers"] == [2] and doc["model"]["num_layers"] == 1
    # the CLI reuses finished layers instead of retraining them
    result = CliRunner().invoke(app, ["probe", "--cache", str(cache), "--valid-cache", str(cache), "--out",
                                      str(tmp_path / "probe"), "--epochs", "1"])
    assert result.exit_code == 0, result.output
    assert len(result.stdout.strip().splitlines()) == 5  # header + one line per layer
    # which layer serves which task: one curve per probe folder (a classification probe's error is 100 - acc.)
    gender = tmp_path / "probe_gender"
    gender.mkdir()
    (gender / "probe.csv").write_text("layer,accuracy\n0,60\n1,80\n2,75\n3,70\n")
    png = tmp_path / "layers.png"
    result = CliRunner().invoke(app, ["summary", str(tmp_path / "probe"), str(gender), "--plot-layers", str(png)])
    assert result.exit_code == 0, result.output
    assert "probe_gender/layer_01" in result.stdout and png.stat().st_size > 1000
    result = CliRunner().invoke(app, ["summary", str(tmp_path / "probe/layer_02"), "--plot-layers", str(png)])
    assert result.exit_code != 0 and "no probe folder" in result.output


def test_an_interrupted_probe_resumes_its_layer_instead_of_starting_over(tmp_path):
    torch.set_num_threads(1)
    cache = tiny_cache(tmp_path, [0.8, 1.0, 0.6, 1.2], ["AB", "BA", "ABBA", "B A"])
    base = TrainConfig(cache=str(cache), valid_cache=str(cache), fusion=FusionConfig(width=16, blocks=1),
                       epochs=2, batch_frames=300, threads=1, num_workers=1)

    class Stop(Exception):
        pass

    def stop_after_first_epoch(msg: str) -> None:
        if msg.startswith("epoch 1 "):
            raise Stop  # the process dies after layer 0's first checkpoint

    try:
        probe(base, tmp_path / "probe", layers=[0], log=stop_after_first_epoch)
    except Stop:
        pass
    first = (tmp_path / "probe/layer_00/log.csv").read_text().splitlines()
    seen: list[str] = []
    rows = probe(base, tmp_path / "probe", layers=[0], log=seen.append)
    assert any(s.startswith("probe layer 0: resuming") for s in seen)
    assert not any(s.startswith("epoch 1 ") for s in seen)  # epoch 1 is not trained again
    log = (tmp_path / "probe/layer_00/log.csv").read_text().splitlines()
    assert log[:len(first)] == first and len(log) == 3  # header, epoch 1 as it was, epoch 2
    assert rows[0]["layer"] == 0
