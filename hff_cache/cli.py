"""The `hff-cache` command line: thin wrappers that parse, call the library and print."""

from __future__ import annotations

import json
import sys

import typer

from hff_cache.config import ExtractConfig, TrainConfig, parse_layers

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Extract a frozen speech encoder once into a Zarr feature cache; train layer fusion "
                       "and task heads from it.")


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _key_value(text: str, option: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"{option} takes KEY=VALUE, not {text!r}")
    return key.strip(), value


def _storage_options(values: list[str]) -> dict:
    opts: dict = {}
    for kv in values:
        key, _, value = kv.partition("=")
        try:  # JSON values (numbers, true/false, objects); anything else is a string (key=testing)
            opts[key] = json.loads(value) if value[:1] in '{["-0123456789tfn' else value
        except ValueError:
            opts[key] = value
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
    codec: str = typer.Option(ExtractConfig.codec, help="fp16 | int8 | int4 | int4b | nf4b (docs/cache_format.md)"),
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
    from hff_cache.cache import CacheFormatError, CacheMismatchError, CacheWriteError
    from hff_cache.extraction.extract import extract as run_extract
    from hff_cache.intake.audio import AudioError
    from hff_cache.intake.manifests import IntakeError
    from hff_cache.runtime.distributed import current

    job = current()  # torchrun's RANK / WORLD_SIZE pick the shard unless given
    cfg = ExtractConfig(
        model=model, data=data, out=out, layers=parse_layers(layers), codec=codec, batch_seconds=batch_seconds,
        device=device, precision=precision, on_error=on_error, max_seconds=max_seconds,
        num_shards=num_shards if num_shards is not None else job.world_size,
        shard_index=shard_index if shard_index is not None else job.rank,
        storage_options=_storage_options(storage_option), progress=progress, part_frames=part_frames,
    )
    try:
        report = run_extract(cfg)
    except (AudioError, IntakeError, CacheFormatError, CacheMismatchError, CacheWriteError, OSError,
            ValueError) as exc:
        _fail(str(exc))
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
    cache: str = typer.Argument(..., help="Cache path or URL"),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON"),
    values: bool = typer.Option(True, "--values/--no-values", help="Scan features for NaN/Inf (checksums and "
                                "the index are always checked)"),
    storage_option: list[str] = typer.Option([], "--storage-option", help="fsspec option key=value"),
) -> None:
    """Check a cache: index vs arrays, commit-time checksums, NaN/Inf. Exit 0 when sound, 1 with problems."""
    from hff_cache.cache import CacheFormatError
    from hff_cache.cache.verify import verify_cache

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


# --- training, evaluation, probing (hff_cache.train / evaluate / probe / tasks) -----------------------------

_T = TrainConfig  # class attributes hold the defaults; fusion defaults live in FusionConfig (lazy: torch)


def _train_errors() -> tuple[type[Exception], ...]:
    from hff_cache.cache import CacheFormatError
    from hff_cache.runs.directory import RunError
    from hff_cache.tasks.task import LabelError

    return (RunError, LabelError, CacheFormatError, FileNotFoundError, ValueError)


def _fusion_config(kind: str, **given: object) -> object:
    from hff_cache.model.fusion import FusionConfig

    # options left at None keep FusionConfig's defaults
    return FusionConfig(kind=kind, **{k: v for k, v in given.items() if v is not None})


