"""pipelines/real_speech/gpu.sh, the base table a lent GPU runs, as CI runs it: packed, unpacked and every
method of the table trained for one epoch on CPU from a small synthesised corpus."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from hff_cache.testing import write_corpus

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"asr_last", "asr_hierarchical", "asr_weighted", "asr_last-wide", "online_hff-adapters", "online_full",
           "online_hff-frozen", "online_adapters", "online_bitfit"}


def _manifest(folder: Path, n: int, seed: int, out: Path) -> None:
    texts = [("the cat sat", "a dog ran", "we go home", "it is red")[i % 4] for i in range(n)]
    rows = [json.loads(line) for line in write_corpus(folder, [1.0 + 0.2 * (i % 3) for i in range(n)], texts,
                                                      seed=seed).read_text().splitlines()]
    out.write_text("".join(json.dumps({**r, "audio": str(folder / r["audio"]),
                                       "corpus": ("librispeech", "speechocean762")[i % 2]}) + "\n"
                           for i, r in enumerate(rows)))


def test_gpu_table_dry_run(tmp_path: Path) -> None:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    _manifest(tmp_path / "train_audio", 6, 0, manifests / "train_1h.jsonl")
    _manifest(tmp_path / "valid_audio", 4, 1, manifests / "valid.jsonl")
    out, exp = tmp_path / "out", tmp_path / "exp"
    env = {**os.environ, "OUT": str(out), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    script = [str(ROOT / "pipelines/real_speech/gpu.sh"), "--dry-run", "--manifests", str(manifests), "--exp", str(exp)]
    done = subprocess.run(["bash", *script], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    print(done.stdout)  # the recipe's timestamped log
    packed = list((exp / "pack" / "audio").glob("*/*"))
    assert len(packed) == 10 and all(p.suffix == ".opus" for p in packed)
    exported = exp / "pack" / "home" / "models" / "faster-whisper-base"
    assert json.loads((exported / "export.json").read_text())["kept"].startswith("encoder/")
    with tarfile.open(out / "gpu_table.tar.gz") as tar:
        names = tar.getnames()
    finished = {n.split("/")[1].removeprefix("subset_").removesuffix("-s0") for n in names
                if n.startswith("base/") and n.endswith("/metrics.json") and "/eval/" not in n}
    assert finished == METHODS
    per_domain = [n for n in names if n.endswith("eval/valid/metrics.json")]
    assert len(per_domain) == len(METHODS)
    table = (out / "gpu_table.md").read_text()
    assert all(f"subset_{m}-s0" in table for m in METHODS), table
