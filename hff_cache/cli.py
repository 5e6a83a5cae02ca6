"""The `hff-cache` command line: thin wrappers that parse, call the library and print.

The options of `extract`, `train`, `probe` and `demo` are derived from their config dataclasses (field name ->
--kebab-case flag, type, default and help), so every default and help string lives in one place
(hff_cache/config.py, FusionConfig, DemoConfig); `Flag` records where a command line differs from a field.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import sys
import typing
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import typer

from hff_cache.config import (
    TRANSCRIBE_BATCH_SECONDS,
    ExtractConfig,
    TrainConfig,
    parse_layers,
    parse_option_value,
    train_config,
)
from hff_cache.demo import DemoConfig
from hff_cache.evaluation.decoding import DecoderConfig
from hff_cache.model.adapters import METHODS

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
        opts[key] = parse_option_value(value)  # JSON values (numbers, true/false, objects), else a string
    return opts


# --- options derived from the config dataclasses --------------------------------------------------------------

_FROM_FIELD: Any = object()  # Flag.default: the field's own default


# NamedTuples, not dataclasses: `typer ... utils docs` loads this module outside sys.modules, where a dataclass
# with string annotations cannot be built.
class Flag(NamedTuple):
    """How a config field appears on a command line where that differs from the plain derivation."""

    decls: tuple[str, ...] = ()  # option names (default: --kebab-case of the field name)
    cli_type: Any = None  # what is typed, when it is not the field's type; `parse` turns it into the field's
    parse: Callable[[Any], Any] | None = None
    default: Any = _FROM_FIELD  # the command's own default (... = required)
    help: str | None = None  # the command's own help (default: the field's metadata["help"])
    hidden: bool = False


class ConfigOption(NamedTuple):
    """One typer option and the config key its value goes to (("epochs",) or ("fusion", "width"))."""

    key: tuple[str, ...]
    parameter: inspect.Parameter
    parse: Callable[[Any], Any]


def config_options(cls: type, flags: Mapping[str, Flag] | None = None, only: Sequence[str] | None = None,
                   within: tuple[str, ...] = ()) -> list[ConfigOption]:
    """One option per field of ``cls`` in field order, a nested config's fields included (fusion.width is
    --width); ``flags`` and ``only`` name fields by dotted key."""
    flags = flags or {}
    hints = typing.get_type_hints(cls)
    options: list[ConfigOption] = []
    for f in dataclasses.fields(cls):
        key = (*within, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            options += config_options(hints[f.name], flags, only, key)
        elif only is None or ".".join(key) in only:
            options.append(_config_option(f, hints[f.name], key, flags.get(".".join(key), Flag())))
    return options


def _config_option(f: dataclasses.Field, hint: Any, key: tuple[str, ...], flag: Flag) -> ConfigOption:
    decls = flag.decls
    if not decls and len(key) > 1:  # a nested field keeps its own name: --width, --layer-norm/--no-layer-norm
        kebab = key[-1].replace("_", "-")
        decls = (f"--{kebab}/--no-{kebab}",) if hint is bool else (f"--{kebab}",)
    default = flag.default
    if default is _FROM_FIELD:
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = ...  # a required field
        if flag.parse is not None and default not in (None, ...) and not isinstance(default, str):
            default = str(default)  # typed as text: --in-memory auto, --rung-gate-init 0.1
    info = typer.Option(default, *decls, help=flag.help or f.metadata.get("help", ""), hidden=flag.hidden)
    parameter = inspect.Parameter("_".join(key), inspect.Parameter.KEYWORD_ONLY, default=info,
                                  annotation=flag.cli_type or hint)
    return ConfigOption(key, parameter, flag.parse or (lambda value: value))


def with_options(*groups: Sequence[ConfigOption]) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give a command (which takes them as ``**options``) the options of ``groups`` after its own: typer reads
    a command's options from its signature."""
    def install(command: Callable[..., None]) -> Callable[..., None]:
        own = [p for p in inspect.signature(command).parameters.values() if p.kind is not p.VAR_KEYWORD]
        derived = [o.parameter for g in groups for o in g]
        command.__signature__ = inspect.Signature([*own, *derived])  # type: ignore[attr-defined]
        return command
    return install


