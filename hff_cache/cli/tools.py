"""Tools on top: the offline demo, the installation doctor, transcoding a cache to another codec, and exporting
an encoder to carry."""

from __future__ import annotations

import json
from typing import Any

import typer

from hff_cache.cache.codecs import CODECS
from hff_cache.cli.common import (
    Flag,
    _fail,
    _key_value,
    _storage_options,
    _train_errors,
    app,
    config_options,
    config_values,
    with_options,
)
from hff_cache.config import parse_option_value
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


@app.command()
def transcode(
    src: str = typer.Argument(..., help="Cache path or URL to read"),
    dst: str = typer.Argument(..., help="New cache path or URL (rerun the same command to resume)"),
    codec: str = typer.Option(..., "--codec", help=f"{' | '.join(CODECS)} (docs/cache_format.md)"),
    codec_param: list[str] = typer.Option([], "--codec-param", help="Codec parameter KEY=VALUE (repeatable), "
                                          "e.g. block=32 for int4b/nf4b; level=0 stores raw chunks "
                                          "(no zstd: bigger, streams without decompression)"),
    storage_option: list[str] = typer.Option([], "--storage-option", help="fsspec option key=value"),
    shard_frames: int | None = typer.Option(None, help="Frames per stored object of a layer in DST (zarr "
                                            "sharding); 0: unsharded; default: SRC's layout"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar"),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON"),
) -> None:
    """Decode the cache SRC and write it anew at DST with another codec (resumable); ids, texts, metadata and
    statistics are kept. Verifies DST: exit 0 when sound, 1 with problems."""
    from hff_cache.cache import CacheFormatError, CacheMismatchError, CacheWriteError, transcode_cache

    bar = _TranscodeBar() if progress else None
    try:
        params = {k: parse_option_value(v) for k, v in (_key_value(t, "--codec-param") for t in codec_param)}
        summary = transcode_cache(src, dst, codec, codec_params=params, progress=bar,
                                  storage_options=_storage_options(storage_option), shard_frames=shard_frames)
    except (CacheFormatError, CacheMismatchError, CacheWriteError, OSError, ValueError) as exc:
        _fail(str(exc))
    finally:
        if bar is not None:
            bar.close()
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        _print_transcode(summary)
    if not summary["ok"]:
        raise typer.Exit(1)


@app.command("export-encoder")
def export_encoder(
    model: str = typer.Argument(..., help="faster-whisper:SIZE or a CTranslate2 model folder"),
    out: str = typer.Option(..., "--out", "-o", help="Folder to write (model.bin + config.json)"),
) -> None:
    """Write a faster-whisper model's encoder alone, byte for byte (base: 40 of 138 MiB), as a folder that
    --model takes: what extraction and online training need on a machine without the model's package."""
    from pathlib import Path

    from hff_cache.encoders.ctranslate2 import ModelNotFoundError
    from hff_cache.encoders.ctranslate2 import export_encoder as write

    try:
        dest = write(model, Path(out))
    except (ModelNotFoundError, OSError, ValueError) as exc:
        _fail(str(exc))
    size = (dest / "model.bin").stat().st_size
    typer.echo(f"{dest}: the encoder of {model}, {size / 2**20:.1f} MiB (use --model {dest})")


class _TranscodeBar:
    """The progress callback of transcode_cache as a tqdm bar, made on the first call (it brings the total)."""

    def __init__(self) -> None:
        self.bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=done, unit="utt", desc="transcode", dynamic_ncols=True)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def _print_transcode(s: dict[str, Any]) -> None:
    bpv = " -> ".join("-" if v is None else f"{v:.3f}" for v in (s["src_bytes_per_value"], s["dst_bytes_per_value"]))
    err = "no utterances to compare" if s["rel_error"] is None else \
        f"relative error {s['rel_error']:.3g} (limit {s['rel_tolerance']:g})"
    typer.echo(f"{s['dst']}: {s['utterances']} utterances {s['src_codec']['name']} -> {s['codec']['name']} "
               f"({s['transcoded']} transcoded now, {s['already_done']} already done) in {s['seconds']:.1f} s; "
               f"{_size(s['src_bytes'])} -> {_size(s['dst_bytes'])}, {bpv} bytes/value; {err}; "
               f"statistics {s['stats']}; " + ("OK" if s["ok"] else f"{len(s['problems'])} PROBLEM(S)"))
    for w in s["warnings"]:
        typer.echo(f"  warning: {w}", err=True)
    for p in s["problems"]:
        typer.echo(f"  {p}")
