"""benchmarks/gpu.sh, the script a lent GPU machine runs, as CI runs it: a CPU dry run with tiny models."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(ROOT / "benchmarks/gpu.sh"), "--dry-run"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "gpu.jsonl").read_text().splitlines()]
    extract = [r for r in rows if r["check"] == "extract"]
    train = [r for r in rows if r["check"] == "train"]
    assert {r["encoder"] for r in extract} == {r["encoder"] for r in train} == \
        {"tiny-random:whisper", "tiny-random:wav2vec2"}
    assert all(r["x_real_time"] > 0 and r["audio_s"] > 0 for r in extract)
    assert all(r["cached_s_per_utt"] > 0 and r["online_s_per_utt"] > 0 for r in train)
    stream = [r for r in rows if r["check"] == "stream"]
    assert {r["encoder"] for r in stream} == {r["encoder"] for r in train}
    assert all(r["streamed_s"] > 0 and r["floor_s"] > 0 and r["batches"] > 0 for r in stream)
    from hff_cache.batches.device_decode import DECODERS

    decoded = {r["codec"]: r for r in rows if r["check"] == "device_decode"}
    assert set(decoded) == set(DECODERS) and all(r["values_per_s"] > 0 for r in decoded.values())
    assert "GPU check" in (tmp_path / "gpu.md").read_text()
