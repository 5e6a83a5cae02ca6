"""The package's import rules: layers down the data flow (pyproject.toml's import-linter contracts), no cycles,
and a cache layer that never loads torch."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = shutil.which("lint-imports", path=str(Path(sys.executable).parent))


def test_importing_the_cache_loads_no_torch() -> None:
    code = ("import sys, hff_cache.cache, hff_cache.cache.verify; "
            "print(sorted(m for m in sys.modules if m in ('torch', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"


def _lint(tree: Path) -> subprocess.CompletedProcess:
    assert LINT is not None, "lint-imports is missing: pip install -e '.[test]'"
    return subprocess.run([LINT, "--no-cache"], cwd=tree, capture_output=True, text=True,
                          env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"})


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "hff_cache", tmp_path / "hff_cache", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_contracts_hold_and_break_when_an_import_points_up(tree: Path) -> None:
    ok = _lint(tree)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "0 broken" in ok.stdout
    # the model importing training: an upward import and, with training -> model, a cycle
    (tree / "hff_cache" / "model" / "heads.py").open("a").write("\nfrom hff_cache.training import loop  # noqa\n")
    bad = _lint(tree)
    assert bad.returncode != 0
    assert "hff_cache.model is not allowed to import hff_cache.training" in bad.stdout


def test_a_cycle_inside_a_package_is_refused(tree: Path) -> None:
    (tree / "hff_cache" / "model" / "blocks.py").open("a").write("\nfrom hff_cache.model import heads  # noqa\n")
    (tree / "hff_cache" / "model" / "heads.py").open("a").write("\nfrom hff_cache.model import blocks  # noqa\n")
    bad = _lint(tree)
    assert bad.returncode != 0 and "No cycles are allowed in hff_cache.model" in bad.stdout
