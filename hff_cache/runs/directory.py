"""The run directory: the one module that knows its files, checkpoints, commit points and lock.

A run directory holds ``config.json`` (the ``RunDocument``), ``checkpoints/{best,last}.safetensors`` (weights;
metadata: tokenizer fingerprint, epoch, step) and ``checkpoints/last.state.pt`` (the resume state: loop state,
optimizer, RNG, and its own copy of the weights), ``log.csv``, ``metrics.json``, the plots, ``tensorboard/``
(with ``--tensorboard``) and ``eval/<cache>/``. Every file is committed the same way: written beside its name,
fsynced, renamed over it, the directory fsynced; a kill or power cut leaves the old file or the new one.
While a training runs it holds an exclusive ``flock`` on ``RUN/.lock``; a second training into the same
directory is refused, naming the holder.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import socket
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import torch

from hff_cache.config import TrainConfig, to_dict
from hff_cache.model.hff import HFFModel
from hff_cache.runs.document import RunDocument, RunError, check_cache, storage_options_for

try:  # POSIX only; elsewhere run directories go unlocked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = ["CONFIG", "LOCK", "LOG", "LOG_FIELDS", "METRICS", "RunDir", "RunError", "damage"]

CONFIG, METRICS, LOG, LOCK = "config.json", "metrics.json", "log.csv", ".lock"
DECODER = "decoder.json"  # the decoder settings tune-decoder chose; later decodes start from them
CHECKPOINTS, EVAL, TENSORBOARD = "checkpoints", "eval", "tensorboard"
CURVES, LAYER_WEIGHTS = "curves.png", "layer_weights.png"
CHECKPOINT_NAMES = ("best", "last")

LOG_FIELDS = ("epoch", "step", "train_loss", "train_utterances", "valid_loss", "wer", "cer", "per", "accuracy", "lr",
              "seconds")


def damage(exc: BaseException) -> str:
    """The first line of what a reader said about a damaged file, short enough for a one-line error."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"{type(exc).__name__}: {text[:160]}"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse to fsync a directory; the rename still holds
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _commit(tmp: Path, path: Path) -> None:
    """The commit point: ``tmp`` (complete) fsynced, renamed over ``path``, and the rename made durable."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def _write_text(path: Path, text: str) -> None:
    tmp = _tmp(path)
    tmp.write_text(text, encoding="utf-8")
    _commit(tmp, path)


def _config_diffs(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    skip = set(TrainConfig.RUNTIME_FIELDS)
    return [f"{k}: run has {old.get(k)!r}, now {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if k not in skip and old.get(k) != new.get(k)]


class RunDir:
    """One run directory on local disk: its paths, document, checkpoints, commit points and lock."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock: IO[str] | None = None

    def __str__(self) -> str:
        return str(self.path)

    # -- file names --

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    @property
    def log_path(self) -> Path:
        return self.path / LOG

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / TENSORBOARD

    def plot_path(self, name: str) -> Path:
        return self.path / name

    def weights_path(self, name: str) -> Path:
        return self.path / CHECKPOINTS / f"{name}.safetensors"

    def state_path(self, name: str = "last") -> Path:
        return self.path / CHECKPOINTS / f"{name}.state.pt"

    def eval_dir(self, cache_name: str) -> Path:
        return self.path / EVAL / cache_name

    def is_run(self) -> bool:
        return self.config_path.is_file()

    # -- the lock --

    def acquire_lock(self) -> None:
        """Exclusive ``flock`` on ``RUN/.lock``, held until ``release_lock``; the OS drops it when the process
        dies, so a crash or SIGKILL never leaves a stale lock. Refused (RunError) while another holds it."""
        if fcntl is None or self._lock is not None:
            return
        path = self.path / LOCK
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            f = open(path, "a+", encoding="utf-8")  # held open (and locked) for the whole training
        except OSError as e:
            raise RunError(f"cannot create the lock file {path}: {e.strerror}; fix the cause (free space? "
                           "permissions?) and rerun") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "unknown process"
            f.close()
            raise RunError(f"{self.path} is being trained by another process ({holder}); wait for it to finish, "
                           "or train into another --out") from None
        with contextlib.suppress(OSError):  # who holds it, for the message above; best effort (disk full)
            f.truncate(0)
            since = datetime.now(timezone.utc).isoformat(timespec="seconds")
            f.write(f"pid {os.getpid()} on {socket.gethostname()} since {since}\n")
            f.flush()
        self._lock = f

    def release_lock(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the descriptor releases the flock
            self._lock = None

    # -- the document, metrics, log --

    def read_document(self) -> RunDocument:
        """The run's ``RunDocument``; a one-line RunError when there is none or it is damaged."""
        if not self.is_run():
            raise RunError(f"{self.path} is not a run directory (no {CONFIG})")
        try:
            doc = RunDocument.from_json(json.loads(self.config_path.read_text(encoding="utf-8")))
            doc.task.build()  # a tokenizer that cannot be rebuilt is damage too
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise RunError(f"{self.config_path} is damaged ({damage(exc)}); the run cannot be read: start it "
                           "over with `hff-cache train --force`") from None
        return doc

    def write_document(self, doc: RunDocument) -> None:
        _write_text(self.config_path, json.dumps(doc.to_json(), indent=2, default=str))

    def read_metrics(self) -> dict[str, Any] | None:
        """``metrics.json`` of a finished run; None while unfinished; RunError when damaged."""
        if not self.metrics_path.exists():
            return None
        try:
            metrics = json.loads(self.metrics_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RunError(f"{self.metrics_path} is damaged ({damage(exc)}); retrain the run with --force") from None
        if not isinstance(metrics, dict):
            raise RunError(f"{self.metrics_path} is damaged (not a JSON object); retrain the run with --force")
        return metrics

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        _write_text(self.metrics_path, json.dumps(metrics, indent=2, default=str))

    def read_decoder(self) -> dict[str, Any] | None:
        """The tuned decoder settings (``tune-decoder``), or None when the run was never tuned."""
        path = self.path / DECODER
        if not path.exists():
            return None
        try:
            settings = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RunError(f"{path} is damaged ({damage(exc)}); rerun `hff-cache tune-decoder` or delete it") from None
        return settings.get("decoder") if isinstance(settings, dict) else None

    def write_decoder(self, decoder: dict[str, Any], grid: list[dict[str, Any]]) -> None:
        _write_text(self.path / DECODER, json.dumps({"decoder": decoder, "grid": grid}, indent=2, default=str))

    def write_log(self, history: Iterable[dict[str, Any]]) -> None:
        buf = io.StringIO(newline="")
        w = csv.DictWriter(buf, fieldnames=LOG_FIELDS, extrasaction="ignore")
        w.writeheader()
        for row in history:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        _write_text(self.log_path, buf.getvalue())

    def read_log(self) -> list[dict[str, str]]:
        with self.log_path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))

    def write_evaluation(self, cache_name: str, rows: list[dict[str, Any]], summary: dict[str, Any]) -> Path:
        """``eval/<cache_name>/{hyps.jsonl,metrics.json}``; returns the folder."""
        out = self.eval_dir(cache_name)
        out.mkdir(parents=True, exist_ok=True)
        _write_text(out / "hyps.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        _write_text(out / METRICS, json.dumps(summary, indent=2))
        return out

    # -- checkpoints --

    def save_checkpoint(self, name: str, model: HFFModel, fingerprint: str, meta: dict[str, Any],
                        state: dict[str, Any] | None = None) -> None:
        """Weights as safetensors (metadata: tokenizer fingerprint, epoch, step); ``state`` beside it."""
        from safetensors.torch import save_file

        (self.path / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in model.checkpoint_state().items()}
        info = {"tokenizer_fingerprint": fingerprint, **{k: str(v) for k, v in meta.items()}}
        weights = self.weights_path(name)
        save_file(tensors, str(_tmp(weights)), metadata=info)
        if state is not None:
            # The resume state carries its own copy of the weights: one file, one rename, one commit point, so
            # a kill between the two renames can never pair one epoch's optimiser state with another's weights.
            path = self.state_path(name)
            torch.save({**state, "model": tensors, "tokenizer_fingerprint": fingerprint}, _tmp(path))
            _commit(_tmp(path), path)
        _commit(_tmp(weights), weights)

    def load_weights(self, model: HFFModel, name: str, fingerprint: str, fix: str | None = None) -> dict[str, str]:
        """Load checkpoint ``name`` into ``model``; refuse one trained with another tokenizer, one that does not
        fit the model, or a damaged file (one-line RunErrors that end with ``fix``)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = self.weights_path(name)
        other = next(n for n in CHECKPOINT_NAMES if n != name) if name in CHECKPOINT_NAMES else "best"
        fix = fix or f"use the other checkpoint (--checkpoint {other}), or retrain the run with --force"
        if not path.exists():
            raise RunError(f"{self.path}: no checkpoint {path.name}; {fix}")
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
        except Exception as exc:  # safetensors' own error type is not public API; any failure is damage
            raise RunError(f"checkpoint {path} is damaged ({damage(exc)}); {fix}") from None
        got = meta.get("tokenizer_fingerprint")
        if got != fingerprint:
            raise RunError(f"checkpoint {path} was trained with tokenizer {got}, but the run's tokenizer is "
                           f"{fingerprint}: its outputs would decode to the wrong symbols")
        self._load_into(model, tensors, path, fix)
        return meta

    @staticmethod
    def _load_into(model: HFFModel, tensors: dict[str, torch.Tensor], path: Path, fix: str) -> None:
        try:
            model.load_checkpoint_state(tensors)
        except (ValueError, RuntimeError) as exc:  # other keys, or other shapes
            raise RunError(f"checkpoint {path} does not fit the run's model ({damage(exc)}); {fix}") from None

    def load_resume_state(self, model: HFFModel, fingerprint: str) -> dict[str, Any]:
        """The resume state of ``last``, with its weights already loaded into ``model``.

        States written before they carried their own weights take them from ``last.safetensors``."""
        path = self.state_path("last")
        fix = "start over with --force"
        try:
            state = torch.load(path, weights_only=True)
            if not isinstance(state, dict) or "optimizer" not in state or "torch_rng" not in state:
                raise ValueError("not a resume state (no optimizer or RNG state)")
        except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError ... for a cut file
            raise RunError(f"cannot --resume {self.path}: {path} is damaged ({damage(exc)}); {fix}") from None
        if state.pop("tokenizer_fingerprint", fingerprint) != fingerprint:
            raise RunError(f"cannot --resume {self.path}: its checkpoint was trained with another tokenizer")
        if "model" in state:
            self._load_into(model, state.pop("model"), path, fix)
        else:  # a checkpoint written before the state carried its weights
            self.load_weights(model, "last", fingerprint, fix=fix)
        return state

    # -- starting a training --

    def start_training(self, cfg: TrainConfig, doc: RunDocument, log: Callable[[str], None]) -> bool:
        """Lock the directory, then check it against ``doc``; True when a checkpoint should be resumed.

        ``--force`` clears a previous run (the lock first: never another live training's files)."""
        self.acquire_lock()
        if cfg.force:
            if self.is_run():
                log(f"--force: starting over in {self.path}")
            self.clear()
            return False
        if not self.is_run():
            return False
        old = self.read_document()
        diffs = _config_diffs(to_dict(old.config), doc.config_dict())
        if not cfg.resume:
            why = f"with another config ({'; '.join(diffs)})" if diffs else "with the same config"
            raise RunError(f"{self.path} already holds a run {why}; use --resume to continue it or --force to "
                           "start over")
        if diffs:
            raise RunError(f"cannot --resume {self.path}: it was made with another config ({'; '.join(diffs)}); "
                           "use --force to start over")
        self._check_caches(old, doc, cfg)
        if old.task.fingerprint != doc.task.fingerprint:
            raise RunError(f"cannot --resume {self.path}: its tokenizer ({old.task.fingerprint}) differs from the "
                           f"one these labels give ({doc.task.fingerprint}); the checkpoint's outputs would mean "
                           "other symbols")
        return self.state_path("last").exists()

    @staticmethod
    def _check_caches(old: RunDocument, doc: RunDocument, cfg: TrainConfig) -> None:
        for split, expected in old.caches.items():
            now = doc.caches.get(split)
            if now is not None and now.cache_id != expected.cache_id:
                from hff_cache.cache import CacheReader

                reader = CacheReader(now.url, storage_options=storage_options_for(now.url, cfg))
                check_cache(reader, expected, what=f"{split} cache {now.url}")

    def clear(self) -> None:
        """Remove what a run wrote (``--force``); the lock file stays, it is held right now."""
        for name in (CHECKPOINTS, EVAL, TENSORBOARD):
            shutil.rmtree(self.path / name, ignore_errors=True)
        for name in (CONFIG, METRICS, LOG, CURVES, LAYER_WEIGHTS, DECODER):
            (self.path / name).unlink(missing_ok=True)
