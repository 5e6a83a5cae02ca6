"""Stage one: run the frozen encoder once over the intake and write the feature cache.

audio (threads: decode + resample) -> length-sorted batches -> encoder (inference mode)
-> real frames only -> CacheWriter (parts, commit marker last).

Resume is free: committed utterances are skipped, so rerunning the same command after a
crash, a full disk or a kill continues where it stopped, and a finished cache is a no-op.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from hff_cache.cache import (
    CacheMeta,
    CacheReader,
    CacheWriter,
    CodecSpec,
    clear_shard_record,
    get_codec,
    record_shard_complete,
)
from hff_cache.config import ExtractConfig
from hff_cache.encoders import SpeechEncoder, load_encoder, set_input_window
from hff_cache.intake.audio import AudioError
from hff_cache.intake.manifests import Utterance, intake_fingerprint, load_intake
from hff_cache.runtime.distributed import balanced_assignment, current, resolve_device
from hff_cache.runtime.planning import plan_batches
from hff_cache.runtime.threads import set_threads


@dataclass
class ExtractReport:
    cache: str
    total: int  # utterances in this shard's intake
    already_done: int
    extracted: int = 0
    skipped: list[dict] = field(default_factory=list)
    audio_seconds: float = 0.0
    wall_seconds: float = 0.0

    @property
    def realtime_factor(self) -> float:
        return self.audio_seconds / self.wall_seconds if self.wall_seconds else 0.0


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Half precision on GPU by default; CPU stays in float32 (CPU autocast is slower here)."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def shard_utterances(utts: Sequence[Utterance], num_shards: int, shard_index: int) -> list[Utterance]:
    """Balance shards by total duration (longest first, each to the lightest shard): deterministic."""
    if num_shards == 1:
        return list(utts)
    parts = balanced_assignment([u.duration for u in utts], num_shards, keys=[u.id for u in utts])
    return [u for u, p in zip(utts, parts, strict=True) if p == shard_index]


def make_batches(utts: Sequence[Utterance], batch_seconds: float) -> list[list[Utterance]]:
    """Similar lengths together, longest first (so memory errors show up at once); the padded
    cost (longest x count) stays under `batch_seconds` (`plan_batches` on milliseconds)."""
    ms = np.asarray([max(1, round(1000 * u.duration)) for u in utts], dtype=np.int64)
    plan = plan_batches(range(len(utts)), ms, max(1, int(1000 * batch_seconds)), max_utts=len(utts) or 1)
    return [[utts[p] for p in reversed(b)] for b in reversed(plan)]




def _prefetch(batches: list[list[Utterance]], rate: int, cfg: ExtractConfig
              ) -> Iterator[tuple[list[Utterance], list[np.ndarray | AudioError]]]:
    """Decode audio of the next batches in threads while the encoder runs (soundfile and soxr
    release the GIL)."""

    def load_batch(batch: list[Utterance]) -> list[np.ndarray | AudioError]:
        out: list[np.ndarray | AudioError] = []
        for u in batch:
            try:
                out.append(u.load_wave(rate, cfg.max_seconds))
            except AudioError as exc:
                out.append(exc)
        return out

    depth = max(1, cfg.loader_threads) + 1  # batches decoded ahead of the encoder
    with ThreadPoolExecutor(max(1, cfg.loader_threads)) as pool:
        pending = {i: pool.submit(load_batch, b) for i, b in enumerate(batches[:depth])}
        for i, batch in enumerate(batches):
            if i + depth < len(batches):
                pending[i + depth] = pool.submit(load_batch, batches[i + depth])
            yield batch, pending.pop(i).result()


def encode_batch(encoder: SpeechEncoder, waves: Sequence[np.ndarray], layers: Sequence[int],
                 device: torch.device, precision: str = "auto") -> list[np.ndarray]:
    """Run the encoder on a batch; return per utterance an array (n_layers, T_real, D) float32."""
    batch = encoder.prepare(waves).to(device)
    with torch.inference_mode(), autocast_for(device, precision):
        states = encoder(batch, layers)
    stacked = torch.stack(states, dim=0).float().cpu()  # (n_layers, B, T, D)
    lengths = batch.frame_lengths.cpu().tolist()
    return [stacked[:, i, :n].numpy() for i, n in enumerate(lengths)]


def extract(cfg: ExtractConfig, encoder: SpeechEncoder | None = None) -> ExtractReport:
    """Extract `cfg.data` into the cache at `cfg.out`; resumable and idempotent."""
    start = time.perf_counter()
    utts, dataset_fp, bad_lines = _load_shard(cfg)
    if encoder is None and _already_complete(cfg, utts, [e["id"] for e in bad_lines]):
        # The immediate no-op: a finished cache answers without loading the model. The record is
        # (re)written in case a kill came between the shard's last commit and its record.
        _record_shard(cfg, utts, dataset_fp)
        return ExtractReport(cfg.out, total=len(utts), already_done=len(utts),
                             wall_seconds=time.perf_counter() - start)
    run = _open_run(cfg, encoder, utts)
    todo, report = _start_report(run, utts, bad_lines)
    if todo:
        _extract_todo(run, todo, report)  # commits what is buffered even when an error stops it
    else:
        run.writer.close()
    report.wall_seconds = time.perf_counter() - start
    # only reached when every utterance was committed or skipped; a no-op rerun keeps the recorded time
    _record_shard(cfg, utts, dataset_fp, report.wall_seconds if todo else None)
    return report


@dataclass
class _Run:
    """What the steps of one extraction share: the loaded encoder and the open writer."""

    cfg: ExtractConfig
    encoder: SpeechEncoder
    device: torch.device
    layers: list[int]
    writer: CacheWriter


def _load_shard(cfg: ExtractConfig) -> tuple[list[Utterance], str, list[dict[str, str]]]:
    """This shard's utterances, the fingerprint of the whole intake, and the bad manifest lines it records."""
    intake_errors: list[dict[str, str]] | None = [] if cfg.on_error == "skip" else None
    everything = load_intake(cfg.data, errors=intake_errors)
    utts = shard_utterances(everything, cfg.num_shards, cfg.shard_index)
    # Every shard hashes the whole intake: shards of one extraction agree on it (docs/cache_format.md).
    dataset_fp = intake_fingerprint(everything)
    # Bad manifest lines and duplicated ids belong to no shard: shard 0 records them, once.
    bad_lines = (intake_errors or []) if cfg.shard_index == 0 else []
    return utts, dataset_fp, bad_lines


