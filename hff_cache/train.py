"""THE training loop, shared by cached and online training.

``fit`` takes a model (``HFFModel``), a train ``BatchSource`` and an optional validation source and owns
everything a run writes: ``config.json``, ``checkpoints/{last,best}.safetensors`` (+ ``last.state.pt``:
optimizer, step, epoch, RNG), ``log.csv``, ``metrics.json``, ``curves.png`` and ``layer_weights.png``.
``train`` is the cached mode: it opens the caches, builds the task and the model, then calls ``fit``.
The online mode only needs another batch source and a model with an encoder.
"""

from __future__ import annotations

import csv
import json
import math
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from hff_cache import distributed
from hff_cache.config import TrainConfig, environment, to_dict
from hff_cache.evaluate import EvalResult, evaluate_model
from hff_cache.model import HFFModel, ModelSpec, SpecAugment
from hff_cache.tasks import Task

__all__ = ["RunError", "Setup", "check_cache", "fit", "load_run", "prepare", "train"]

CONFIG, METRICS, LOG = "config.json", "metrics.json", "log.csv"
LOG_FIELDS = ("epoch", "step", "train_loss", "train_utterances", "valid_loss", "wer", "cer", "per", "accuracy", "lr",
              "seconds")


class RunError(ValueError):
    """The run directory, its checkpoint or a cache does not fit the requested run."""


def _log(msg: str) -> None:
    if distributed.current().is_main:  # under torchrun, one voice
        print(msg, file=sys.stderr, flush=True)


# --- caches and run directories --------------------------------------------------------------------------


def cache_doc(reader: Any, utterances: int) -> dict[str, Any]:
    return {"url": str(reader.url), "cache_id": reader.cache_id, "meta": reader.meta.to_dict(),
            "utterances": utterances}


def check_cache(reader: Any, expected: dict[str, Any], what: str) -> None:
    """Refuse a cache whose encoder/layers/codec differ from ``expected`` (a ``cache_doc``), saying what differs."""
    if reader.cache_id == expected["cache_id"]:
        return
    from hff_cache.cache import CacheMeta, check_compatible

    diffs = check_compatible(reader.meta, CacheMeta.from_dict(expected["meta"]))
    detail = "; ".join(d.replace("requested", "the run's cache has") for d in diffs) or "cache ids differ"
    raise RunError(f"{what} ({reader.cache_id}) does not match the run's cache {expected['url']} "
                   f"({expected['cache_id']}): {detail}")


