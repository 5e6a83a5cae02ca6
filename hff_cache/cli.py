"""The `hff-cache` command line: thin wrappers that parse, call the library and print."""

from __future__ import annotations

import json
import os
import sys

import typer

from hff_cache.config import ExtractConfig, parse_layers

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Extract a frozen speech encoder once into a Zarr feature cache; train layer fusion "
                       "and task heads from it.")


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _storage_options(values: list[str]) -> dict:
    opts: dict = {}
    for kv in values:
        key, _, value = kv.partition("=")
        opts[key] = json.loads(value) if value[:1] in "{[0123456789tfn" and value not in ("",) else value
    return opts


@app.command()
def extract(
    model: str = typer.Option(..., "--model", "-m", help="faster-whisper:base | faster-whisper:tiny.en | a "
                              "CTranslate2 or transformers model folder | hub id in the local HF cache | "
                              "tiny-random:<family>"),
    data: str = typer.Option(..., "--data", "-d", help="Manifest (.jsonl/.csv/.tsv), LibriSpeech folder, "
                             "audio folder, or a datasets folder saved with save_to_disk"),
    out: str = typer.Option(..., "--out", "-o", help="Cache path or fsspec URL (s3://bucket/prefix)"),
    layers: str | None = typer.Option(None, help="Hidden states to store: 'all' (default), '0,3,6', '0-4'"),
    codec: str = typer.Option(ExtractConfig.codec, help="fp16 | int8 | int4"),
    batch_seconds: float = typer.Option(ExtractConfig.batch_seconds, help="Padded audio seconds per batch"),
    device: str = typer.Option(ExtractConfig.device, help="auto | cpu | cuda"),
    precision: str = typer.Option(ExtractConfig.precision, help="auto | fp32 | bf16 | fp16"),
    on_error: str = typer.Option(ExtractConfig.on_error, help="raise | skip (record bad items and go on)"),
    max_seconds: float = typer.Option(ExtractConfig.max_seconds, help="Longest utterance accepted"),
    num_shards: int | None = typer.Option(None, help="Split into N duration-balanced shards "
                                             "(default: torchrun's WORLD_SIZE, else 1)"),
    shard_index: int | None = typer.Option(None, help="This worker's shard (default: RANK, else 0)"),
    storage_option: list[str] = typer.Option([], "--storage-option", help="fsspec option key=value "
                                             "(repeatable), e.g. endpoint_url=http://127.0.0.1:9000"),
    part_frames: int = typer.Option(ExtractConfig.part_frames, help="Frames per committed part"),
    progress: bool = typer.Option(True, help="Show a progress bar"),
) -> None:
    """Run a frozen encoder once over DATA and store its hidden states in a Zarr cache (resumable)."""
    from hff_cache.audio import AudioError
    from hff_cache.cache import CacheFormatError, CacheMismatchError, CacheWriteError
    from hff_cache.data import IntakeError
    from hff_cache.extract import extract as run_extract

    cfg = ExtractConfig(
        model=model, data=data, out=out, layers=parse_layers(layers), codec=codec, batch_seconds=batch_seconds,
        device=device, precision=precision, on_error=on_error, max_seconds=max_seconds,
        num_shards=num_shards if num_shards is not None else int(os.environ.get("WORLD_SIZE", 1)),
        shard_index=shard_index if shard_index is not None else int(os.environ.get("RANK", 0)),
        storage_options=_storage_options(storage_option), progress=progress, part_frames=part_frames,
    )
    try:
        report = run_extract(cfg)
    except (AudioError, IntakeError, CacheFormatError, CacheMismatchError, CacheWriteError, FileNotFoundError,
            ValueError) as exc:
        _fail(str(exc))
    if report.extracted == 0 and not report.skipped:
        typer.echo(f"{out}: complete, nothing to do ({report.already_done} utterances already cached)")
        return
    typer.echo(f"{out}: extracted {report.extracted} utterances ({report.audio_seconds / 60:.1f} min audio) in "
               f"{report.wall_seconds:.1f} s = {report.realtime_factor:.1f}x real time; "
               f"{report.already_done} were already cached; {len(report.skipped)} skipped")
    for item in report.skipped:
        typer.echo(f"  skipped {item['id']}: {item['reason']}", err=True)


@app.command()
def info(
    cache: str = typer.Argument(..., help="Cache path or URL"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON"),
    storage_option: list[str] = typer.Option([], "--storage-option", help="fsspec option key=value"),
) -> None:
    """Summarise a feature cache: utterances, frames, layers, codec, size, model."""
    from hff_cache.cache import CacheFormatError, CacheReader

    try:
        summary = CacheReader(cache, storage_options=_storage_options(storage_option)).info()
    except (CacheFormatError, FileNotFoundError) as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    for key, value in summary.items():
        typer.echo(f"{key:>16}: {value}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted; rerun the same command to resume", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
