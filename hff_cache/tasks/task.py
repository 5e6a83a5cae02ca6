"""Tasks on one cache: which utterances are labelled, their targets, and the label helpers.

Labels live outside the cache, keyed by utterance id, so one extraction serves many tasks:

* ``asr``: characters (CTC) from the cache's texts (or a labels file's ``text`` field);
* ``phones``: phones (CTC) from a labels file's ``phones`` field (``hff-cache labels phones`` writes one
  from Montreal Forced Aligner TextGrids);
* ``classify:FIELD``: one class per utterance from the cache's metas (e.g. ``speaker``) or the labels
  file's ``FIELD`` (or ``label``) field.

Coverage problems are reported, never silently absorbed: label ids missing from the cache and cache ids
without labels are counted with the first few ids (a warning; training uses the intersection), and a
cache with no labelled utterance at all is an error.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hff_cache.tasks.tokenizers import (
    CharTokenizer,
    LabelEncoder,
    PhoneTokenizer,
    SentencePieceTokenizer,
    normalize_text,
    text_tokenizer,
)

__all__ = [
    "TASKS",
    "LabelError",
    "LabelWarning",
    "Task",
    "TaskData",
    "check_task_name",
    "label_field",
    "load_labels",
    "task_choices",
    "write_jsonl",
]

# The registry: task name -> the labels field its targets come from. ``classify`` is written ``classify:FIELD``
# and reads FIELD (or ``label``). A new task is one entry here plus its tokenizer in ``Task.from_labels``.
TASKS: dict[str, str | None] = {"asr": "text", "phones": "phones", "classify": None}
_SHOW = 5  # ids listed in a coverage message


class LabelError(ValueError):
    """Labels and cache do not fit together (no overlap, unknown classes, missing field)."""


class LabelWarning(UserWarning):
    """Partial coverage: some ids are dropped or some symbols are unknown."""


def task_choices() -> str:
    return " | ".join(f"{name}:FIELD" if TASKS[name] is None else name for name in TASKS)


def check_task_name(name: str) -> str:
    """``name`` stripped, or a ValueError listing the registry's task names."""
    task = str(name).strip()
    base, sep, arg = task.partition(":")
    if base in TASKS and (bool(arg.strip()) if TASKS[base] is None else not sep):
        return task
    raise ValueError(f"unknown task {name!r}; the task must be one of {task_choices()}")


def label_field(name: str) -> str:
    """The labels field a task's targets come from (``classify:FIELD`` -> FIELD)."""
    base, _, arg = name.partition(":")
    return TASKS.get(base) or arg


def _some(ids: Sequence[str]) -> str:
    more = f", ... (+{len(ids) - _SHOW})" if len(ids) > _SHOW else ""
    return ", ".join(repr(i) for i in ids[:_SHOW]) + more


# --- label files -----------------------------------------------------------------------------------------


def load_labels(path: str | Path) -> dict[str, dict[str, Any]]:
    """JSONL ``{"id": ..., <fields>}`` -> {id: fields}. Duplicate ids are an error."""
    out: dict[str, dict[str, Any]] = {}
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LabelError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or "id" not in row:
                raise LabelError(f"{path}:{lineno}: each line must be a JSON object with an 'id'")
            uid = str(row.pop("id"))
            if uid in out:
                raise LabelError(f"{path}:{lineno}: duplicate id {uid!r}")
            out[uid] = row
    return out


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n








# --- tasks -----------------------------------------------------------------------------------------------


