"""The run document: what a run is made of, as ``config.json`` records it.

``RunDocument`` is the typed form of ``RUN/config.json``: the resolved ``TrainConfig``, the ``ModelSpec``, the
task with its tokenizer, the caches it read (cached mode) or the encoder and audio it ran (online mode), the
versions and the number of processes. Its JSON keeps the layout runs have always had (``"config"`` holds the
``TrainConfig`` dict, so ``train --config RUN/config.json`` replays it) and old documents still read. Only
``hff_cache.runs`` reads and writes the file; the training modes build the document, the loop hands it over.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from hff_cache.cache.format import is_url
from hff_cache.config import REDACTED, TrainConfig, to_dict
from hff_cache.model.hff import ModelSpec
from hff_cache.tasks.task import Task

__all__ = ["REDACTED", "CacheRecord", "EncoderRecord", "RunDocument", "RunError", "TaskRecord", "check_cache",
           "redact", "storage_options_for"]


class RunError(ValueError):
    """The run directory, its document or checkpoints, or a cache does not fit the requested run."""


# Storage options whose key holds one of these words are credentials: config.json is shared with results.
_SECRET_WORDS = ("secret", "key", "token", "password", "credential")


def redact(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with every credential replaced by ``<redacted>`` (nested dicts too, e.g. client_kwargs)."""
    out: dict[str, Any] = {}
    for k, v in options.items():
        if any(w in str(k).lower() for w in _SECRET_WORDS):
            out[k] = REDACTED
        else:
            out[k] = redact(v) if isinstance(v, dict) else v
    return out


def storage_options_for(url: str, cfg: TrainConfig) -> dict[str, Any] | None:
    """The run's fsspec options for a URL cache; none for local paths (the reader refuses them there)."""
    return dict(cfg.storage_options) if is_url(url) and cfg.storage_options else None


@dataclass
class TaskRecord:
    """The task and the tokenizer its labels fixed; the fingerprint ties checkpoints to the tokenizer."""

    name: str
    tokenizer: dict[str, Any]
    fingerprint: str

    @classmethod
    def of(cls, task: Task) -> TaskRecord:
        return cls(task.name, task.tokenizer.to_dict(), task.tokenizer.fingerprint())

    def build(self) -> Task:
        from hff_cache.tasks.tokenizers import tokenizer_from_dict

        return Task(self.name, tokenizer_from_dict(self.tokenizer))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "tokenizer": self.tokenizer, "fingerprint": self.fingerprint}


@dataclass
class CacheRecord:
    """One cache a cached run read: where, which (``cache_id``), its metadata and how many utterances."""

    url: str
    cache_id: str
    meta: dict[str, Any]
    utterances: int

    @classmethod
    def of(cls, reader: Any, utterances: int) -> CacheRecord:
        return cls(str(reader.url), reader.cache_id, reader.meta.to_dict(), int(utterances))

    def to_json(self) -> dict[str, Any]:
        return {"url": self.url, "cache_id": self.cache_id, "meta": self.meta, "utterances": self.utterances}


@dataclass
class EncoderRecord:
    """The encoder an online run trained with: name, identity (file hash), method and parameter counts."""

    name: str
    info: dict[str, Any]
    method: str
    bottleneck: int | None = None
    grad_checkpointing: bool = False
    eval_mode: bool = True
    counts: dict[str, int] = field(default_factory=dict)  # encoder_params, adapter_params, trainable_...

    def to_json(self) -> dict[str, Any]:
        # the counts sit beside the other keys, as config.json has always had them
        return {"name": self.name, "info": self.info, "method": self.method, "bottleneck": self.bottleneck,
                "grad_checkpointing": self.grad_checkpointing, "eval_mode": self.eval_mode, **self.counts}

    @classmethod
    def of(cls, cfg: TrainConfig, encoder: Any) -> EncoderRecord:
        """The record of ``encoder`` (its method set up) as run by ``cfg``: online and partial-caching runs."""
        from hff_cache.model.adapters import METHODS, encoder_parameter_counts

        return cls(name=cfg.model, info=encoder.info.to_dict(), method=cfg.method,
                   bottleneck=cfg.bottleneck if METHODS[cfg.method].uses_adapters else None,
                   grad_checkpointing=cfg.grad_checkpointing, eval_mode=True,
                   counts=encoder_parameter_counts(encoder))

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> EncoderRecord:
        named = {f.name for f in fields(cls)} - {"counts"}
        counts = {k: int(v) for k, v in d.items() if k not in named}
        return cls(**{k: d[k] for k in named if k in d}, counts=counts)


