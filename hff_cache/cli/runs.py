"""Stage two and what uses its runs: train, probe, evaluate, transcribe, summary, tune-decoder, lm."""

from __future__ import annotations

import json
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
    _gate_init,
    _train_errors,
    app,
    config_options,
    config_values,
    with_options,
)
from hff_cache.config import (
    TRANSCRIBE_BATCH_SECONDS,
    TrainConfig,
    parse_layers,
    train_config,
)
from hff_cache.evaluation.decoding import DecoderConfig
from hff_cache.model.adapters import METHODS

_ENCODER_LR_DEFAULTS = ", ".join(f"{name} {m.encoder_lr:g}" for name, m in METHODS.items() if m.encoder_lr)


TRAIN_OPTIONS = config_options(TrainConfig, {
    "out": _OUT, "layers": _LAYERS, "storage_options": _STORAGE, "model": _MODEL, "data": _DATA,
    "fusion.kind": Flag(decls=("--fusion",)),
    "fusion.rung_gate_init": Flag(cli_type=str | None, parse=_gate_init),
    "in_memory": Flag(cli_type=str, parse=str),  # auto | true | false: TrainConfig reads the words
    "loader_thread": Flag(cli_type=str, parse=str),  # auto | true | false, as --in-memory
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
    from hff_cache.training.partial import train_partial

    try:
        # defaults < --config file < options typed here < --set
        cfg = train_config(config, flags=config_values(TRAIN_OPTIONS, options, given_in=ctx), sets=set_)
        run = train_partial if cfg.from_layer is not None else train_online if cfg.online else run_train
        metrics = run(cfg)
    except _train_errors() as exc:
        _fail(str(exc))
    keys = ("wer", "cer", "per", "accuracy", "best_epoch", "trainable_params", "trainable_encoder_params",
            "step_time_ms", "epoch_seconds")
    typer.echo(f"{cfg.out}: " + ", ".join(f"{k} {metrics[k]:.4g}" if isinstance(metrics[k], float) else
                                           f"{k} {metrics[k]}" for k in keys if metrics.get(k) is not None))


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


DECODE_OPTIONS = config_options(DecoderConfig, {
    "kind": Flag(decls=("--decode",), default="auto", help="auto (the run's tuned decoder, else greedy) | greedy | "
                 "beam (CTC beam search, flashlight-text; with --lm a word n-gram LM and its lexicon)"),
    "beam_size": Flag(help="Beam width"),
    "beam_size_token": Flag(help="Tokens tried per frame (default: all of the vocabulary)"),
    "lm": Flag(help="An LM directory from `hff-cache lm build` (or a KenLM .arpa/.bin file)"),
    "lexicon": Flag(help="Word lexicon (default: the LM directory's lexicon.txt)"),
    "lm_weight": Flag(help="LM weight (default: the run's tuned value, else 2)"),
    "word_score": Flag(help="Score added per word (default: the run's tuned value, else 0)"),
}, only=("kind", "beam_size", "beam_size_token", "lm", "lexicon", "lm_weight", "word_score"))


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


@app.command()
def summary(
    runs: list[str] = typer.Argument(..., help="Run directories and/or probe folders"),
    markdown: bool = typer.Option(False, help="Markdown table"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON rows"),
    evaluation: str | None = typer.Option(None, "--eval", help="Add the per-group metrics of each run's "
                                          "evaluation NAME (RUN/eval/NAME/metrics.json, from evaluate --group-by)"),
    plot: str | None = typer.Option(None, help="Also plot WER (or the task's metric) against training time, "
                                    "log axis, one point per run, into this PNG"),
    plot_layers: str | None = typer.Option(None, help="Also plot each probe folder's error against the layer "
                                           "(one curve per task, scaled 0 = its best layer) into this PNG"),
) -> None:
    """One table of the metrics of several runs (metrics.json) and probes (probe.csv): error rates, per group with
    --eval, trainable parameters, step time, peak memory, and training time (extraction included where the
    training cache recorded it)."""
    from hff_cache.evaluation.summary import format_table, plot_layer_profiles, plot_time_against_error, summarize_runs

    rows = summarize_runs(runs, evaluation)
    typer.echo(json.dumps(rows, indent=2) if as_json else format_table(rows, markdown=markdown))
    try:
        if plot:
            metric = next((k for k in ("wer", "per", "accuracy") if any(r.get(k) is not None for r in rows)), "wer")
            plot_time_against_error([r for r in rows if r.get("task") != "probe"], plot, metric)
        if plot_layers:
            plot_layer_profiles(rows, plot_layers)
    except _train_errors() as exc:
        _fail(str(exc))


@app.command("tune-decoder")
def tune_decoder(
    run: str = typer.Argument(..., help="An ASR run directory"),
    cache: str = typer.Option(..., help="Validation cache (same encoder, layers, codec as the run's)"),
    lm: str = typer.Option(..., help="LM directory from `hff-cache lm build`"),
    lm_weights: str = typer.Option("0.5,1,1.5,2,3", help="Comma-separated LM weights to try"),
    word_scores: str = typer.Option("-1,0,1,2", help="Comma-separated word scores to try"),
    beam_size: int = typer.Option(DecoderConfig.beam_size, help="Beam width"),
    beam_size_token: int | None = typer.Option(None, help="Tokens tried per frame (default: all; subword "
                                               "vocabularies decode far faster with e.g. 32)"),
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
                          device=device, log=lambda m: typer.echo(m, err=True), beam_size_token=beam_size_token)
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
