"""THE training loop, shared by cached and online training.

``fit`` takes a ``Setup`` (model, task, train and validation batch sources, the ``RunDocument``) and trains it
into the run directory (``hff_cache.runs.directory.RunDir``: config.json, checkpoints, log.csv, metrics.json,
plots, optionally TensorBoard events). It locks the directory for the whole run, resumes at epoch boundaries,
and under torchrun runs the model in DistributedDataParallel, each rank on its share of the data, rank 0
alone writing. ``training.cached`` and ``training.online`` build the ``Setup``.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from hff_cache.config import TrainConfig
from hff_cache.evaluation.evaluate import evaluate_model
from hff_cache.model.hff import HFFModel
from hff_cache.runs.directory import CURVES, LAYER_WEIGHTS, RunDir, RunError
from hff_cache.runs.document import RunDocument
from hff_cache.runtime import distributed
from hff_cache.runtime.threads import SlowStepWatch, set_threads
from hff_cache.tasks.task import Task
from hff_cache.training.optim import _param_groups, lr_factor

__all__ = ["LoopState", "Setup", "fit"]

_VALID_KEYS = ("wer", "cer", "per", "accuracy")


def _log(msg: str) -> None:
    if distributed.current().is_main:  # under torchrun, one voice
        print(msg, file=sys.stderr, flush=True)


@dataclass
class Setup:
    """Everything ``fit`` needs, built by ``prepare`` (cached mode) or ``prepare_online``."""

    model: HFFModel
    task: Task
    train: Any  # BatchSource
    valid: Any | None  # BatchSource
    valid_refs: dict[str, str]
    doc: RunDocument  # becomes config.json


@dataclass
class LoopState:
    """Where the loop is; saved in ``last.state.pt`` (beside optimizer and RNG state) and restored on resume."""

    epoch: int = 0  # epochs finished
    step: int = 0  # optimizer steps taken
    best: float | None = None  # best validation score of the task's metric so far
    best_epoch: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # one log.csv row per epoch
    step_ms: list[float] = field(default_factory=list)
    wait_ms: list[float] = field(default_factory=list)  # waiting for the next batch
    epoch_s: list[float] = field(default_factory=list)  # training time per epoch (without validation)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoopState:
        """From a resume state, old or new: fields it lacks keep their defaults, keys it adds are ignored."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


@dataclass
class _Job:
    """What one ``fit`` call trains with; built once by ``_start``."""

    setup: Setup
    cfg: TrainConfig
    run: RunDir
    d: distributed.Dist
    device: torch.device
    opt: torch.optim.Optimizer
    gen: torch.Generator  # SpecAugment masks
    log: Callable[[str], None]
    net: torch.nn.Module | None = None  # the model, or its DistributedDataParallel wrapper
    params: int = 0
    scalars: Any | None = None  # TensorBoardScalars on rank 0 with --tensorboard
    threads: int = 0  # torch intra-op threads this run uses
    slow: SlowStepWatch = field(default_factory=SlowStepWatch)

    @property
    def model(self) -> HFFModel:
        return self.setup.model

    @property
    def fingerprint(self) -> str:
        return self.setup.task.tokenizer.fingerprint()


def fit(setup: Setup, cfg: TrainConfig, on_epoch_end: Callable[[int, dict], None] | None = None,
        log: Callable[[str], None] = _log) -> dict[str, Any]:
    """Train ``setup.model`` for ``cfg.epochs`` epochs into ``cfg.out``; returns the metrics of metrics.json."""
    if cfg.tensorboard:
        from hff_cache.runs.tensorboard import require_tensorboard

        require_tensorboard()  # before anything runs, on every rank
    device = distributed.resolve_device(cfg.device)
    d = distributed.init(device)
    run = RunDir(cfg.out)
    job: _Job | None = None
    try:
        # rank 0 locks, checks (and with --force clears) the run directory; every rank gets its verdict
        resume = bool(_main_only(d, lambda: run.start_training(cfg, setup.doc, log)))
        job, st = _start(setup, cfg, run, d, device, resume, log)
        # steps per epoch = the longest rank's batches (the others repeat a weight-0 batch; see lockstep)
        nb = max(int(d.all_reduce([len(setup.train)], "max")[0]), 1)
        while st.epoch < cfg.epochs:
            row, t0 = _train_epoch(job, st, nb)
            _validate(job, row)
            row["seconds"] = time.perf_counter() - t0
            _end_epoch(job, st, row)
            if on_epoch_end is not None and d.is_main:
                on_epoch_end(row["epoch"], row)
        return _finish(job, st)
    finally:
        if job is not None and job.scalars is not None:
            job.scalars.close()
        run.release_lock()


