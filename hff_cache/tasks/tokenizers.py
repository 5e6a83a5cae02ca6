"""Serialisable tokenizers for CTC targets (characters, phones) and a label encoder for classification.

Every tokenizer round-trips through ``to_dict`` / ``tokenizer_from_dict`` so a checkpoint can store it,
and ``fingerprint()`` hashes the vocabulary + options so loading a checkpoint with a different
vocabulary is detected rather than silently decoding garbage.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "Tokenizer",
    "CharTokenizer",
    "PhoneTokenizer",
    "LabelEncoder",
    "normalize_text",
    "tokenizer_from_dict",
]

BLANK = "<blank>"
SPACE = "|"  # word delimiter token, as in wav2vec2 CTC vocabularies
_FORMAT = 1


@runtime_checkable
class Tokenizer(Protocol):
    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: Any) -> Any: ...

    def decode(self, ids: Any) -> Any: ...

    def to_dict(self) -> dict: ...

    def fingerprint(self) -> str: ...


def _fingerprint(d: dict) -> str:
    # canonical JSON -> sha256, first 16 hex chars: stable across runs, processes and platforms
    blob = json.dumps(d, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "`": "'"})


def normalize_text(text: str) -> str:
    """Upper-case, keep letters / apostrophe / space, collapse whitespace.

    Hyphens become spaces ("well-known" -> "WELL KNOWN"); other characters (digits, punctuation) are
    dropped. Curly apostrophes are folded to "'".
    """
    text = text.translate(_APOSTROPHES).upper().replace("-", " ")
    kept = "".join(c if (c.isalpha() or c == "'") else (" " if c.isspace() else "") for c in text)
    return " ".join(kept.split())


class _SymbolVocab:
    """Shared machinery: id 0 = blank, then the sorted symbols."""

    kind = ""
    blank_id = 0

    def __init__(self, symbols: Sequence[str]) -> None:
        if len(set(symbols)) != len(symbols) or BLANK in symbols:
            raise ValueError("symbols must be unique and must not contain the blank")
        self.symbols: list[str] = [BLANK, *symbols]
        self._index = {s: i for i, s in enumerate(self.symbols)}

    @property
    def vocab_size(self) -> int:
        return len(self.symbols)

    def _ids(self, symbols: Iterable[str]) -> list[int]:
        # unknown symbols are dropped: a CTC target cannot contain them anyway
        return [self._index[s] for s in symbols if s in self._index and s != BLANK]

    def _symbols(self, ids: Iterable[int]) -> list[str]:
        n = len(self.symbols)
        return [self.symbols[i] for i in (int(i) for i in ids) if 0 < i < n]

    def fingerprint(self) -> str:
        return _fingerprint(self.to_dict())

    def to_dict(self) -> dict:  # pragma: no cover - overridden
        raise NotImplementedError

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _SymbolVocab) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, fingerprint={self.fingerprint()})"


class CharTokenizer(_SymbolVocab):
    kind = "char"

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> CharTokenizer:
        chars: set[str] = set()
        for t in texts:
            chars.update(normalize_text(t).replace(" ", SPACE))
        return cls(sorted(chars))

    def encode(self, text: str) -> list[int]:
        return self._ids(normalize_text(text).replace(" ", SPACE))

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join("".join(self._symbols(ids)).replace(SPACE, " ").split())

    def to_dict(self) -> dict:
        return {"type": self.kind, "format": _FORMAT, "symbols": self.symbols[1:]}


_STRESS = re.compile(r"\d+$")


class PhoneTokenizer(_SymbolVocab):
    """Whitespace-separated phone symbols (e.g. ARPAbet "HH AH0 L OW1"); case is kept as given."""

    kind = "phone"

    def __init__(self, symbols: Sequence[str], strip_stress: bool = False) -> None:
        super().__init__(symbols)
        self.strip_stress = strip_stress

    def _split(self, seq: str | Sequence[str]) -> list[str]:
        toks = seq.split() if isinstance(seq, str) else list(seq)
        if self.strip_stress:
            toks = [_STRESS.sub("", t) or t for t in toks]  # a pure-digit symbol stays itself
        return toks

    @classmethod
    def from_sequences(
        cls, seqs: Iterable[str | Sequence[str]], strip_stress: bool = False
    ) -> PhoneTokenizer:
        splitter = cls([], strip_stress)
        symbols: set[str] = set()
        for s in seqs:
            symbols.update(splitter._split(s))
        return cls(sorted(symbols), strip_stress)

    def encode(self, text: str | Sequence[str]) -> list[int]:
        return self._ids(self._split(text))

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(self._symbols(ids))

    def to_dict(self) -> dict:
        d = {"type": self.kind, "format": _FORMAT, "symbols": self.symbols[1:]}
        return {**d, "strip_stress": self.strip_stress}


class LabelEncoder:
    """Sorted unique labels <-> 0..C-1 (no blank). Labels are handled as strings."""

    kind = "label"

    def __init__(self, labels: Sequence[str]) -> None:
        labels = [str(x) for x in labels]
        if len(set(labels)) != len(labels):
            raise ValueError("labels must be unique")
        self.labels: list[str] = labels
        self._index = {s: i for i, s in enumerate(labels)}

    @classmethod
    def from_labels(cls, labels: Iterable[Any]) -> LabelEncoder:
        return cls(sorted({str(x) for x in labels}))

    @property
    def vocab_size(self) -> int:
        return len(self.labels)

    num_classes = vocab_size

    def encode(self, label: Any) -> int:
        try:
            return self._index[str(label)]
        except KeyError:
            raise ValueError(f"unknown label {label!r}") from None

    def decode(self, idx: int) -> str:
        return self.labels[int(idx)]

    def to_dict(self) -> dict:
        return {"type": self.kind, "format": _FORMAT, "labels": self.labels}

    def fingerprint(self) -> str:
        return _fingerprint(self.to_dict())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelEncoder) and self.labels == other.labels

    def __repr__(self) -> str:
        return f"LabelEncoder(num_classes={self.vocab_size}, fingerprint={self.fingerprint()})"


def tokenizer_from_dict(d: dict) -> CharTokenizer | PhoneTokenizer | LabelEncoder:
    if d.get("format", _FORMAT) != _FORMAT:
        raise ValueError(f"unsupported tokenizer format {d.get('format')!r}")
    kind = d.get("type")
    if kind == "char":
        return CharTokenizer(d["symbols"])
    if kind == "phone":
        return PhoneTokenizer(d["symbols"], bool(d.get("strip_stress", False)))
    if kind == "label":
        return LabelEncoder(d["labels"])
    raise ValueError(f"unknown tokenizer type {kind!r}")
