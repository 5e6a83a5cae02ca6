"""Tools on top: the offline demo and the installation doctor."""

from __future__ import annotations

import json
from typing import Any

import typer

from hff_cache.cli.common import (
    Flag,
    _fail,
    _train_errors,
    app,
    config_options,
    config_values,
    with_options,
)
from hff_cache.demo import DemoConfig

_DEMO, _DEMO_SMALL = DemoConfig(out="").resolved(), DemoConfig(out="", small=True).resolved()
DEMO_OPTIONS = config_options(DemoConfig, {  # DemoConfig's fields carry no help: the demo's own words
    "out": Flag(decls=("--out", "-o"), default="demo", help="Output folder (corpus, cache, probe, runs, results.md)"),
    "small": Flag(help=f"Use {_DEMO_SMALL.model} instead of {_DEMO.model}"),
    "num_train": Flag(help=f"Synthetic training utterances (default: {_DEMO.num_train})"),
    "num_valid": Flag(help=f"Synthetic validation utterances (default: {_DEMO.num_valid})"),
    "epochs": Flag(help=f"Epochs per fusion (default: {_DEMO.epochs}; {_DEMO_SMALL.epochs} with --small)"),
    "probe_epochs": Flag(help=f"Epochs per probed layer (default: {_DEMO.probe_epochs}; "
                              f"{_DEMO_SMALL.probe_epochs} with --small)"),
    "model": Flag(hidden=True, help="Encoder override (tests: tiny-random:whisper)"),
    "seed": Flag(help="Seed of the synthetic corpus and of every run"),
    "threads": Flag(help="torch threads (0: torch's default)"),
})


@app.command()
@with_options(DEMO_OPTIONS)
def demo(**options: Any) -> None:
    """The offline demo: synthesise speech, extract once, probe every layer, train three fusions, report."""
    from hff_cache.demo import run_demo

    try:
        run_demo(DemoConfig(**config_values(DEMO_OPTIONS, options)))
    except (*_train_errors(), RuntimeError) as exc:
        _fail(str(exc))


@app.command()
def doctor(
    cache_dir: str = typer.Option(".", help="Where caches will go: free disk is checked there"),
    smoke: bool = typer.Option(True, "--smoke/--no-smoke", help="Run the 2-second extraction smoke test"),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON"),
) -> None:
    """Check this installation: versions, threads, GPU, optional extras and weights, disk, a smoke test.
    Exit 0 when the core works (missing extras are listed with their install command), 1 otherwise."""
    from hff_cache.doctor import diagnose

    report = diagnose(cache_dir, smoke=smoke)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for c in report.checks:
            mark = "ok" if c.ok else ("missing" if c.name.startswith("extra: ") else "FAIL")
            typer.echo(f"{mark:>8}  {c.name}: {c.detail}" + (f"\n          fix: {c.fix}" if c.fix and not c.ok else ""))
    if not report.ok:
        raise typer.Exit(1)