@app.command()
def train(
    cache: str = typer.Option("", help="Training feature cache (not with --online)"),
    valid_cache: str | None = typer.Option(None, help="Validation cache (same encoder, layers, codec)"),
    out: str = typer.Option(_T.out, "--out", "-o", help="Run directory"),
    task: str = typer.Option(_T.task, help="asr | phones | classify:FIELD (e.g. classify:speaker)"),
    labels: str | None = typer.Option(None, help="JSONL labels {id, text|phones|FIELD|label}; override or "
                                         "add to the cache's texts/metas"),
    layers: str | None = typer.Option(None, help="Stored hidden states to use: 'all' (default), '0,3,6'"),
    fusion: str = typer.Option("hierarchical", help="last | single:K | weighted | hierarchical"),
    groups: int | None = typer.Option(None, help="Hierarchical groups G [FusionConfig: 4]"),
    width: int | None = typer.Option(None, help="Fusion/downstream width d [FusionConfig: 256]"),
    blocks: int | None = typer.Option(None, help="Downstream residual blocks [FusionConfig: 2]"),
    kernel: int | None = typer.Option(None, help="Depthwise conv kernel [FusionConfig: 5]"),
    dropout: float | None = typer.Option(None, help="Dropout [FusionConfig: 0.1]"),
    layer_norm: bool | None = typer.Option(None, "--layer-norm/--no-layer-norm",
                                              help="Parameter-free LayerNorm per layer [FusionConfig: on]"),
    top_init: float | None = typer.Option(None, help="Initial logit of each group's top layer [FusionConfig]"),
    rung_gate_init: str | None = typer.Option(None, help="Ladder gate init, or 'none' [FusionConfig]"),
    pooling: str = typer.Option(_T.pooling, help="Classifier pooling: mean | attention"),
    normalize: str = typer.Option(_T.normalize, help="none | stats (standardise layers by cache mean/std)"),
    epochs: int = typer.Option(_T.epochs),
    lr: float = typer.Option(_T.lr, help="AdamW learning rate"),
    fusion_lr: float = typer.Option(_T.fusion_lr, help="Learning rate of the layer-weight logits"),
    weight_decay: float = typer.Option(_T.weight_decay),
    lr_schedule: str = typer.Option(_T.lr_schedule, help="cosine | constant"),
    warmup_steps: int = typer.Option(_T.warmup_steps),
    grad_clip: float = typer.Option(_T.grad_clip, help="Max gradient norm (0: off)"),
    batch_frames: int = typer.Option(_T.batch_frames, help="Padded frames per batch"),
    max_batch_utts: int = typer.Option(_T.max_batch_utts),
    spec_time_masks: int = typer.Option(_T.spec_time_masks),
    spec_time_width: int = typer.Option(_T.spec_time_width, help="Frames"),
    spec_feat_masks: int = typer.Option(_T.spec_feat_masks),
    spec_feat_width: int = typer.Option(_T.spec_feat_width),
    seed: int = typer.Option(_T.seed),
    in_memory: str = typer.Option(str(_T.in_memory), help="auto | true | false: load the cache into RAM"),
    num_workers: int = typer.Option(_T.num_workers, help="Decode threads when streaming"),
    prefetch: int = typer.Option(_T.prefetch, help="Batches decoded ahead"),
    device: str = typer.Option(_T.device, help="auto | cpu | cuda"),
    threads: int = typer.Option(_T.threads, help="torch threads (0: torch's default)"),
    eval_every: int = typer.Option(_T.eval_every, help="Validate every N epochs"),
    resume: bool = typer.Option(False, help="Continue the run in OUT from its last checkpoint"),
    force: bool = typer.Option(False, help="Start over in OUT even if it holds another run"),
    online: bool = typer.Option(False, "--online", help="Run the encoder in the loop on audio instead of a "
                                "cache (adapters, BitFit, full fine-tuning, frozen HFF); see docs/cli.md"),
    model: str = typer.Option("", "--model", "-m", help="Online: encoder, as for extract --model"),
    data: str = typer.Option("", "--data", "-d", help="Online: training audio (manifest, LibriSpeech folder, "
                             "audio folder, saved dataset)"),
    valid_data: str | None = typer.Option(None, help="Online: validation audio"),
    method: str = typer.Option(_T.method, help="Online: hff-adapters | adapters | bitfit | full | hff-frozen"),
    bottleneck: int = typer.Option(_T.bottleneck, help="Online: adapter bottleneck width"),
    encoder_lr: float | None = typer.Option(None, help="Online: LR of the encoder weights full/bitfit train "
                                            "[full 5e-5, bitfit 5e-4]"),
    grad_checkpointing: bool = typer.Option(False, help="Online: recompute encoder layers in the backward "
                                            "pass (less memory, ~1 more forward; for full)"),
    batch_seconds: float = typer.Option(_T.batch_seconds, help="Online: padded audio seconds per batch"),
    max_train_utts: int | None = typer.Option(None, help="Online: train on N evenly spaced utterances"),
    max_valid_utts: int | None = typer.Option(None, help="Online: validate on N evenly spaced utterances"),
    storage_option: list[str] = typer.Option([], "--storage-option", help="fsspec option key=value for "
                                             "s3://... caches (repeatable), e.g. endpoint_url=http://..."),
) -> None:
    """Train layer fusion + a task head on cached features (or, with --online, on audio with the encoder
    in the loop); writes a run directory. Under torchrun: DistributedDataParallel, each rank on its share."""
    from hff_cache.training.cached import train as run_train
    from hff_cache.training.online import train_online

    if online and (cache or valid_cache):
        _fail("--online trains from audio (--data/--valid-data); --cache/--valid-cache are for cached mode")
    if not online and (model or data or valid_data):
        _fail("--model/--data/--valid-data need --online (cached mode reads --cache)")
    try:
        gate = None if rung_gate_init is None else (
            "none" if rung_gate_init.lower() == "none" else float(rung_gate_init))
        fcfg = _fusion_config(fusion, groups=groups, width=width, blocks=blocks, kernel=kernel, dropout=dropout,
                              layer_norm=layer_norm, top_init=top_init)
        if gate is not None:
            fcfg.rung_gate_init = None if gate == "none" else gate  # type: ignore[attr-defined]
        cfg = TrainConfig(
            cache=cache, valid_cache=valid_cache, out=out, task=task, labels=labels, layers=parse_layers(layers),
            fusion=fcfg, pooling=pooling, normalize=normalize, epochs=epochs, lr=lr, fusion_lr=fusion_lr,
            weight_decay=weight_decay, lr_schedule=lr_schedule, warmup_steps=warmup_steps, grad_clip=grad_clip,
            batch_frames=batch_frames, max_batch_utts=max_batch_utts, spec_time_masks=spec_time_masks,
            spec_time_width=spec_time_width, spec_feat_masks=spec_feat_masks, spec_feat_width=spec_feat_width,
            seed=seed, in_memory=in_memory, num_workers=num_workers, prefetch=prefetch, device=device,
            threads=threads, eval_every=eval_every, resume=resume, force=force,
            online=online, model=model, data=data, valid_data=valid_data, method=method, bottleneck=bottleneck,
            encoder_lr=encoder_lr, grad_checkpointing=grad_checkpointing, batch_seconds=batch_seconds,
            max_train_utts=max_train_utts, max_valid_utts=max_valid_utts,
            storage_options=_storage_options(storage_option),
        )
        metrics = train_online(cfg) if online else run_train(cfg)
    except _train_errors() as exc:
        _fail(str(exc))
    keys = ("wer", "cer", "per", "accuracy", "best_epoch", "trainable_params", "trainable_encoder_params",
            "step_time_ms", "epoch_seconds")
    typer.echo(f"{out}: " + ", ".join(f"{k} {metrics[k]:.4g}" if isinstance(metrics[k], float) else
                                       f"{k} {metrics[k]}" for k in keys if metrics.get(k) is not None))


