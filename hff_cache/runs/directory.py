"""The run directory: the one module that knows its files, checkpoints and commit points."""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from hff_cache.config import TrainConfig
from hff_cache.model.hff import HFFModel, ModelSpec
from hff_cache.tasks.task import Task


class RunError(ValueError):
    """The run directory, its checkpoint or a cache does not fit the requested run."""


CONFIG, METRICS, LOG = "config.json", "metrics.json", "log.csv"


LOG_FIELDS = ("epoch", "step", "train_loss", "train_utterances", "valid_loss", "wer", "cer", "per", "accuracy", "lr",
              "seconds")


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
    from hff_cache.tasks.tokenizers import tokenizer_from_dict

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


def _write_log(run: Path, history: list[dict[str, Any]]) -> None:
    with (run / LOG).open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LOG_FIELDS, extrasaction="ignore")
        w.writeheader()
        for row in history:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
