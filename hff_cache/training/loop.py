"""THE training loop, shared by cached and online training.

``fit`` takes a model (``HFFModel``), a train ``BatchSource`` and an optional validation source and owns
everything a run writes: ``config.json``, ``checkpoints/{last,best}.safetensors`` (+ ``last.state.pt``:
optimizer, step, epoch, RNG), ``log.csv``, ``metrics.json``, ``curves.png`` and ``layer_weights.png``.
``train`` is the cached mode: it opens the caches, builds the task and the model, then calls ``fit``.
The online mode only needs another batch source and a model with an encoder.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hff_cache.config import TrainConfig
from hff_cache.evaluation.evaluate import EvalResult, evaluate_model
from hff_cache.model.hff import HFFModel
from hff_cache.runs.directory import (
    CONFIG,
    METRICS,
    RunError,
    _atomic_json,
    _open_run,
    _write_log,
    load_weights,
    save_checkpoint,
)
from hff_cache.runtime import distributed
from hff_cache.tasks.task import Task
from hff_cache.training.optim import _param_groups, lr_factor

__all__ = ["Setup", "fit"]





def _log(msg: str) -> None:
    if distributed.current().is_main:  # under torchrun, one voice
        print(msg, file=sys.stderr, flush=True)


# --- caches and run directories --------------------------------------------------------------------------
















# --- cached-mode setup -----------------------------------------------------------------------------------
















# --- the loop --------------------------------------------------------------------------------------------








@dataclass
class Setup:
    """Everything ``fit`` needs, built by ``prepare`` (cached mode) or by the online mode."""

    model: HFFModel
    task: Task
    train: Any  # BatchSource
    valid: Any | None  # BatchSource
    valid_refs: dict[str, str]
    doc: dict[str, Any]  # config.json document


def fit(setup: Setup, cfg: TrainConfig, on_epoch_end: Callable[[int, dict], None] | None = None,
        log: Callable[[str], None] = _log) -> dict[str, Any]:
    """Train ``setup.model`` for ``cfg.epochs`` epochs; resumable at epoch boundaries.

    Under torchrun the model runs in DistributedDataParallel, each rank on its share of the data
    (``hff_cache.distributed``); rank 0 alone writes the run directory."""
    from torch.nn.parallel import DistributedDataParallel

    from hff_cache.runs.plots import plot_curves, plot_layer_weights

    run = Path(cfg.out)
    model, task, fp = setup.model, setup.task, setup.task.tokenizer.fingerprint()
    device = distributed.resolve_device(cfg.device)
    d = distributed.init(device)
    # rank 0 checks (and with --force clears) the run directory; every rank gets its verdict
    resume = bool(_main_only(d, lambda: _open_run(run, cfg, setup.doc, log)))
    if d.is_main:
        run.mkdir(parents=True, exist_ok=True)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    model.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    opt = torch.optim.AdamW(_param_groups(model, cfg), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed + d.rank)  # SpecAugment masks (their own per rank)
    if d.enabled:
        torch.manual_seed(cfg.seed + 1 + d.rank)  # dropout: other masks on each rank (weights are set)
    lower_better = task.metric != "accuracy"
    st: dict[str, Any] = {"epoch": 0, "step": 0, "best": None, "best_epoch": None, "history": [],
                          "step_ms": [], "wait_ms": [], "epoch_s": []}
    if resume:
        state = torch.load(run / "checkpoints" / "last.state.pt", weights_only=True)
        if state.pop("tokenizer_fingerprint", fp) != fp:
            raise RunError(f"cannot --resume {run}: its checkpoint was trained with another tokenizer")
        if "model" in state:
            model.load_checkpoint_state(state.pop("model"))
        else:  # a checkpoint written before the state carried its weights
            load_weights(model, run / "checkpoints" / "last.safetensors", fp)
        opt.load_state_dict(state.pop("optimizer"))
        torch_rng, aug_rng = state.pop("torch_rng"), state.pop("aug_rng")
        rank_rng = state.pop("rank_rng", None)
        same_world = rank_rng is not None and len(rank_rng) == d.world_size
        if same_world:
            torch_rng, aug_rng = rank_rng[d.rank]
        if same_world or not d.enabled:  # another number of ranks: keep the fresh per-rank seeds
            torch.set_rng_state(torch_rng)
            gen.set_state(aug_rng)
        st.update(state)
        log(f"resuming {run} after epoch {st['epoch']} (step {st['step']})")
    if d.is_main:
        _atomic_json(run / CONFIG, setup.doc)
    params = model.trainable_parameters()
    net = model
    if d.enabled:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        counts = d.gather((len(setup.train), getattr(setup.train, "num_utterances", None)))
        log(f"torchrun: {d.world_size} ranks ({'nccl' if device.type == 'cuda' else 'gloo'}); batches per rank "
            f"{[c[0] for c in counts]}, utterances per rank {[c[1] for c in counts]}")
        if min(c[0] for c in counts) == 0:
            raise RunError(f"a rank has no training batch ({[c[0] for c in counts]} per rank): fewer utterances "
                           "than processes; use fewer processes")
    # steps per epoch = the longest rank's batches (the others repeat a weight-0 batch; see lockstep)
    nb = max(int(d.all_reduce([len(setup.train)], "max")[0]), 1)
    while st["epoch"] < cfg.epochs:
        epoch = st["epoch"]
        net.train()
        t0 = time.perf_counter()
        loss_sum, utts, lr = 0.0, 0, cfg.lr
        t_wait = time.perf_counter()
        for i, (batch, weight) in enumerate(distributed.lockstep(setup.train.epoch(epoch), d)):
            t_step = time.perf_counter()
            st["wait_ms"].append(1000 * (t_step - t_wait))
            factor = lr_factor(cfg, st["step"], (epoch + i / nb) / cfg.epochs)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * factor
            lr = cfg.lr * factor
            batch = batch.to(device)
            loss = model.loss(net(batch, generator=gen), batch)
            opt.zero_grad(set_to_none=True)
            (loss * weight).backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            st["step"] += 1
            if weight > 0:
                loss_sum += float(loss.detach()) * len(batch)
                utts += len(batch)
            t_wait = time.perf_counter()
            st["step_ms"].append(1000 * (t_wait - t_step))
        train_seconds = time.perf_counter() - t0
        st["epoch_s"].append(train_seconds)
        loss_sum, utts = d.all_reduce([loss_sum, utts])
        row: dict[str, Any] = {"epoch": epoch + 1, "step": st["step"], "train_loss": loss_sum / max(utts, 1),
                               "train_utterances": int(utts), "lr": lr}
        last_epoch = epoch + 1 == cfg.epochs
        result: EvalResult | None = None
        if setup.valid is not None and ((epoch + 1) % max(cfg.eval_every, 1) == 0 or last_epoch):
            result = evaluate_model(model, setup.valid, task, setup.valid_refs, device, gather=d.gather)
            row["valid_loss"] = result.metrics["loss"]
            row.update({k: result.metrics[k] for k in ("wer", "cer", "per", "accuracy") if k in result.metrics})
        row["seconds"] = time.perf_counter() - t0
        st["history"].append(row)
        st["epoch"] = epoch + 1
        score = row.get(task.metric)
        improved = score is not None and (st["best"] is None or (score < st["best"] if lower_better
                                                                  else score > st["best"]))
        if improved or (setup.valid is None):
            st["best"], st["best_epoch"] = score, epoch + 1
            if d.is_main:
                save_checkpoint(run, "best", model, fp, {"epoch": epoch + 1, "step": st["step"]})
        rank_rng = d.gather((torch.get_rng_state(), gen.get_state()))
        if d.is_main:
            state = {k: v for k, v in st.items()}
            state.update(optimizer=opt.state_dict(), torch_rng=torch.get_rng_state(), aug_rng=gen.get_state(),
                         rank_rng=rank_rng if d.enabled else None)
            save_checkpoint(run, "last", model, fp, {"epoch": epoch + 1, "step": st["step"]}, state)
            _write_log(run, st["history"])
        d.barrier()  # no rank runs ahead of a checkpoint it could be asked to resume from
        log(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
        if on_epoch_end is not None and d.is_main:
            on_epoch_end(epoch + 1, row)
    metrics = _final_metrics(st, task, params, setup.doc)
    metrics.update(model.parameter_counts())  # trainable encoder (adapters included) vs fusion + head
    metrics["world_size"] = d.world_size
    if d.enabled:  # the job's peak is the largest rank's
        metrics["peak_rss_mb"] = d.all_reduce([metrics["peak_rss_mb"]], "max")[0]
    if device.type == "cuda":
        metrics["peak_cuda_mb"] = d.all_reduce([torch.cuda.max_memory_allocated(device) / 2**20], "max")[0]
    metrics["layer_weights"] = model.layer_weights()
    if d.is_main:
        _atomic_json(run / METRICS, metrics)
        _write_log(run, st["history"])
        plot_curves(st["history"], run / "curves.png", task.metric)
        plot_layer_weights(metrics["layer_weights"], run / "layer_weights.png")
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




def _final_metrics(st: dict[str, Any], task: Task, params: int, doc: dict[str, Any]) -> dict[str, Any]:
    history = st["history"]
    best_row = next((r for r in history if r["epoch"] == st["best_epoch"]), history[-1] if history else {})
    keys = ("wer", "cer", "per", "accuracy", "valid_loss")

    def mean(xs: list[float]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    # the first epoch pays one-off costs (loading the cache into RAM, thread start-up)
    steady = st["epoch_s"][1:] or st["epoch_s"]
    return {
        "task": task.name,
        "metric": task.metric,
        **{k: best_row[k] for k in keys if k in best_row},
        "best_epoch": st["best_epoch"],
        "last": {k: history[-1][k] for k in (*keys, "train_loss") if history and k in history[-1]},
        "epochs": st["epoch"],
        "steps": st["step"],
        "trainable_params": params,
        "step_time_ms": mean(st["step_ms"]),
        "data_wait_ms": mean(st["wait_ms"]),
        "epoch_seconds": mean(steady),
        "first_epoch_seconds": st["epoch_s"][0] if st["epoch_s"] else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "mode": doc.get("mode", "cached"),
        "method": (doc.get("encoder") or {}).get("method"),  # online runs: hff-adapters, bitfit, ...
        "cache_id": doc["caches"]["train"]["cache_id"] if "train" in doc.get("caches", {}) else None,
        "fusion": doc["config"]["fusion"]["kind"],
        "layers": doc["model"]["layers"],
        "tokenizer_fingerprint": doc["task"]["fingerprint"],
    }