def _start(setup: Setup, cfg: TrainConfig, run: RunDir, d: distributed.Dist, device: torch.device, resume: bool,
           log: Callable[[str], None]) -> tuple[_Job, LoopState]:
    """Model on its device, optimizer, RNGs, the resumed state; config.json written; DDP wrapped."""
    model = setup.model
    if d.is_main:
        run.path.mkdir(parents=True, exist_ok=True)
    threads = set_threads(cfg.threads)  # --threads, else the CPUs this process may use (not os.cpu_count())
    setup.doc.environment["torch_threads"] = str(threads)
    model.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    opt = torch.optim.AdamW(_param_groups(model, cfg), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed + d.rank)  # SpecAugment masks (their own per rank)
    if d.enabled:
        torch.manual_seed(cfg.seed + 1 + d.rank)  # dropout: other masks on each rank (weights are set)
    job = _Job(setup, cfg, run, d, device, opt, gen, log, threads=threads)
    st = _resume(job) if resume else LoopState()
    if d.is_main:
        run.write_document(setup.doc)
    job.params = model.trainable_parameters()
    job.net = _distribute(job)
    if cfg.tensorboard and d.is_main:
        from hff_cache.runs.tensorboard import TensorBoardScalars

        job.scalars = TensorBoardScalars(run.tensorboard_dir, resume_step=st.step)
    return job, st


def _resume(job: _Job) -> LoopState:
    """Weights, optimizer and RNG state of ``last.state.pt``; the loop state to continue from."""
    d = job.d
    state = job.run.load_resume_state(job.model, job.fingerprint)  # RunError naming the file when damaged
    job.opt.load_state_dict(state.pop("optimizer"))
    torch_rng, aug_rng = state.pop("torch_rng"), state.pop("aug_rng")
    rank_rng = state.pop("rank_rng", None)
    same_world = rank_rng is not None and len(rank_rng) == d.world_size
    if same_world:
        torch_rng, aug_rng = rank_rng[d.rank]
    if same_world or not d.enabled:  # another number of ranks: keep the fresh per-rank seeds
        torch.set_rng_state(torch_rng)
        job.gen.set_state(aug_rng)
    st = LoopState.from_dict(state)
    job.log(f"resuming {job.run} after epoch {st.epoch} (step {st.step})")
    return st


def _distribute(job: _Job) -> torch.nn.Module:
    """The model in DistributedDataParallel under torchrun (refusing a rank without data), else itself."""
    d, train = job.d, job.setup.train
    if not d.enabled:
        return job.model
    from torch.nn.parallel import DistributedDataParallel

    dev = job.device
    net = DistributedDataParallel(job.model, device_ids=[dev.index] if dev.type == "cuda" else None)
    counts = d.gather((len(train), getattr(train, "num_utterances", None)))
    job.log(f"torchrun: {d.world_size} ranks ({'nccl' if dev.type == 'cuda' else 'gloo'}); batches per rank "
            f"{[c[0] for c in counts]}, utterances per rank {[c[1] for c in counts]}")
    if min(c[0] for c in counts) == 0:
        raise RunError(f"a rank has no training batch ({[c[0] for c in counts]} per rank): fewer utterances "
                       "than processes; use fewer processes")
    return net


def _train_epoch(job: _Job, st: LoopState, nb: int) -> tuple[dict[str, Any], float]:
    """One pass over the training batches; (the epoch's log row so far, its start time)."""
    cfg, d, opt, model = job.cfg, job.d, job.opt, job.model
    epoch = st.epoch
    job.net.train()
    job.slow.new_epoch()
    t0 = time.perf_counter()
    loss_sum, utts, lr = 0.0, 0, cfg.lr
    t_wait = time.perf_counter()
    for i, (batch, weight) in enumerate(distributed.lockstep(job.setup.train.epoch(epoch), d)):
        t_step = time.perf_counter()
        st.wait_ms.append(1000 * (t_step - t_wait))
        factor = lr_factor(cfg, st.step, (epoch + i / nb) / cfg.epochs)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * factor
        lr = cfg.lr * factor
        batch = batch.to(job.device)
        loss = model.loss(job.net(batch, generator=job.gen), batch)
        opt.zero_grad(set_to_none=True)
        (loss * weight).backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        st.step += 1
        if weight > 0:  # a weight-0 batch is a repeat that keeps the ranks in step; it counts for nothing
            loss_sum += float(loss.detach()) * len(batch)
            utts += len(batch)
        t_wait = time.perf_counter()
        st.step_ms.append(1000 * (t_wait - t_step))
        slow = job.slow.add(t_wait - t_step)
        if slow is not None:
            job.log(slow)
    st.epoch_s.append(time.perf_counter() - t0)
    loss_sum, utts = d.all_reduce([loss_sum, utts])
    row = {"epoch": epoch + 1, "step": st.step, "train_loss": loss_sum / max(utts, 1),
           "train_utterances": int(utts), "lr": lr}
    return row, t0