def _open_run(cfg: ExtractConfig, encoder: SpeechEncoder | None, utts: Sequence[Utterance]) -> _Run:
    """Load the encoder (or adopt the given one) on the device and open this shard's writer."""
    device = resolve_device(cfg.device)
    threads = set_threads(cfg.threads)  # --threads, else the CPUs this process may use (not os.cpu_count())
    encoder = set_input_window(encoder, cfg.whisper_window) if encoder is not None else \
        load_encoder(cfg.model, device, cfg.whisper_window)
    encoder = encoder.to(device)
    layers = cfg.layers if cfg.layers is not None else list(range(encoder.num_hidden_states))
    codec = get_codec(cfg.codec)
    meta = CacheMeta(
        encoder=encoder.info,
        layers=list(layers),
        codec=CodecSpec(codec.name, codec.params),
        batching={"policy": "length-sorted, masked: batched output equals single-utterance output",
                  "batch_seconds": cfg.batch_seconds, "precision": cfg.precision, "device": device.type,
                  "torch_threads": threads},
    )
    writer = CacheWriter(cfg.out, meta, worker=shard_worker(cfg.shard_index), part_frames=cfg.part_frames,
                         intake_fingerprint=intake_fingerprint(utts), storage_options=cfg.storage_options,
                         shard_frames=cfg.shard_frames)
    return _Run(cfg, encoder, device, layers, writer)


def _start_report(run: _Run, utts: Sequence[Utterance], bad_lines: Sequence[dict[str, str]]
                  ) -> tuple[list[Utterance], ExtractReport]:
    """The utterances not committed yet and a report counting the others; records the bad manifest lines
    as skips, and clears the shard's completion record when there is work left."""
    cfg, writer = run.cfg, run.writer
    done = writer.done_ids()
    todo = [u for u in utts if u.id not in done]
    report = ExtractReport(cfg.out, total=len(utts), already_done=len(utts) - len(todo))
    if todo:  # work to do: the cache is not complete until this shard finishes again
        clear_shard_record(cfg.out, writer.worker, storage_options=cfg.storage_options)
    for item in bad_lines:
        if item["id"] not in done:
            writer.skip(item["id"], item["audio"], item["reason"])
            report.skipped.append(dict(item))
    return todo, report


