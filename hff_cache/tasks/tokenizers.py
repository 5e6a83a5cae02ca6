"""Serialisable tokenizers for CTC targets (characters, sentencepiece subwords, phones) and a label encoder for
classification.

Every tokenizer round-trips through ``to_dict`` / ``tokenizer_from_dict`` so a checkpoint can store it,
and ``fingerprint()`` hashes the vocabulary + options so loading a checkpoint with a different
vocabulary is detected rather than silently decoding garbage.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "Tokenizer",
    "CharTokenizer",
    "PhoneTokenizer",
    "SentencePieceTokenizer",
    "LabelEncoder",
    "normalize_text",
    "parse_units",
    "text_tokenizer",
    "tokenizer_from_dict",
]

BLANK = "<blank>"
SPACE = "|"  # word delimiter token, as in wav2vec2 CTC vocabularies
WORD_START = "\u2581"  # sentencepiece's "▁": a piece that begins with it begins a word
DECODE_EXTRA = "pip install 'hff-cache[decode]'"
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
    word_separator: str | None = None  # a token that only separates words (the beam decoder's silence)

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
    # the word separator doubles as the beam decoder's silence token: it sits between words in every target
    word_separator: str | None = SPACE

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

    def spell(self, word: str) -> list[str]:
        """A word's units for a lexicon: its characters, then the separator that ends it."""
        return [*word, SPACE]

    def to_dict(self) -> dict:
        return {"type": self.kind, "format": _FORMAT, "symbols": self.symbols[1:]}


def _sentencepiece() -> Any:
    try:
        import sentencepiece
    except ImportError as e:
        raise ImportError(f"subword units need sentencepiece: {DECODE_EXTRA}") from e
    return sentencepiece


class SentencePieceTokenizer(_SymbolVocab):
    """Subword units (``bpe:N``) from a sentencepiece BPE model trained on the (normalised) training text.

    Ids are sentencepiece's own: its ``<unk>`` slot, id 0, doubles as the CTC blank, so ``bpe:N`` has exactly
    N outputs. Unknown characters encode to id 0 and are dropped, as CharTokenizer drops them. The serialised
    model travels inside ``to_dict`` (base64), so a run directory restores the exact segmentation.
    """

    kind = "bpe"
    word_separator: str | None = None  # word starts are marked inside the pieces ("▁"), not by a token

    def __init__(self, model_proto: bytes) -> None:
        spm = _sentencepiece()
        self.model_proto = bytes(model_proto)
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"not a sentencepiece model: {e}") from e
        if self._sp.unk_id() != 0 or self._sp.bos_id() >= 0 or self._sp.eos_id() >= 0 or self._sp.pad_id() >= 0:
            raise ValueError("the sentencepiece model must have <unk> at id 0 and no bos/eos/pad pieces "
                             "(train it with SentencePieceTokenizer.train)")
        super().__init__([self._sp.id_to_piece(i) for i in range(1, self._sp.get_piece_size())])

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, max_sentences: int = 2_000_000) -> SentencePieceTokenizer:
        """BPE with ``vocab_size`` pieces (blank included) on the normalised ``texts``."""
        spm = _sentencepiece()
        if vocab_size < 2:
            raise ValueError(f"bpe vocab_size must be >= 2, got {vocab_size}")
        sentences = [t for t in (normalize_text(x) for x in texts) if t]
        if not sentences:
            raise ValueError("no text to train the sentencepiece model on")
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size, model_type="bpe",
                character_coverage=1.0, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
                # the text is normalised already; NFKC would only make decode disagree with the references
                normalization_rule_name="identity", input_sentence_size=max_sentences,
                shuffle_input_sentence=True, num_threads=1, minloglevel=2)
        except RuntimeError as e:  # e.g. "Vocabulary size too high": too little text for N pieces
            raise ValueError(f"could not train a bpe:{vocab_size} model on {len(sentences)} sentences: {e}") from e
        return cls(model.getvalue())

    def _split(self, text: str | Sequence[str]) -> list[str]:
        text = text if isinstance(text, str) else " ".join(text)
        return self._sp.encode(normalize_text(text), out_type=str)

    def encode(self, text: str) -> list[int]:
        return [i for i in self._sp.encode(normalize_text(text), out_type=int) if i != 0]

    def decode(self, ids: Iterable[int]) -> str:
        n = self.vocab_size
        return " ".join(self._sp.decode([i for i in (int(i) for i in ids) if 0 < i < n]).split())

    def spell(self, word: str) -> list[str]:
        """A word's pieces as the model segments it inside a sentence (the first begins with "▁")."""
        return self._sp.encode(word, out_type=str)

    def to_dict(self) -> dict:
        return {"type": self.kind, "format": _FORMAT, "vocab_size": self.vocab_size,
                "model": base64.b64encode(self.model_proto).decode("ascii")}


def parse_units(units: str) -> tuple[str, int | None]:
    """``"char"`` -> ("char", None); ``"bpe:500"`` -> ("bpe", 500)."""
    kind, _, size = units.strip().partition(":")
    if kind == "char" and not size:
        return "char", None
    if kind == "bpe" and size.isdigit() and int(size) >= 2:
        return "bpe", int(size)
    raise ValueError(f"units must be 'char' or 'bpe:N' (N >= 2 pieces), got {units!r}")


def text_tokenizer(units: str, texts: Iterable[str]) -> CharTokenizer | SentencePieceTokenizer:
    """The ASR tokenizer for ``units`` (char | bpe:N), built from the training transcripts."""
    kind, size = parse_units(units)
    if kind == "char":
        return CharTokenizer.from_texts(texts)
    assert size is not None
    return SentencePieceTokenizer.train(texts, size)


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


def tokenizer_from_dict(d: dict) -> CharTokenizer | SentencePieceTokenizer | PhoneTokenizer | LabelEncoder:
    if d.get("format", _FORMAT) != _FORMAT:
        raise ValueError(f"unsupported tokenizer format {d.get('format')!r}")
    kind = d.get("type")
    if kind == "char":
        return CharTokenizer(d["symbols"])
    if kind == "bpe":
        if not isinstance(d.get("model"), str):
            raise ValueError("bpe tokenizer: no serialised sentencepiece 'model' in the tokenizer dict")
        tok = SentencePieceTokenizer(base64.b64decode(d["model"], validate=True))
        if "vocab_size" in d and tok.vocab_size != int(d["vocab_size"]):
            raise ValueError(f"bpe tokenizer: the stored model has {tok.vocab_size} pieces, not {d['vocab_size']}")
        return tok
    if kind == "phone":
        return PhoneTokenizer(d["symbols"], bool(d.get("strip_stress", False)))
    if kind == "label":
        return LabelEncoder(d["labels"])
    raise ValueError(f"unknown tokenizer type {kind!r}")
