"""The README's Python API block runs as written, on a tiny run made where the README expects `runs/asr`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from hff_cache.config import TrainConfig
from hff_cache.model.fusion import FusionConfig
from hff_cache.testing import tiny_cache
from hff_cache.training.cached import train

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def test_readme_python_block_transcribes_with_word_times(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert blocks, "README.md shows no Python API block"
    repo = tmp_path / "repo"
    repo.mkdir()
    (tmp_path / "shared").symlink_to(SHARED)
    cache = tiny_cache(tmp_path / "c", family="whisper", texts=["A B", "B A", "A", "B", "A B A", "B B"])
    train(TrainConfig(cache=str(cache), valid_cache=str(cache), out=str(repo / "runs" / "asr"), epochs=1, threads=1,
                      fusion=FusionConfig(width=16, blocks=1)), log=lambda s: None)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-c", blocks[0]], cwd=repo, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("5652-19215-0000 ")  # the file's id, then its text and first word times