def _config_diffs(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    skip = set(TrainConfig.RUNTIME_FIELDS)
    return [f"{k}: run has {old.get(k)!r}, now {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if k not in skip and old.get(k) != new.get(k)]


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def save_checkpoint(run: Path, name: str, model: HFFModel, fingerprint: str, meta: dict[str, Any],
                    state: dict[str, Any] | None = None) -> None:
    """Weights as safetensors (metadata: tokenizer fingerprint, epoch, step); ``state`` beside it."""
    ckpt = run / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.checkpoint_state().items()}
    info = {"tokenizer_fingerprint": fingerprint, **{k: str(v) for k, v in meta.items()}}
    save_file(tensors, str(ckpt / f"{name}.safetensors.tmp"), metadata=info)
    if state is not None:
        # The resume state carries its own copy of the weights: one file, one rename, one commit point, so
        # a kill between the two renames can never pair one epoch's optimiser state with another's weights.
        torch.save({**state, "model": tensors, "tokenizer_fingerprint": fingerprint}, ckpt / f"{name}.state.pt.tmp")
        os.replace(ckpt / f"{name}.state.pt.tmp", ckpt / f"{name}.state.pt")
    os.replace(ckpt / f"{name}.safetensors.tmp", ckpt / f"{name}.safetensors")


def load_weights(model: HFFModel, path: Path, fingerprint: str) -> dict[str, str]:
    """Load weights into ``model``; refuse a checkpoint trained with another tokenizer."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    got = meta.get("tokenizer_fingerprint")
    if got != fingerprint:
        raise RunError(f"checkpoint {path} was trained with tokenizer {got}, but the run's tokenizer is "
                       f"{fingerprint}: its outputs would decode to the wrong symbols")
    model.load_checkpoint_state(load_file(str(path)))
    return meta


def load_run(run: str | Path, checkpoint: str = "best") -> tuple[TrainConfig, Task, HFFModel, dict[str, Any]]:
    """(config, task, model with ``checkpoint`` weights, config.json document) of a finished run."""
    from hff_cache.text import tokenizer_from_dict

    run = Path(run)
    if not (run / CONFIG).exists():
        raise RunError(f"{run} is not a run directory (no {CONFIG})")
    doc = json.loads((run / CONFIG).read_text())
    if doc.get("mode") == "online":
        raise RunError(f"{run} is an online run (method {doc['encoder']['method']}): its model includes the "
                       "encoder and reads audio, not a cache; use `hff-cache transcribe` "
                       "(hff_cache.transcribe.load_for_inference)")
    cfg = TrainConfig.from_dict(doc["config"])
    task = Task(doc["task"]["name"], tokenizer_from_dict(doc["task"]["tokenizer"]))
    model = HFFModel(ModelSpec.from_dict(doc["model"]))
    path = run / "checkpoints" / f"{checkpoint}.safetensors"
    if not path.exists():
        raise RunError(f"{run}: no checkpoint {path.name}")
    load_weights(model, path, task.tokenizer.fingerprint())
    model.eval()
    return cfg, task, model, doc


# --- cached-mode setup -----------------------------------------------------------------------------------


@dataclass
class Setup:
    """Everything ``fit`` needs, built by ``prepare`` (cached mode) or by the online mode."""

    model: HFFModel
    task: Task
    train: Any  # BatchSource
    valid: Any | None  # BatchSource
    valid_refs: dict[str, str]
    doc: dict[str, Any]  # config.json document


def prepare(cfg: TrainConfig, log: Callable[[str], None] = _log) -> Setup:
    from hff_cache.cache import CacheReader
    from hff_cache.loader import CacheBatches
    from hff_cache.tasks import load_labels, report_label_ids

    if not cfg.cache:
        raise RunError("no training cache given (--cache)")
    reader = CacheReader(cfg.cache, storage_options=storage_options_for(cfg.cache, cfg))
    valid_reader = (CacheReader(cfg.valid_cache, storage_options=storage_options_for(cfg.valid_cache, cfg))
                    if cfg.valid_cache else None)
    if valid_reader is not None:
        check_cache(valid_reader, cache_doc(reader, len(reader)), what=f"validation cache {cfg.valid_cache}")
    labels = load_labels(cfg.labels) if cfg.labels else None
    if labels is not None:
        report_label_ids(labels, [r for r in (reader, valid_reader) if r is not None])
    layers = list(cfg.layers) if cfg.layers is not None else list(reader.meta.layers)
    missing = [k for k in layers if k not in reader.meta.layers]
    if missing or not layers:
        raise RunError(f"layers {missing or layers} are not stored in {cfg.cache} "
                       f"(stored: {reader.meta.layers})")
    layers, fusion = _model_layers(cfg, layers)
    task = Task.from_labels(cfg.task, reader, labels)
    train_data = task.prepare(reader, labels, "train")
    ctc = task.kind == "ctc"
    d = distributed.current()  # under torchrun each rank reads only its share of both caches
    common = dict(ctc=ctc, layers=layers, batch_frames=cfg.batch_frames, max_batch_utts=cfg.max_batch_utts,
                  in_memory=cfg.in_memory, num_workers=cfg.num_workers, prefetch=cfg.prefetch, rank=d.rank,
                  world_size=d.world_size, local_world_size=d.local_world_size)
    train_src = CacheBatches(reader, train_data, shuffle=True, seed=cfg.seed,
                             shuffle_frames=cfg.shuffle_frames, **common)
    valid_src, valid_refs, valid_n = None, {}, 0
    if valid_reader is not None:
        valid_data = task.prepare(valid_reader, labels, "valid")
        valid_src = CacheBatches(valid_reader, valid_data, shuffle=False, **common)
        valid_refs, valid_n = dict(zip(valid_data.ids, valid_data.refs, strict=True)), len(valid_data)
    torch.manual_seed(cfg.seed)
    spec = ModelSpec(fusion=fusion, num_layers=len(layers),
                     hidden_size=int(reader.meta.encoder.hidden_size), head="ctc" if ctc else "classify",
                     vocab_size=task.tokenizer.vocab_size, layers=layers, pooling=cfg.pooling,
                     normalize=cfg.normalize)
    augment = SpecAugment(cfg.spec_time_masks, cfg.spec_time_width, cfg.spec_feat_masks, cfg.spec_feat_width)
    model = HFFModel(spec, encoder=None, augment=augment)
    if cfg.normalize == "stats":
        stats = reader.layer_stats(layers)
        if stats is None:
            raise RunError(f"{cfg.cache} has no layer statistics; use --normalize none")
        model.set_stats(*stats)
    caches = {"train": cache_doc(reader, len(train_data))}
    if valid_reader is not None:
        caches["valid"] = cache_doc(valid_reader, valid_n)
    doc = {"mode": "cached", "config": _redacted(to_dict(cfg)), "model": spec.to_dict(),
           "task": {**task.to_dict(), "fingerprint": task.tokenizer.fingerprint()}, "caches": caches,
           "environment": environment()}
    log(f"task {task.name}: {len(train_data)} train / {valid_n} valid utterances, vocabulary "
        f"{task.tokenizer.vocab_size}; {len(train_src)} batches/epoch; in_memory={train_src.in_memory}")
    return Setup(model, task, train_src, valid_src, valid_refs, doc)


def storage_options_for(url: str, cfg: TrainConfig) -> dict[str, Any] | None:
    """The run's fsspec options for a URL cache; none for local paths (the reader refuses them there)."""
    return dict(cfg.storage_options) if "://" in str(url) and cfg.storage_options else None


_SECRET_WORDS = ("secret", "key", "token", "password", "credential")


def _redacted(config: dict[str, Any]) -> dict[str, Any]:
    # config.json is shared with results; credentials must not land in it (endpoints and flags may).
    opts = config.get("storage_options") or {}
    config["storage_options"] = {k: ("<redacted>" if any(w in k.lower() for w in _SECRET_WORDS) else v)
                                 for k, v in opts.items()}
    return config


def _model_layers(cfg: TrainConfig, layers: list[int]) -> tuple[list[int], dict[str, Any]]:
    """Hidden states the model reads + its fusion config. A one-layer fusion (``last``, ``single:K``) reads
    only that layer from the cache, so its batches are 1/L the size (same model, far less I/O and copying)."""
    fusion = to_dict(cfg.fusion)
    kind = str(fusion["kind"]).strip().lower()
    if kind == "last" or kind.startswith("single:"):
        try:
            k = -1 if kind == "last" else int(kind.split(":", 1)[1])
            layers = [layers[k]]
        except (ValueError, IndexError):
            raise RunError(f"fusion {fusion['kind']!r}: no such layer among the {len(layers)} used "
                           f"({layers})") from None
        fusion["kind"] = "last"
    return layers, fusion


def train(cfg: TrainConfig, on_epoch_end: Callable[[int, dict], None] | None = None,
          log: Callable[[str], None] = _log) -> dict[str, Any]:
    """Cached-mode training: returns the metrics written to ``metrics.json``."""
    setup = prepare(cfg, log)
    return fit(setup, cfg, on_epoch_end=on_epoch_end, log=log)


# --- the loop --------------------------------------------------------------------------------------------


def _param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    # Layer-weight logits get their own LR (few numbers that must move far) and, like biases and
    # norms, no weight decay (decay would pull the softmax back to uniform).
    # Online full/bitfit: the encoder's own weights take ``encoder_lr`` (adapters, being new, take ``lr``).
    fusion, decay, no_decay, enc_decay, enc_no_decay = [], [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("fusion.logits"):
            fusion.append(p)
        elif name.startswith("encoder.") and not name.startswith("encoder.layer_transforms."):
            (enc_decay if p.dim() >= 2 else enc_no_decay).append(p)
        elif p.dim() >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
              {"params": no_decay, "weight_decay": 0.0, "base_lr": cfg.lr},
              {"params": fusion, "weight_decay": 0.0, "base_lr": cfg.fusion_lr}]
    enc_lr = cfg.encoder_lr if cfg.encoder_lr is not None else cfg.lr
    groups += [{"params": enc_decay, "weight_decay": cfg.weight_decay, "base_lr": enc_lr},
               {"params": enc_no_decay, "weight_decay": 0.0, "base_lr": enc_lr}]
    return [dict(g, lr=g["base_lr"]) for g in groups if g["params"]]


def lr_factor(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from 1 to ``min_lr_ratio`` over training."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
    if cfg.lr_schedule == "constant":
        return warm
    cos = 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    return warm * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cos)


def _open_run(run: Path, cfg: TrainConfig, doc: dict[str, Any], log: Callable[[str], None]) -> bool:
    """Check the run directory against ``doc``; True when a checkpoint should be resumed."""
    old_path = run / CONFIG
    if not old_path.exists():
        return False
    old = json.loads(old_path.read_text())
    if cfg.force:
        log(f"--force: starting over in {run}")
        for name in ("checkpoints", "eval"):
            shutil.rmtree(run / name, ignore_errors=True)
        for name in (CONFIG, METRICS, LOG, "curves.png", "layer_weights.png"):
            (run / name).unlink(missing_ok=True)
        return False
    diffs = _config_diffs(old.get("config", {}), doc["config"])
    if not cfg.resume:
        why = f"with another config ({'; '.join(diffs)})" if diffs else "with the same config"
        raise RunError(f"{run} already holds a run {why}; use --resume to continue it or --force to "
                       "start over")
    if diffs:
        raise RunError(f"cannot --resume {run}: it was made with another config ({'; '.join(diffs)}); use "
                       "--force to start over")
    for split, expected in old.get("caches", {}).items():
        now = doc["caches"].get(split)
        if now is not None and now["cache_id"] != expected["cache_id"]:
            from hff_cache.cache import CacheReader

            reader = CacheReader(now["url"], storage_options=storage_options_for(now["url"], cfg))
            check_cache(reader, expected, what=f"{split} cache {now['url']}")
    old_fp, new_fp = old["task"]["fingerprint"], doc["task"]["fingerprint"]
    if old_fp != new_fp:
        raise RunError(f"cannot --resume {run}: its tokenizer ({old_fp}) differs from the one these labels "
                       f"give ({new_fp}); the checkpoint's outputs would mean other symbols")
    return (run / "checkpoints" / "last.state.pt").exists()


def fit(setup: Setup, cfg: TrainConfig, on_epoch_end: Callable[[int, dict], None] | None = None,
        log: Callable[[str], None] = _log) -> dict[str, Any]:
    """Train ``setup.model`` for ``cfg.epochs`` epochs; resumable at epoch boundaries.

    Under torchrun the model runs in DistributedDataParallel, each rank on its share of the data
    (``hff_cache.distributed``); rank 0 alone writes the run directory."""
    from torch.nn.parallel import DistributedDataParallel

    from hff_cache.plots import plot_curves, plot_layer_weights

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


def _write_log(run: Path, history: list[dict[str, Any]]) -> None:
    with (run / LOG).open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LOG_FIELDS, extrasaction="ignore")
        w.writeheader()
        for row in history:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


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