@dataclass
class RunDocument:
    """``RUN/config.json``, typed. ``mode`` is ``cached`` (``caches`` set) or ``online`` (``encoder``, ``data``)."""

    mode: str
    config: TrainConfig
    model: ModelSpec
    task: TaskRecord
    caches: dict[str, CacheRecord] = field(default_factory=dict)
    encoder: EncoderRecord | None = None
    data: dict[str, Any] | None = None  # online: {split: {source, utterances, fingerprint, seconds}}
    environment: dict[str, Any] = field(default_factory=dict)
    world_size: int | None = None  # processes of the job that wrote it (absent in older runs)
    extra: dict[str, Any] = field(default_factory=dict)  # keys of a newer version, kept when rewritten

    def config_dict(self) -> dict[str, Any]:
        """The ``TrainConfig`` as stored: every field, credentials redacted (cached and online runs alike)."""
        d = to_dict(self.config)
        d["storage_options"] = redact(d.get("storage_options") or {})
        return d

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"mode": self.mode, "config": self.config_dict(), "model": self.model.to_dict(),
                               "task": self.task.to_json()}
        if self.encoder is not None:
            doc["encoder"] = self.encoder.to_json()
        if self.data is not None:
            doc["data"] = self.data
        doc["caches"] = {split: c.to_json() for split, c in self.caches.items()}
        doc["environment"] = self.environment
        if self.world_size is not None:
            doc["world_size"] = self.world_size
        return {**self.extra, **doc}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RunDocument:
        """Inverse of ``to_json``; reads every layout written so far (raises KeyError/TypeError/ValueError)."""
        known = {f.name for f in fields(cls)}
        # a config written by an older version may lack fields (their defaults apply) or hold removed ones
        config = {k: v for k, v in d["config"].items() if k in TrainConfig.__dataclass_fields__}
        enc = d.get("encoder")
        return cls(mode=d.get("mode", "cached"), config=TrainConfig.from_dict(config),
                   model=ModelSpec.from_dict(d["model"]), task=_pick(TaskRecord, d["task"]),
                   caches={s: _pick(CacheRecord, c) for s, c in (d.get("caches") or {}).items()},
                   encoder=EncoderRecord.from_json(enc) if enc else None, data=d.get("data"),
                   environment=d.get("environment") or {}, world_size=d.get("world_size"),
                   extra={k: v for k, v in d.items() if k not in known})

    @property
    def method(self) -> str | None:
        """The online method (hff-adapters, bitfit, ...); None for a cached run."""
        return self.encoder.method if self.encoder is not None else None

    def encoder_identity(self) -> tuple[str, dict[str, Any]]:
        """(encoder name, EncoderInfo dict) the run's features came from: its own encoder, or its cache's."""
        if self.encoder is not None:
            return self.encoder.name, self.encoder.info
        train = self.caches.get("train")
        if train is None or "encoder" not in train.meta:
            raise RunError("the run's config.json names no encoder (no cache metadata)")
        info = train.meta["encoder"]
        return info["name"], info


def _pick(cls: Any, d: dict[str, Any]) -> Any:
    """``cls`` from the keys it knows (a KeyError names one it needs); keys of newer versions are ignored."""
    return cls(**{f.name: d[f.name] for f in fields(cls)})


def check_cache(reader: Any, expected: CacheRecord, what: str) -> None:
    """Refuse a cache whose encoder/layers/codec differ from ``expected``, saying what differs."""
    if reader.cache_id == expected.cache_id:
        return
    from hff_cache.cache import CacheMeta, check_compatible

    diffs = check_compatible(reader.meta, CacheMeta.from_dict(expected.meta))
    detail = "; ".join(d.replace("requested", "the run's cache has") for d in diffs) or "cache ids differ"
    raise RunError(f"{what} ({reader.cache_id}) does not match the run's cache {expected.url} "
                   f"({expected.cache_id}): {detail}")