def _extract_todo(run: _Run, todo: list[Utterance], report: ExtractReport) -> None:
    """Encode and write `todo` batch by batch; the writer is closed (committed) whatever happens."""
    batches = make_batches(todo, run.cfg.batch_seconds)
    bar = _progress(todo, run.cfg.progress and _is_main_process())
    try:
        for batch, loaded in _prefetch(batches, run.encoder.info.sample_rate, run.cfg):
            _write_batch(run, batch, loaded, report)
            if bar is not None:
                bar.update(sum(_ms(u) for u in batch))
                bar.set_postfix_str(f"{report.extracted + len(report.skipped)}/{len(todo)} utt")
    finally:
        # Commit what is buffered even when an error stops us: nothing done is lost.
        run.writer.close()
        if bar is not None:
            bar.close()


def _write_batch(run: _Run, batch: list[Utterance], loaded: list[np.ndarray | AudioError],
                 report: ExtractReport) -> None:
    """Skip (or raise on) the unreadable audio of a batch, encode the rest, write or skip each result."""
    cfg, writer = run.cfg, run.writer
    good = [(u, w) for u, w in zip(batch, loaded, strict=True) if not isinstance(w, AudioError)]
    for u, w in zip(batch, loaded, strict=True):
        if isinstance(w, AudioError):
            if cfg.on_error == "raise":
                raise w
            _skip(run, report, u, w.reason)
    if not good:
        return
    feats = encode_batch(run.encoder, [w for _, w in good], run.layers, run.device, cfg.precision)
    for (u, w), f in zip(good, feats, strict=True):
        if not np.isfinite(f).all():
            # One item's encoder failure (fp16 overflow, a degenerate input): per item, like
            # bad audio, instead of the writer's refusal ending the whole run.
            reason = "the encoder produced NaN or infinite features (try --precision fp32)"
            if cfg.on_error == "raise":
                raise ValueError(f"{u.id} ({u.audio}): {reason}")
            _skip(run, report, u, reason)
            continue
        writer.add(u.id, f, text=u.text, meta=u.meta, num_samples=len(w))
        report.audio_seconds += len(w) / run.encoder.info.sample_rate
        report.extracted += 1


def _skip(run: _Run, report: ExtractReport, u: Utterance, reason: str) -> None:
    run.writer.skip(u.id, u.audio, reason)
    report.skipped.append({"id": u.id, "audio": u.audio, "reason": reason})


def shard_worker(shard_index: int) -> str:
    """The worker label (part-id prefix and completion-record name) of a shard."""
    return f"w{shard_index:03d}"


def _record_shard(cfg: ExtractConfig, utts: Sequence[Utterance], dataset_fp: str,
                  seconds: float | None = None) -> None:
    record_shard_complete(cfg.out, shard_worker(cfg.shard_index), num_shards=cfg.num_shards,
                          shard_index=cfg.shard_index, utterances=len(utts),
                          intake_fingerprint=intake_fingerprint(utts), dataset_fingerprint=dataset_fp,
                          storage_options=cfg.storage_options, seconds=seconds)


def _already_complete(cfg: ExtractConfig, utts: Sequence[Utterance], extra_ids: Sequence[str] = ()) -> bool:
    try:
        reader = CacheReader(cfg.out, storage_options=cfg.storage_options)
    except Exception:  # no cache yet (or unreadable: the writer reports that properly)
        return False
    meta = reader.meta
    if meta.encoder.name != cfg.model or meta.codec.name != cfg.codec:
        return False
    if meta.encoder.input_window != ("" if cfg.whisper_window == "real" else cfg.whisper_window):
        return False
    if cfg.layers is not None and list(meta.layers) != list(cfg.layers):
        return False
    done = set(reader.ids) | {item["id"] for item in reader.skipped()}
    return all(u.id in done for u in utts) and all(i in done for i in extra_ids)


def _ms(u: Utterance) -> int:
    return round(1000 * u.duration)


def _progress(todo: Sequence[Utterance], enabled: bool):  # noqa: ANN202 - tqdm or None
    if not enabled:
        return None
    from tqdm.auto import tqdm

    # Progress in audio seconds, counted in whole milliseconds so that the updates add up to the total exactly
    # (a rounded float total was overshot: tqdm clamped the bar and showed a negative ETA).
    return tqdm(total=sum(_ms(u) for u in todo), unit="audio-s", unit_scale=0.001, desc="extract",
                dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} audio-s [{elapsed}<{remaining}, {rate_fmt}{postfix}]")


def _is_main_process() -> bool:
    return current().local_rank == 0
