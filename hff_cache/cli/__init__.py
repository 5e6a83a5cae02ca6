"""The `hff-cache` command line: thin wrappers that parse, call the library and print.

`common` holds the app and the options derived from the config dataclasses; the commands follow the data flow:
`data` (extract, info, verify, manifest, labels), `runs` (train, probe, evaluate, transcribe, summary,
tune-decoder, lm), `tools` (demo, doctor).
"""

from __future__ import annotations

import sys

import typer

from hff_cache.cli import data, runs, tools  # noqa: F401  (importing them registers their commands)
from hff_cache.cli.common import app

__all__ = ["app", "main"]


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted; rerun the same command to resume", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