def config_values(options: Sequence[ConfigOption], values: Mapping[str, Any],
                  given_in: typer.Context | None = None) -> dict[str, Any]:
    """The settings of a command's option values, nested by key ({"fusion": {"width": 512}}). With ``given_in``
    only the options typed on that command line: defaults come from the config (or a config file)."""
    settings: dict[str, Any] = {}
    for opt in options:
        name = opt.parameter.name
        if given_in is not None and _source(given_in, name) in ("DEFAULT", "DEFAULT_MAP", None):
            continue
        *parents, last = opt.key
        target = settings
        for k in parents:
            target = target.setdefault(k, {})
        target[last] = opt.parse(values[name])
    return settings


def _source(ctx: typer.Context, name: str) -> str | None:
    # by name: typer vendors click, and its ParameterSource enum sits in a private module
    source = ctx.get_parameter_source(name)
    return None if source is None else source.name


def _gate_init(text: str | None) -> float | None:
    return None if text is None or text.strip().lower() == "none" else float(text)


_LAYERS = Flag(cli_type=str | None, parse=parse_layers)  # 'all', '0,3,6', '0-4,8'
_STORAGE = Flag(decls=("--storage-option",), cli_type=list[str], parse=_storage_options, default=[])
_OUT, _MODEL, _DATA = Flag(decls=("--out", "-o")), Flag(decls=("--model", "-m")), Flag(decls=("--data", "-d"))


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
    from hff_cache.cache.verify import verify_cache

    # a run directory is known by its config.json; tested by name, so verifying a cache never imports torch
    if "://" not in cache and (Path(cache) / "config.json").is_file():
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


# --- training, evaluation, probing (hff_cache.training / evaluation / tasks) ----------------------------------


def _train_errors() -> tuple[type[Exception], ...]:
    from hff_cache.cache import CacheFormatError
    from hff_cache.runs.directory import RunError
    from hff_cache.tasks.task import LabelError

    return (RunError, LabelError, CacheFormatError, FileNotFoundError, ValueError)


_ENCODER_LR_DEFAULTS = ", ".join(f"{name} {m.encoder_lr:g}" for name, m in METHODS.items() if m.encoder_lr)
TRAIN_OPTIONS = config_options(TrainConfig, {
    "out": _OUT, "layers": _LAYERS, "storage_options": _STORAGE, "model": _MODEL, "data": _DATA,
    "fusion.kind": Flag(decls=("--fusion",)),
    "fusion.rung_gate_init": Flag(cli_type=str | None, parse=_gate_init),
    "in_memory": Flag(cli_type=str, parse=str),  # auto | true | false: TrainConfig reads the words
    "online": Flag(decls=("--online",)),  # a mode switch: no --no-online
    "encoder_lr": Flag(help=f"Online: LR of the encoder weights full/bitfit train (default: {_ENCODER_LR_DEFAULTS}; "
                            "otherwise --lr)"),
})


@app.command()
@with_options(TRAIN_OPTIONS)
def train(
    ctx: typer.Context,
    config: str | None = typer.Option(None, "--config", help="Settings file, JSON or YAML (keys: the option "
                                      "names with '_', nested as in fusion.width); a run's config.json replays "
                                      "that run. Options given here override the file"),
    set_: list[str] = typer.Option([], "--set", help="KEY=VALUE over the file and the options (repeatable), "
                                   "e.g. --set fusion.width=512 --set epochs=30"),
    **options: Any,
) -> None:
    """Train layer fusion + a task head on cached features (or, with --online, on audio with the encoder
    in the loop); writes a run directory. Under torchrun: DistributedDataParallel, each rank on its share."""
    from hff_cache.training.cached import train as run_train
    from hff_cache.training.online import train_online

    try:
        # defaults < --config file < options typed here < --set
        cfg = train_config(config, flags=config_values(TRAIN_OPTIONS, options, given_in=ctx), sets=set_)
        metrics = train_online(cfg) if cfg.online else run_train(cfg)
    except _train_errors() as exc:
        _fail(str(exc))
    keys = ("wer", "cer", "per", "accuracy", "best_epoch", "trainable_params", "trainable_encoder_params",
            "step_time_ms", "epoch_seconds")
    typer.echo(f"{cfg.out}: " + ", ".join(f"{k} {metrics[k]:.4g}" if isinstance(metrics[k], float) else
                                           f"{k} {metrics[k]}" for k in keys if metrics.get(k) is not None))