def _validate(job: _Job, row: dict[str, Any]) -> None:
    """Validation loss and metrics into ``row``, every ``eval_every`` epochs and after the last."""
    cfg, setup = job.cfg, job.setup
    due = row["epoch"] % max(cfg.eval_every, 1) == 0 or row["epoch"] == cfg.epochs
    if setup.valid is None or not due:
        return
    result = evaluate_model(job.model, setup.valid, setup.task, setup.valid_refs, job.device, gather=job.d.gather)
    row["valid_loss"] = result.metrics["loss"]
    row.update({k: result.metrics[k] for k in _VALID_KEYS if k in result.metrics})


def _end_epoch(job: _Job, st: LoopState, row: dict[str, Any]) -> None:
    """Book the epoch: history, best, checkpoints, log.csv (and TensorBoard); every rank waits for them."""
    d, model, run, fp = job.d, job.model, job.run, job.fingerprint
    st.history.append(row)
    st.epoch = row["epoch"]
    meta = {"epoch": st.epoch, "step": st.step}
    score = row.get(job.setup.task.metric)
    if _improves(score, st.best, job.setup.task.metric) or job.setup.valid is None:
        st.best, st.best_epoch = score, st.epoch
        if d.is_main:
            run.save_checkpoint("best", model, fp, meta)
    rank_rng = d.gather((torch.get_rng_state(), job.gen.get_state()))
    if d.is_main:
        state = {**st.to_dict(), "optimizer": job.opt.state_dict(), "torch_rng": torch.get_rng_state(),
                 "aug_rng": job.gen.get_state(), "rank_rng": rank_rng if d.enabled else None}
        run.save_checkpoint("last", model, fp, meta, state)
        run.write_log(st.history)
        if job.scalars is not None:
            job.scalars.write(row)
    d.barrier()  # no rank runs ahead of a checkpoint it could be asked to resume from
    job.log(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))


def _improves(score: float | None, best: float | None, metric: str) -> bool:
    if score is None:
        return False
    return best is None or (score > best if metric == "accuracy" else score < best)


def _finish(job: _Job, st: LoopState) -> dict[str, Any]:
    """metrics.json, the final log.csv and the plots; every rank returns the metrics."""
    from hff_cache.runs.plots import plot_curves, plot_layer_weights

    d, model, device, run = job.d, job.model, job.device, job.run
    metrics = _final_metrics(st, job.setup.task, job.params, job.setup.doc)
    metrics.update(model.parameter_counts())  # trainable encoder (adapters included) vs fusion + head
    metrics["world_size"] = d.world_size
    metrics["torch_threads"] = job.threads
    if d.enabled:  # the job's peak is the largest rank's
        metrics["peak_rss_mb"] = d.all_reduce([metrics["peak_rss_mb"]], "max")[0]
    if device.type == "cuda":
        metrics["peak_cuda_mb"] = d.all_reduce([torch.cuda.max_memory_allocated(device) / 2**20], "max")[0]
    metrics["layer_weights"] = model.layer_weights()
    if d.is_main:
        run.write_metrics(metrics)
        run.write_log(st.history)
        plot_curves(st.history, run.plot_path(CURVES), job.setup.task.metric)
        plot_layer_weights(metrics["layer_weights"], run.plot_path(LAYER_WEIGHTS))
    d.barrier()
    return metrics


def _main_only(d: distributed.Dist, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0; every rank returns its result or raises its ``RunError``."""
    result: Any = None
    error: str | None = None
    if d.is_main:
        try:
            result = fn()
        except RunError as exc:
            if not d.enabled:
                raise
            error = str(exc)
    result, error = d.broadcast((result, error))
    if error is not None:
        raise RunError(error)
    return result


def _final_metrics(st: LoopState, task: Task, params: int, doc: RunDocument) -> dict[str, Any]:
    history = st.history
    best_row = next((r for r in history if r["epoch"] == st.best_epoch), history[-1] if history else {})
    keys = (*_VALID_KEYS, "valid_loss")

    def mean(xs: list[float]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    # the first epoch pays one-off costs (loading the cache into RAM, thread start-up)
    steady = st.epoch_s[1:] or st.epoch_s
    train_cache = doc.caches.get("train")
    return {
        "task": task.name,
        "metric": task.metric,
        **{k: best_row[k] for k in keys if k in best_row},
        "best_epoch": st.best_epoch,
        "last": {k: history[-1][k] for k in (*keys, "train_loss") if history and k in history[-1]},
        "epochs": st.epoch,
        "steps": st.step,
        "trainable_params": params,
        "step_time_ms": mean(st.step_ms),
        "data_wait_ms": mean(st.wait_ms),
        "epoch_seconds": mean(steady),
        "first_epoch_seconds": st.epoch_s[0] if st.epoch_s else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "mode": doc.mode,
        "method": doc.method,  # online runs: hff-adapters, bitfit, ...
        "cache_id": train_cache.cache_id if train_cache is not None else None,
        "fusion": doc.config.fusion.kind,
        "layers": doc.model.layers,
        "tokenizer_fingerprint": doc.task.fingerprint,
    }
