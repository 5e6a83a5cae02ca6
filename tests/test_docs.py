"""The generated CLI reference in docs/ must match the code (regenerate with `make docs`)."""

import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli_reference.md"


def test_cli_reference_is_current(tmp_path: Path) -> None:
    out = tmp_path / "cli.md"
    subprocess.run([sys.executable, "-m", "typer", "hff_cache.cli", "utils", "docs", "--name", "hff-cache",
                    "--title", "hff-cache command reference (generated)", "--output", str(out)],
                   check=True, capture_output=True)
    assert out.read_text() == DOC.read_text(), "docs/cli_reference.md is stale: run `make docs`"
