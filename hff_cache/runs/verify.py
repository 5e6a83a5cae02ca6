"""``hff-cache verify RUN``: check a run directory as ``verify`` checks a cache.

The document parses and its tokenizer rebuilds to the recorded fingerprint; every checkpoint loads, carries
that fingerprint and fits the model the document describes; the resume state loads; a finished run has its
metrics and one log row per epoch. Every problem is reported, none stops the check. Read-only, no lock: safe
next to a live training (its files change only by atomic renames).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from hff_cache.cache.verify import ProblemReport
from hff_cache.model.hff import HFFModel
from hff_cache.runs.directory import CHECKPOINT_NAMES, CHECKPOINTS, RunDir, damage
from hff_cache.runs.document import RunDocument, RunError

__all__ = ["RunProblem", "RunReport", "verify_run"]


@dataclass
class RunProblem:
    """One defect. ``kind``: document | tokenizer | checkpoint | state | metrics | log."""

    kind: str
    message: str
    file: str | None = None

    def __str__(self) -> str:
        return f"{self.file}: {self.message}" if self.file else self.message


@dataclass
class RunReport(ProblemReport):
    run: str
    mode: str | None = None
    epochs: int | None = None  # epochs the config asks for
    epochs_done: int = 0  # epochs the last checkpoint holds
    finished: bool = False
    checkpoints: list[str] = field(default_factory=list)  # the ones that loaded and fit
    problems: list[RunProblem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def format(self) -> str:
        """The report as ``verify`` prints it: a status line, then one line per warning and problem."""
        status = "OK" if self.ok else f"{len(self.problems)} PROBLEM(S)"
        state = "finished" if self.finished else "unfinished"
        lines = [f"{self.run}: {status}" if self.mode is None else
                 f"{self.run}: {status}: {self.mode} run, {state}, {self.epochs_done} of {self.epochs} epochs done; "
                 f"sound checkpoints: {', '.join(self.checkpoints) or 'none'}"]
        lines += [f"  warning: {w}" for w in self.warnings]
        lines += [f"  {p.kind}: {p}" for p in self.problems]
        return "\n".join(lines)


def verify_run(path: str | Path) -> RunReport:
    """Check the run directory at ``path``; ``report.ok`` when sound. Raises RunError only when ``path`` is not
    a run directory at all (no config.json)."""
    rd = RunDir(path)
    if not rd.is_run():
        raise RunError(f"{rd} is not a run directory (no config.json)")
    rep = RunReport(run=str(rd))
    try:
        doc = rd.read_document()
    except RunError as exc:
        rep.problems.append(RunProblem("document", str(exc)))
        return rep
    rep.mode, rep.epochs = doc.mode, doc.config.epochs
    fingerprint = _check_tokenizer(doc, rep)
    for name in CHECKPOINT_NAMES:
        _check_weights(rd, doc, name, fingerprint, rep)
    _check_state(rd, doc, fingerprint, rep)
    _check_results(rd, rep)
    extra = sorted(p.name for p in (rd.path / CHECKPOINTS).glob("*.tmp"))
    if extra:
        rep.warnings.append(f"left-over temporary files (a write was interrupted; harmless): {', '.join(extra)}")
    return rep


def _check_tokenizer(doc: RunDocument, rep: RunReport) -> str:
    got = doc.task.build().tokenizer.fingerprint()
    if got != doc.task.fingerprint:
        rep.problems.append(RunProblem("tokenizer", f"the tokenizer rebuilds to fingerprint {got}, but the run "
                                       f"recorded {doc.task.fingerprint}", "config.json"))
    return got


def _bare_model(doc: RunDocument) -> HFFModel:
    """The run's fusion and head without an encoder: what every checkpoint must fit (online checkpoints add
    the encoder weights their method trained, checked when the encoder is loaded)."""
    return HFFModel(doc.model)


def _check_weights(rd: RunDir, doc: RunDocument, name: str, fingerprint: str, rep: RunReport) -> None:
    from safetensors import safe_open

    path = rd.weights_path(name)
    if not path.exists():
        if rd.state_path("last").exists() or rd.metrics_path.exists():  # an epoch finished: both were written
            rep.problems.append(RunProblem("checkpoint", "missing", _rel(rd, path)))
        return
    try:
        with safe_open(str(path), "pt") as f:
            got = (f.metadata() or {}).get("tokenizer_fingerprint")
            tensors = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("encoder.")}
    except Exception as exc:  # any failure to read is damage
        rep.problems.append(RunProblem("checkpoint", f"damaged ({damage(exc)}); retrain with --force", _rel(rd, path)))
        return
    if got != fingerprint:
        rep.problems.append(RunProblem("checkpoint", f"trained with tokenizer {got}, the run's is {fingerprint}",
                                       _rel(rd, path)))
        return
    if _fits(_bare_model(doc), tensors, rd, path, rep):
        rep.checkpoints.append(name)


def _fits(model: HFFModel, tensors: dict[str, torch.Tensor], rd: RunDir, path: Path, rep: RunReport) -> bool:
    try:
        model.load_checkpoint_state(tensors)
    except (ValueError, RuntimeError) as exc:
        rep.problems.append(RunProblem("checkpoint", f"does not fit the run's model ({damage(exc)})", _rel(rd, path)))
        return False
    return True


def _check_state(rd: RunDir, doc: RunDocument, fingerprint: str, rep: RunReport) -> None:
    path = rd.state_path("last")
    if not path.exists():
        return
    try:
        state = torch.load(path, weights_only=True)
        epoch = int(state["epoch"])
        state["optimizer"], state["torch_rng"]  # noqa: B018  (present, or the state cannot resume)
    except Exception as exc:
        rep.problems.append(RunProblem("state", f"damaged ({damage(exc)}); --resume cannot use it: start over "
                                       "with --force", _rel(rd, path)))
        return
    rep.epochs_done = epoch
    rep.finished = rep.epochs is not None and epoch >= rep.epochs
    if state.get("tokenizer_fingerprint", fingerprint) != fingerprint:
        rep.problems.append(RunProblem("state", "trained with another tokenizer", _rel(rd, path)))
    elif "model" in state:
        weights = {k: v for k, v in state["model"].items() if not k.startswith("encoder.")}
        _fits(_bare_model(doc), weights, rd, path, rep)


def _check_results(rd: RunDir, rep: RunReport) -> None:
    try:
        metrics = rd.read_metrics()
    except RunError as exc:
        rep.problems.append(RunProblem("metrics", str(exc)))
        return
    if metrics is None:
        if rep.finished:
            rep.problems.append(RunProblem("metrics", "missing, though the last checkpoint is the last epoch",
                                           "metrics.json"))
        elif rep.epochs_done:
            rep.warnings.append(f"unfinished: {rep.epochs_done} of {rep.epochs} epochs; continue with --resume")
        return
    rep.finished = True
    rep.epochs_done = max(rep.epochs_done, int(metrics.get("epochs") or 0))
    if not rd.log_path.exists():
        rep.problems.append(RunProblem("log", "missing", "log.csv"))
        return
    try:
        logged = [int(r["epoch"]) for r in rd.read_log()]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        rep.problems.append(RunProblem("log", f"damaged ({damage(exc)})", "log.csv"))
        return
    epochs = metrics.get("epochs")
    if logged != list(range(1, len(logged) + 1)) or (epochs is not None and len(logged) != epochs):
        rep.problems.append(RunProblem("log", f"epochs {logged}, but metrics.json says {epochs} epochs", "log.csv"))


def _rel(rd: RunDir, path: Path) -> str:
    return str(path.relative_to(rd.path))