@app.command()
def evaluate(
    run: str = typer.Argument(..., help="Run directory"),
    cache: str = typer.Option(..., help="Cache to evaluate on"),
    checkpoint: str = typer.Option("best", help="best | last"),
    labels: str | None = typer.Option(None, help="Labels JSONL (default: the run's)"),
    device: str = typer.Option("auto"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON"),
) -> None:
    """Greedy-decode CACHE with a run's checkpoint; writes RUN/eval/<cache-name>/hyps.jsonl."""
    from hff_cache.evaluation.evaluate import evaluate_run

    try:
        summary = evaluate_run(run, cache, checkpoint=checkpoint, labels=labels, device=device)
    except _train_errors() as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    for key in ("wer", "cer", "per", "accuracy", "loss", "utterances", "hyps"):
        if key in summary:
            value = summary[key]
            typer.echo(f"{key:>10}: {value:.4g}" if isinstance(value, float) else f"{key:>10}: {value}")


@app.command()
def transcribe(
    run: str = typer.Argument(..., help="Run directory (cached or online)"),
    audio: list[str] = typer.Argument(None, help="Audio files (ids are the file names)"),
    data: str | None = typer.Option(None, "--data", "-d", help="Manifest, LibriSpeech folder, audio folder or "
                                    "saved dataset to transcribe (besides or instead of AUDIO)"),
    checkpoint: str = typer.Option("best", help="best | last"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    batch_seconds: float = typer.Option(120.0, help="Padded audio seconds per batch"),
    model: str | None = typer.Option(None, "--model", "-m", help="Load the run's encoder from here instead "
                                     "(its weights must hash as recorded)"),
) -> None:
    """Print `id<TAB>text` for new audio: the run's encoder (+ adapters), fusion, head, greedy CTC."""
    from hff_cache.evaluation.transcribe import transcribe as run_transcribe
    from hff_cache.intake.audio import AudioError
    from hff_cache.intake.manifests import IntakeError

    try:
        rows = run_transcribe(run, audio or [], data=data, checkpoint=checkpoint, device=device,
                              batch_seconds=batch_seconds, encoder_name=model)
    except (*_train_errors(), AudioError, IntakeError) as exc:
        _fail(str(exc))
    for uid, text in rows:
        typer.echo(f"{uid}\t{text}")


@app.command()
def probe(
    cache: str = typer.Option(..., help="Training cache"),
    valid_cache: str = typer.Option(..., help="Validation cache"),
    out: str = typer.Option(..., "--out", "-o", help="Output folder (probe.csv, probe.png, one run per layer)"),
    task: str = typer.Option("asr", help="asr | phones | classify:FIELD"),
    labels: str | None = typer.Option(None, help="Labels JSONL"),
    layers: str | None = typer.Option(None, help="Hidden states to probe (default: all stored)"),
    epochs: int = typer.Option(10),
    width: int | None = typer.Option(None, help="Head width [FusionConfig: 256]"),
    blocks: int | None = typer.Option(None, help="Head blocks [FusionConfig: 2]"),
    lr: float = typer.Option(_T.lr),
    batch_frames: int = typer.Option(_T.batch_frames),
    seed: int = typer.Option(_T.seed),
    device: str = typer.Option(_T.device),
    threads: int = typer.Option(_T.threads, help="torch threads (0: torch's default)"),
    force: bool = typer.Option(False, help="Retrain layers already probed in OUT"),
) -> None:
    """Train the same small head on each stored hidden state alone; DIR/probe.csv + probe.png."""
    from hff_cache.training.probe import probe as run_probe

    try:
        base = TrainConfig(cache=cache, valid_cache=valid_cache, out=out, task=task, labels=labels,
                           fusion=_fusion_config("last", width=width, blocks=blocks), epochs=epochs, lr=lr,
                           batch_frames=batch_frames, seed=seed, device=device, threads=threads,
                           force=force)
        rows = run_probe(base, out, layers=parse_layers(layers))
    except _train_errors() as exc:
        _fail(str(exc))
    cols = [k for k in ("wer", "cer", "per", "accuracy") if k in rows[0]]
    typer.echo("layer " + " ".join(f"{c:>8}" for c in cols))
    for r in rows:
        typer.echo(f"{r['layer']:>5} " + " ".join(f"{r[c]:8.2f}" for c in cols))


@app.command()
def summary(
    runs: list[str] = typer.Argument(..., help="Run directories and/or probe folders"),
    markdown: bool = typer.Option(False, help="Markdown table"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON rows"),
) -> None:
    """One table of the metrics of several runs (metrics.json) and probes (probe.csv)."""
    from hff_cache.evaluation.summary import format_table, summarize_runs

    rows = summarize_runs(runs)
    typer.echo(json.dumps(rows, indent=2) if as_json else format_table(rows, markdown=markdown))


labels_app = typer.Typer(no_args_is_help=True, help="Make label files (JSONL keyed by utterance id).")
app.add_typer(labels_app, name="labels")


@labels_app.command("phones")
def labels_phones(
    alignments: str = typer.Option(..., help="Folder of Montreal Forced Aligner TextGrids (searched recursively)"),
    out: str = typer.Option(..., "--out", "-o", help="Output JSONL {id, phones}"),
    tier: str = typer.Option("phones", help="TextGrid tier"),
    keep_stress: bool = typer.Option(False, help="Keep ARPAbet stress digits (AH0)"),
) -> None:
    """Phone sequences from TextGrids (silences sil/sp/spn and empty intervals dropped)."""
    from hff_cache.tasks.task import LabelError, phone_labels, write_jsonl

    try:
        n = write_jsonl(phone_labels(alignments, tier=tier, strip_stress=not keep_stress), out)
    except LabelError as exc:
        _fail(str(exc))
    typer.echo(f"{out}: {n} utterances")


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
) -> None:
    """Write a JSONL manifest of (a selection of) DATA: some speakers, a per-speaker utterance split, or a
    balanced set of held-out speakers."""
    from hff_cache.intake.manifests import IntakeError
    from hff_cache.intake.selection import select_utterances
    from hff_cache.tasks.task import write_jsonl

    try:
        rows = select_utterances(data, speakers=speakers.split(",") if speakers else None, holdout=holdout,
                                 take=take, holdout_speakers=holdout_speakers,
                                 balance=balance.split(",") if balance else (), seed=seed)
        tags = dict(_key_value(t, "--tag") for t in tag)
    except (IntakeError, ValueError) as exc:
        _fail(str(exc))
    n = write_jsonl(({**row, **tags} for row in rows), out)
    typer.echo(f"{out}: {n} utterances, {sum(r['duration'] for r in rows) / 60:.1f} min")


@app.command()
def demo(
    out: str = typer.Option("demo", "--out", "-o", help="Output folder (corpus, cache, probe, runs, results.md)"),
    small: bool = typer.Option(False, help="Use faster-whisper:tiny.en instead of faster-whisper:base"),
    num_train: int | None = typer.Option(None, help="Synthetic training utterances [300]"),
    num_valid: int | None = typer.Option(None, help="Synthetic validation utterances [60]"),
    epochs: int | None = typer.Option(None, help="Epochs per fusion [10; 15 with --small]"),
    probe_epochs: int | None = typer.Option(None, help="Epochs per probed layer [4; 5 with --small]"),
    threads: int = typer.Option(0, help="torch threads (0: torch's default)"),
    model: str | None = typer.Option(None, hidden=True, help="Encoder override (tests: tiny-random:whisper)"),
) -> None:
    """The offline demo: synthesise speech, extract once, probe every layer, train three fusions, report."""
    from hff_cache.demo import DemoConfig, run_demo

    try:
        run_demo(DemoConfig(out=out, small=small, num_train=num_train, num_valid=num_valid, epochs=epochs,
                            probe_epochs=probe_epochs, threads=threads, model=model))
    except (*_train_errors(), RuntimeError) as exc:
        _fail(str(exc))


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted; rerun the same command to resume", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
