"""Stage one and the data around it: extract, info, verify, manifest, labels."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import typer

from hff_cache.cli.common import (
    _DATA,
    _LAYERS,
    _MODEL,
    _OUT,
    _STORAGE,
    Flag,
    _fail,
    _key_value,
    _storage_options,
    app,
    config_options,
    config_values,
    with_options,
)
from hff_cache.config import (
    ExtractConfig,
)

EXTRACT_OPTIONS = config_options(ExtractConfig, {
    "model": _MODEL, "data": _DATA, "out": _OUT, "layers": _LAYERS, "storage_options": _STORAGE,
    # under torchrun the job's processes are the shards
    "num_shards": Flag(cli_type=int | None, default=None, help="Split into N duration-balanced shards "
                       "(default: torchrun's WORLD_SIZE, else 1)"),
    "shard_index": Flag(cli_type=int | None, default=None, help="This worker's shard (default: RANK, else 0)"),
})


@app.command()
@with_options(EXTRACT_OPTIONS)
def extract(**options: Any) -> None:
    """Run a frozen encoder once over DATA and store its hidden states in a Zarr cache (resumable)."""
    from hff_cache.cache import CacheFormatError, CacheMismatchError, CacheWriteError
    from hff_cache.extraction.extract import extract as run_extract
    from hff_cache.intake.audio import AudioError
    from hff_cache.intake.manifests import IntakeError
    from hff_cache.runtime.distributed import current

    job = current()  # torchrun's RANK / WORLD_SIZE pick the shard unless given
    try:
        settings = config_values(EXTRACT_OPTIONS, options)
        for name, from_job in (("num_shards", job.world_size), ("shard_index", job.rank)):
            settings[name] = from_job if settings[name] is None else settings[name]
        cfg = ExtractConfig(**settings)  # checks the codec and every other name before the encoder loads
        report = run_extract(cfg)
    except (AudioError, IntakeError, CacheFormatError, CacheMismatchError, CacheWriteError, OSError,
            ValueError) as exc:
        _fail(str(exc))
    out = cfg.out
    if report.extracted == 0 and not report.skipped:
        typer.echo(f"{out}: complete, nothing to do ({report.already_done} utterances already cached)")
        return
    typer.echo(f"{out}: extracted {report.extracted} utterances ({report.audio_seconds / 60:.1f} min audio) in "
               f"{report.wall_seconds:.1f} s = {report.realtime_factor:.1f}x real time; "
               f"{report.already_done} were already cached; {len(report.skipped)} skipped")
    for item in report.skipped:
        where = f" ({item['audio']})" if item["audio"] != item["id"] else ""
        typer.echo(f"  skipped {item['id']}{where}: {item['reason']}", err=True)


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


@app.command()
def verify(
    cache: str = typer.Argument(..., help="Cache path or URL, or a run directory"),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON"),
    values: bool = typer.Option(True, "--values/--no-values", help="Scan features for NaN/Inf (checksums and "
                                "the index are always checked)"),
    storage_option: list[str] = typer.Option([], "--storage-option", help="fsspec option key=value"),
) -> None:
    """Check a cache (index vs arrays, commit-time checksums, NaN/Inf) or a run directory (config, checkpoints,
    tokenizer, metrics and log). Exit 0 when sound, 1 with problems."""
    from pathlib import Path

    from hff_cache.cache import CacheFormatError
    from hff_cache.cache.format import is_url
    from hff_cache.cache.verify import verify_cache

    # a run directory is known by its config.json; tested by name, so verifying a cache never imports torch
    if not is_url(cache) and (Path(cache) / "config.json").is_file():
        from hff_cache.runs.verify import verify_run

        run_rep = verify_run(cache)
        typer.echo(json.dumps(run_rep.to_dict(), indent=2, ensure_ascii=False) if as_json else run_rep.format())
        raise typer.Exit(0 if run_rep.ok else 1)
    try:
        rep = verify_cache(cache, _storage_options(storage_option), scan_values=values)
    except CacheFormatError as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps(rep.to_dict(), indent=2, ensure_ascii=False))
    else:
        status = "OK" if rep.ok else f"{len(rep.problems)} PROBLEM(S)"
        typer.echo(f"{cache}: {status}: {rep.committed_parts} committed parts, {rep.utterances} utterances, "
                   f"{rep.frames} frames, {rep.skipped} skipped inputs; {rep.arrays_checked} arrays checksummed"
                   + (f", {rep.values_checked} feature values finite-checked" if values else "")
                   + f" in {rep.seconds:.1f} s")
        for w in rep.warnings:
            typer.echo(f"  warning: {w}", err=True)
        for p in rep.problems:
            typer.echo(f"  {p.kind}: {p}")
    if not rep.ok:
        raise typer.Exit(1)


@app.command()
def manifest(
    data: list[str] = typer.Argument(..., help="One or more LibriSpeech folders, audio folders, manifests or "
                                     "saved datasets (ids must be unique across them)"),
    out: str = typer.Option(..., "--out", "-o", help="Output JSONL manifest"),
    speakers: str | None = typer.Option(None, help="Comma-separated speakers to keep"),
    holdout: int = typer.Option(0, help="Mark every N-th utterance of each speaker as held out"),
    holdout_speakers: int = typer.Option(0, help="Hold out K whole speakers (speaker-disjoint split)"),
    balance: str | None = typer.Option(None, help="With --holdout-speakers: comma-separated fields to balance "
                                       "the held-out speakers over, e.g. gender,age_group"),
    seed: int = typer.Option(0, help="With --holdout-speakers: which speakers are drawn"),
    take: str = typer.Option("all", help="all | holdout | rest (with --holdout or --holdout-speakers)"),
    tag: list[str] = typer.Option([], help="FIELD=VALUE added to every row (repeatable), e.g. corpus=librispeech: "
                                  "`evaluate --group-by FIELD` then reports each value apart"),
    max_utts: int | None = typer.Option(None, help="Keep N utterances of the selection, evenly spaced in id order"),
    copy_audio: str | None = typer.Option(None, "--copy-audio", help="Copy the selection's audio into DIR as "
                                          "<id>.<ext> (resumable); the manifest points at the copies, relative "
                                          "to its folder when DIR lies inside it"),
    audio_format: str = typer.Option("flac", help="With --copy-audio: flac | wav (source sample rate) | opus "
                                     "(Ogg Opus; 8/12/16/24/48 kHz kept, other rates resampled to 16 kHz)"),
    bitrate: float | None = typer.Option(None, help="With --audio-format opus: target kbit/s, 16 if not given "
                                         "(libsndfile takes 6 to 256)"),
    jobs: int = typer.Option(1, help="With --copy-audio: files encoded in parallel"),
) -> None:
    """Write a JSONL manifest of (a selection of) DATA: some speakers, a per-speaker utterance split, or a
    balanced set of held-out speakers; with --copy-audio, also copies of its audio (e.g. compact Opus to
    upload, decoded back to FLAC on arrival)."""
    from pathlib import Path

    from hff_cache.intake.audio import AudioError
    from hff_cache.intake.copy_audio import copy_audio as run_copy
    from hff_cache.intake.manifests import IntakeError
    from hff_cache.intake.selection import select_utterances
    from hff_cache.tasks.task import write_jsonl

    if copy_audio is None and (audio_format != "flac" or bitrate is not None or jobs != 1):
        _fail("--audio-format, --bitrate and --jobs go with --copy-audio DIR")
    try:
        rows = select_utterances(data, speakers=speakers.split(",") if speakers else None, holdout=holdout,
                                 take=take, holdout_speakers=holdout_speakers,
                                 balance=balance.split(",") if balance else (), seed=seed, max_utts=max_utts)
        tags = dict(_key_value(t, "--tag") for t in tag)
        if copy_audio is not None:
            rows = run_copy(rows, copy_audio, audio_format=audio_format, bitrate_kbps=bitrate, jobs=jobs,
                            relative_to=Path(out).resolve().parent)
    except (AudioError, IntakeError, OSError, ValueError) as exc:
        _fail(str(exc))
    n = write_jsonl(({**row, **tags} for row in rows), out)
    seconds = sum(r["duration"] for r in rows)
    typer.echo(f"{out}: {n} utterances, {seconds / 60:.1f} min")
    if copy_audio is not None:
        size = sum((Path(out).parent / r["audio"]).stat().st_size for r in rows)  # an absolute path stays one
        typer.echo(f"{copy_audio}: {n} audio files ({size / 1e6:.1f} MB, "
                   f"{size * 8 / 1000 / max(seconds, 1e-9):.1f} kbit/s average)")


labels_app = typer.Typer(no_args_is_help=True, help="Make label files (JSONL keyed by utterance id).")


app.add_typer(labels_app, name="labels")


@labels_app.command("phones")
def labels_phones(
    alignments: str | None = typer.Option(None, help="Folder of Montreal Forced Aligner TextGrids (searched "
                                          "recursively)"),
    jsonl: list[str] = typer.Option([], help="A corpus's own phone transcriptions, JSONL {id, phones} "
                                    "(repeatable), e.g. speechocean762's phones.jsonl"),
    out: str = typer.Option(..., "--out", "-o", help="Output JSONL {id, phones}"),
    tier: str = typer.Option("phones", help="TextGrid tier"),
    keep_stress: bool = typer.Option(False, help="Keep ARPAbet stress digits (AH0)"),
) -> None:
    """Phone sequences from TextGrids and/or phone JSONL files, in one phone set (silences sil/sp/spn and empty
    intervals dropped; stress digits stripped unless --keep-stress)."""
    from hff_cache.tasks.phones import phone_labels, phones_from_jsonl
    from hff_cache.tasks.task import LabelError, write_jsonl

    if alignments is None and not jsonl:
        _fail("give --alignments DIR and/or --jsonl FILE")
    try:
        rows = phone_labels(alignments, tier=tier, strip_stress=not keep_stress) if alignments else []
        for path in jsonl:
            rows += phones_from_jsonl(path, strip_stress=not keep_stress)
        dup = sorted(uid for uid, n in Counter(r["id"] for r in rows).items() if n > 1)
        if dup:
            raise LabelError(f"ids {dup[:5]} have phones in more than one source")
        n = write_jsonl(rows, out)
    except (LabelError, OSError) as exc:
        _fail(str(exc))
    typer.echo(f"{out}: {n} utterances")