DECODE_OPTIONS = config_options(DecoderConfig, {
    "kind": Flag(decls=("--decode",), default="auto", help="auto (the run's tuned decoder, else greedy) | greedy | "
                 "beam (CTC beam search, flashlight-text; with --lm a word n-gram LM and its lexicon)"),
    "beam_size": Flag(help="Beam width"),
    "lm": Flag(help="An LM directory from `hff-cache lm build` (or a KenLM .arpa/.bin file)"),
    "lexicon": Flag(help="Word lexicon (default: the LM directory's lexicon.txt)"),
    "lm_weight": Flag(help="LM weight (default: the run's tuned value, else 2)"),
    "word_score": Flag(help="Score added per word (default: the run's tuned value, else 0)"),
}, only=("kind", "beam_size", "lm", "lexicon", "lm_weight", "word_score"))


@app.command()
@with_options(DECODE_OPTIONS)
def evaluate(
    ctx: typer.Context,
    run: str = typer.Argument(..., help="Run directory"),
    cache: str | None = typer.Option(None, help="Cache to evaluate on (same encoder, layers, codec as the run's)"),
    data: str | None = typer.Option(None, "--data", "-d", help="Or audio to evaluate on, through the run's "
                                    "encoder: a manifest, LibriSpeech folder, ... (online runs too)"),
    checkpoint: str = typer.Option("best", help="best | last"),
    labels: str | None = typer.Option(None, help="Labels JSONL (default: the run's validation labels, else its "
                                         "labels)"),
    device: str = typer.Option("auto"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON"),
    group_by: str | None = typer.Option(None, help="Also report the metrics per value of this metadata field "
                                        "of the cache's utterances (e.g. corpus, speaker)"),
    **options: Any,
) -> None:
    """Decode a cache (or audio) with a run's checkpoint; writes RUN/eval/<name>/{hyps.jsonl,metrics.json}."""
    from hff_cache.evaluation.evaluate import evaluate_run

    try:
        summary = evaluate_run(run, cache, checkpoint=checkpoint, labels=labels, device=device, group_by=group_by,
                               data=data, decoder=config_values(DECODE_OPTIONS, options, given_in=ctx))
    except _train_errors() as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    keys = ("wer", "cer", "per", "accuracy", "loss", "utterances")
    for key in (*keys, "hyps"):
        if key in summary:
            value = summary[key]
            typer.echo(f"{key:>10}: {value:.4g}" if isinstance(value, float) else f"{key:>10}: {value}")
    for value, m in summary.get("groups", {}).items():
        typer.echo(f"{group_by}={value}: " + ", ".join(f"{k} {m[k]:.4g}" if isinstance(m[k], float) else f"{k} {m[k]}"
                                                      for k in keys if k in m))


@app.command()
@with_options(DECODE_OPTIONS)
def transcribe(
    ctx: typer.Context,
    run: str = typer.Argument(..., help="Run directory (cached or online)"),
    audio: list[str] = typer.Argument(None, help="Audio files (ids are the file names)"),
    data: str | None = typer.Option(None, "--data", "-d", help="Manifest, LibriSpeech folder, audio folder or "
                                    "saved dataset to transcribe (besides or instead of AUDIO)"),
    checkpoint: str = typer.Option("best", help="best | last"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    batch_seconds: float = typer.Option(TRANSCRIBE_BATCH_SECONDS, help="Padded audio seconds per batch"),
    model: str | None = typer.Option(None, "--model", "-m", help="Load the run's encoder from here instead "
                                     "(its weights must hash as recorded)"),
    output_format: str = typer.Option("text", "--format", "-f", help="text (id<TAB>text) | jsonl (text and "
                                      "words with start/end seconds) | srt | vtt (subtitles, one file each)"),
    out: str | None = typer.Option(None, "--out", "-o", help="Write here instead of stdout: a file, or a folder "
                                   "of ID.srt / ID.vtt files for several recordings"),
    max_window_seconds: float | None = typer.Option(None, help="Cut longer recordings at quiet points into "
                                                    "windows of at most this many seconds (default: the "
                                                    "encoder's limit, 30 s for Whisper, else 30 s; 0: never)"),
    overlap_seconds: float | None = typer.Option(None, help="Overlap of consecutive windows, split at its "
                                                 "middle (default: 2 s)"),
    **options: Any,
) -> None:
    """Transcribe new audio (the run's encoder + adapters, fusion, head, CTC decoding): `id<TAB>text` lines,
    JSONL with word times, or SRT/WebVTT subtitles. Long recordings are cut into windows and stitched."""
    from hff_cache.evaluation.subtitles import FORMATS, SUBTITLE_FORMATS, render, write_transcripts
    from hff_cache.evaluation.transcribe import Transcriber, audio_utterances
    from hff_cache.intake.audio import AudioError
    from hff_cache.intake.manifests import IntakeError, load_intake

    if output_format not in FORMATS:
        _fail(f"--format must be one of {', '.join(FORMATS)}, not {output_format!r}")
    try:
        utts = audio_utterances(audio or []) + (load_intake(data) if data else [])
        if not utts:
            raise ValueError("nothing to transcribe: give audio files or --data")
        if output_format in SUBTITLE_FORMATS and len(utts) > 1 and out is None:
            raise ValueError(f"--format {output_format} writes one file per recording: give --out DIR for "
                             f"{len(utts)} recordings")
        windows = {"max_window_seconds": max_window_seconds}
        if overlap_seconds is not None:
            windows["overlap_seconds"] = overlap_seconds
        transcriber = Transcriber.load(run, checkpoint, device=device, encoder_name=model,
                                       decoder=config_values(DECODE_OPTIONS, options, given_in=ctx),
                                       batch_seconds=batch_seconds, **windows)
        results = transcriber.transcribe_utterances(utts, words=output_format != "text")
        if out is None:
            typer.echo(render(results, output_format), nl=False)
        else:
            write_transcripts(results, output_format, out)
    except (*_train_errors(), AudioError, IntakeError, ImportError, OSError) as exc:
        _fail(str(exc))


PROBE_EPOCHS = 10  # one short run per layer: the probe ranks layers, it does not train a model to keep
PROBE_OPTIONS = config_options(TrainConfig, {
    "cache": Flag(default=..., help="Training cache"),
    "valid_cache": Flag(cli_type=str, default=..., help="Validation cache"),
    "out": Flag(decls=("--out", "-o"), default=..., help="Output folder (probe.csv, probe.png, one run per layer)"),
    "layers": Flag(cli_type=str | None, parse=parse_layers, help="Hidden states to probe (default: all stored)"),
    "epochs": Flag(default=PROBE_EPOCHS, help="Epochs per probed layer"),
    "fusion.width": Flag(help="Head width"),
    "fusion.blocks": Flag(help="Head residual blocks"),
    "force": Flag(help="Retrain layers already probed in OUT"),
}, only=("cache", "valid_cache", "out", "task", "labels", "valid_labels", "layers", "fusion.width", "fusion.blocks",
         "epochs", "lr", "batch_frames", "seed", "device", "threads", "force"))


@app.command()
@with_options(PROBE_OPTIONS)
def probe(**options: Any) -> None:
    """Train the same small head on each stored hidden state alone; DIR/probe.csv + probe.png."""
    from hff_cache.training.probe import probe as run_probe

    try:
        settings = config_values(PROBE_OPTIONS, options)  # every option: the probe's defaults are its own
        layers = settings.pop("layers")  # probed one at a time, not read together
        base = train_config(flags={**settings, "fusion": {**settings["fusion"], "kind": "last"}})
        rows = run_probe(base, base.out, layers=layers)
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


@app.command("tune-decoder")
def tune_decoder(
    run: str = typer.Argument(..., help="An ASR run directory"),
    cache: str = typer.Option(..., help="Validation cache (same encoder, layers, codec as the run's)"),
    lm: str = typer.Option(..., help="LM directory from `hff-cache lm build`"),
    lm_weights: str = typer.Option("0.5,1,1.5,2,3", help="Comma-separated LM weights to try"),
    word_scores: str = typer.Option("-1,0,1,2", help="Comma-separated word scores to try"),
    beam_size: int = typer.Option(DecoderConfig.beam_size, help="Beam width"),
    checkpoint: str = typer.Option("best", help="best | last"),
    device: str = typer.Option("auto"),
    as_json: bool = typer.Option(False, "--json", help="Print the whole grid as JSON"),
) -> None:
    """Grid-search the LM weight and word score of beam search on a validation cache; the best go into the run
    (RUN/decoder.json), and later evaluate/transcribe calls use them."""
    from hff_cache.evaluation.tune import tune_decoder as run_tune

    try:
        result = run_tune(run, cache, lm, [float(w) for w in lm_weights.split(",")],
                          [float(s) for s in word_scores.split(",")], beam_size=beam_size, checkpoint=checkpoint,
                          device=device, log=lambda m: typer.echo(m, err=True))
    except (*_train_errors(), RuntimeError) as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    best, greedy = result["best"], result["greedy"]
    typer.echo(f"{run}: beam {beam_size} + LM, lm_weight {best['lm_weight']:g} word_score {best['word_score']:g}: "
               f"wer {best['wer']:.2f} cer {best['cer']:.2f} (greedy: wer {greedy['wer']:.2f} cer {greedy['cer']:.2f}) "
               f"on {result['utterances']} utterances; stored in {run}/decoder.json")


lm_app = typer.Typer(no_args_is_help=True, help="Word n-gram language models for beam search.")
app.add_typer(lm_app, name="lm")


@lm_app.command("build")
def lm_build(
    texts: list[str] = typer.Argument(..., help="Text files (one sentence per line, normalised like the "
                                      "transcripts) and/or manifests (JSONL with a 'text' field)"),
    order: int = typer.Option(3, help="n-gram order"),
    out: str = typer.Option(..., "--out", "-o", help="LM directory: lm.arpa, lm.bin, lexicon.txt, lm.json"),
    run: str | None = typer.Option(None, help="Spell the lexicon in this run's units (bpe runs need it); "
                                   "default: characters"),
    min_count: int = typer.Option(1, help="Words seen fewer times stay in the LM but not in the lexicon"),
    prune: str | None = typer.Option(None, help="lmplz --prune thresholds per order, e.g. 0,0,1"),
) -> None:
    """Estimate a word n-gram LM with KenLM's lmplz (modified Kneser-Ney) and write its lexicon."""
    from hff_cache.evaluation.language_model import build_lm

    try:
        tokenizer = None
        if run is not None:  # the run's own tokenizer (cached or online run): its units, its fingerprint
            from hff_cache.runs.directory import RunDir

            tokenizer = RunDir(run).read_document().task.build().tokenizer
        lm = build_lm(texts, order, out, tokenizer=tokenizer, min_count=min_count,
                      prune=[int(p) for p in prune.split(",")] if prune else None)
    except (*_train_errors(), RuntimeError, OSError) as exc:
        _fail(str(exc))
    typer.echo(f"{out}: {lm.order}-gram LM over {lm.words} words ({'binary + ' if lm.binary else ''}ARPA), "
               f"lexicon {lm.lexicon}")


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
) -> None:
    """Write a JSONL manifest of (a selection of) DATA: some speakers, a per-speaker utterance split, or a
    balanced set of held-out speakers."""
    from hff_cache.intake.manifests import IntakeError
    from hff_cache.intake.selection import select_utterances
    from hff_cache.tasks.task import write_jsonl

    try:
        rows = select_utterances(data, speakers=speakers.split(",") if speakers else None, holdout=holdout,
                                 take=take, holdout_speakers=holdout_speakers,
                                 balance=balance.split(",") if balance else (), seed=seed, max_utts=max_utts)
        tags = dict(_key_value(t, "--tag") for t in tag)
    except (IntakeError, ValueError) as exc:
        _fail(str(exc))
    n = write_jsonl(({**row, **tags} for row in rows), out)
    typer.echo(f"{out}: {n} utterances, {sum(r['duration'] for r in rows) / 60:.1f} min")


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


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted; rerun the same command to resume", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