@dataclass
class TaskData:
    """The labelled utterances of one cache for a task, in cache order."""

    indices: list[int]  # global utterance indices in the cache
    ids: list[str]
    targets: list[Any]  # CTC: list[int] per utterance; classify: int
    refs: list[str]  # reference strings: normalised text, phone string, or class label
    unlabelled: list[str] = field(default_factory=list)  # cache ids without a usable label

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Task:
    """A task name plus its tokenizer (fixed by the training labels)."""

    name: str  # asr | phones | classify:FIELD
    tokenizer: CharTokenizer | SentencePieceTokenizer | PhoneTokenizer | LabelEncoder

    @property
    def kind(self) -> str:
        return "classify" if self.name.startswith("classify:") else "ctc"

    @property
    def field(self) -> str:
        return label_field(self.name)

    @property
    def metric(self) -> str:
        """The headline metric (lower is better except accuracy)."""
        return {"asr": "wer", "phones": "per"}.get(self.name, "accuracy")

    @classmethod
    def from_labels(cls, name: str, reader: Any, labels: dict[str, dict] | None = None, units: str = "char") -> Task:
        """Build the tokenizer from the training cache's labels; ``units`` (char | bpe:N) is ASR's."""
        check_task_name(name)
        raw, _ = raw_labels(name, reader, labels)
        if not raw:
            raise _no_labels(name, reader, labels, "train")
        values = list(raw.values())
        if name == "asr":
            tok: Any = text_tokenizer(units, [normalize_text(v) for v in values])
        elif name == "phones":
            tok = PhoneTokenizer.from_sequences(values)
        else:
            tok = LabelEncoder.from_labels(values)
        return cls(name, tok)

    def prepare(self, reader: Any, labels: dict[str, dict] | None = None, split: str = "train") -> TaskData:
        """Targets for every labelled utterance of ``reader`` (warns about partial coverage)."""
        raw, unlabelled = raw_labels(self.name, reader, labels)
        if not raw:
            raise _no_labels(self.name, reader, labels, split)
        indices, ids, targets, refs = [], [], [], []
        unknown: dict[str, list[str]] = {}
        for uid, value in raw.items():
            if self.kind == "classify":
                if value not in self.tokenizer._index:  # type: ignore[union-attr]
                    unknown.setdefault(value, []).append(uid)
                    continue
                target: Any = self.tokenizer.encode(value)
                ref = value
            else:
                target = self.tokenizer.encode(value)
                ref = normalize_text(value) if self.name == "asr" else " ".join(value.split())
                missing = _unknown_symbols(self.tokenizer, ref)
                for sym in missing:
                    unknown.setdefault(sym, []).append(uid)
                if not target:
                    unlabelled.append(uid)
                    continue
            indices.append(reader.index_of(uid))
            ids.append(uid)
            targets.append(target)
            refs.append(ref)
        if unknown and self.kind == "classify":
            desc = "; ".join(f"{k!r} ({len(v)} utt, e.g. {v[0]})" for k, v in sorted(unknown.items()))
            raise LabelError(f"{split} cache {reader.url}: classes not seen in training: {desc}. A classifier "
                             "can only predict training classes: split utterances so every class is in "
                             "both sets.")
        if unknown:
            desc = ", ".join(f"{k!r} x{len(v)}" for k, v in sorted(unknown.items())[:10])
            warnings.warn(f"{split} cache {reader.url}: {len(unknown)} symbol(s) not in the training "
                          f"vocabulary ({desc}); they cannot be predicted and count as errors",
                          LabelWarning, stacklevel=2)
        if unlabelled:
            outside = sum(uid not in labels for uid in unlabelled) if labels is not None else 0
            why = f" ({outside} have no row in the labels file, which is the split)" if outside else ""
            warnings.warn(f"{split} cache {reader.url}: {len(unlabelled)} of {len(reader.ids)} utterances have "
                          f"no usable '{self.field}' label{why} and are left out: {_some(unlabelled)}",
                          LabelWarning, stacklevel=2)
        order = sorted(range(len(indices)), key=indices.__getitem__)
        return TaskData([indices[i] for i in order], [ids[i] for i in order], [targets[i] for i in order],
                        [refs[i] for i in order], unlabelled)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "tokenizer": self.tokenizer.to_dict()}


def _no_labels(name: str, reader: Any, labels: dict | None, split: str) -> LabelError:
    field_name = Task(name, None).field  # type: ignore[arg-type]
    src = "the labels file" if labels is not None else "the cache"
    return LabelError(f"{split} cache {reader.url}: none of its {len(reader.ids)} utterances has a "
                      f"'{field_name}' label in {src} (task {name}); first cache ids: {_some(reader.ids)}")


def _unknown_symbols(tok: Any, ref: str) -> set[str]:
    if isinstance(tok, CharTokenizer):
        symbols = set(ref.replace(" ", "|"))
    else:
        symbols = set(tok._split(ref))
    return {s for s in symbols if s not in tok._index}


def raw_labels(name: str, reader: Any, labels: dict[str, dict] | None) -> tuple[dict[str, str], list[str]]:
    """{cache id: raw label string} for the task, plus cache ids without one (in cache order).

    A labels file is the split: cache ids it has no row for are left out (a subset of a cache, a speaker-id
    split over one cache). Within a row, a missing field falls back to the cache's own text or metadata."""
    field_name = label_field(name)
    out: dict[str, str] = {}
    missing: list[str] = []
    for i, uid in enumerate(reader.ids):
        value: Any = None
        if labels is not None and uid not in labels:
            missing.append(uid)
            continue
        if labels is not None:
            row = labels[uid]
            value = row.get(field_name, row.get("label") if name.startswith("classify:") else None)
        if value is None and name == "asr":
            value = reader.texts[i] or None
        elif value is None and name.startswith("classify:"):
            value = reader.metas[i].get(field_name)
        if value is None or (isinstance(value, str) and not value.strip()):
            missing.append(uid)
        else:
            out[uid] = str(value)
    if name == "phones" and labels is None:
        raise LabelError("task 'phones' needs --labels (JSONL with 'phones'); make one with "
                         "`hff-cache labels phones --alignments DIR --out FILE`")
    return out, missing


def report_label_ids(labels: dict[str, dict], readers: Sequence[Any]) -> list[str]:
    """Label ids present in none of the caches (warned about; they are ignored)."""
    known: set[str] = set()
    for r in readers:
        known.update(r.ids)
    extra = [uid for uid in labels if uid not in known]
    if extra:
        names = " or ".join(str(r.url) for r in readers)
        warnings.warn(f"{len(extra)} of {len(labels)} label ids are not in {names} and are ignored: "
                      f"{_some(extra)}", LabelWarning, stacklevel=2)
    return extra
