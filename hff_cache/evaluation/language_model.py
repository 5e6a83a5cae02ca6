"""Word n-gram language models for CTC beam search.

``build_lm`` streams normalised sentences (plain text, one per line, or a manifest JSONL's "text") into KenLM's
``lmplz`` (modified Kneser-Ney), converts the ARPA to KenLM's binary with ``build_binary`` when it is there,
and writes the lexicon that spells every vocabulary word in a tokenizer's units. A directory holds one LM:

    lm.arpa  lm.bin  lexicon.txt  lm.json

``make kenlm`` builds the two KenLM programs into the virtual environment (they are not on PyPI as binaries).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from hff_cache.tasks.tokenizers import CharTokenizer, SentencePieceTokenizer, normalize_text

__all__ = [
    "ARPA",
    "BINARY",
    "LEXICON",
    "INFO",
    "KenLMMissing",
    "LanguageModel",
    "build_lm",
    "find_kenlm_tool",
    "read_lexicon",
    "read_sentences",
    "write_lexicon",
]

ARPA, BINARY, LEXICON, INFO = "lm.arpa", "lm.bin", "lexicon.txt", "lm.json"
_NORMAL = re.compile(r"[A-Z']+( [A-Z']+)*")  # a line that normalize_text would leave as it is


class KenLMMissing(RuntimeError):
    """lmplz (or build_binary) is not installed."""


def find_kenlm_tool(name: str) -> str | None:
    """``lmplz`` / ``build_binary``: beside this Python (``make kenlm`` puts them in the venv), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    return shutil.which(name)


def read_sentences(path: str | Path) -> Iterator[str]:
    """Normalised, non-empty sentences of a text file (one per line) or a manifest JSONL (its "text" field)."""
    path = Path(path)
    jsonl = path.suffix == ".jsonl"
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if jsonl:
                if not line.strip():
                    continue
                try:
                    line = json.loads(line).get("text") or ""
                except (json.JSONDecodeError, AttributeError) as e:
                    raise ValueError(f"{path}:{n}: not a JSON object with a 'text' field: {e}") from None
            line = line.strip()
            # the book texts are normalised already: skip the per-character pass for them (10 M words)
            text = line if _NORMAL.fullmatch(line) else normalize_text(line)
            if text:
                yield text


@dataclass(frozen=True)
class LanguageModel:
    """An LM directory written by ``build_lm``."""

    dir: Path
    order: int
    words: int  # vocabulary size (lexicon entries before spelling)
    binary: bool

    @property
    def arpa(self) -> Path:
        return self.dir / ARPA

    @property
    def model_path(self) -> Path:
        """What the decoder loads: the binary when there is one (loads much faster), else the ARPA."""
        return self.dir / BINARY if self.binary else self.arpa

    @property
    def lexicon(self) -> Path:
        return self.dir / LEXICON

    @classmethod
    def load(cls, directory: str | Path) -> LanguageModel:
        directory = Path(directory)
        try:
            info = json.loads((directory / INFO).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{directory} is not an LM directory (no {INFO}); build one with "
                                    "`hff-cache lm build`") from None
        return cls(directory, int(info["order"]), int(info["words"]), bool(info.get("binary")))


def _default_tokenizer() -> CharTokenizer:
    # the LibriSpeech alphabet: what the book texts and normalised transcripts are written in
    return CharTokenizer.from_texts(["ABCDEFGHIJKLMNOPQRSTUVWXYZ '"])


def write_lexicon(
    words: Iterable[str], tokenizer: CharTokenizer | SentencePieceTokenizer, path: str | Path
) -> tuple[int, list[str]]:
    """One line per word, ``WORD<TAB>unit unit ...`` in the tokenizer's units (``tokenizer.spell``).

    Words with a unit the tokenizer lacks are left out (no model output could spell them); returns the count
    written and the words left out.
    """
    written, skipped = 0, []
    index = tokenizer._index
    with Path(path).open("w", encoding="utf-8") as f:
        for word in words:
            units = tokenizer.spell(word)
            if not units or any(u not in index or index[u] == 0 for u in units):
                skipped.append(word)
                continue
            f.write(f"{word}\t{' '.join(units)}\n")
            written += 1
    return written, skipped


def read_lexicon(path: str | Path) -> dict[str, list[list[str]]]:
    """{word: [spelling, ...]} from a lexicon file (whitespace-separated: the word, then its units)."""
    out: dict[str, list[list[str]]] = {}
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 2:
                out.setdefault(fields[0], []).append(fields[1:])
    return out


def _feed(sources: Sequence[Path], sink: IO[str]) -> tuple[Counter[str], list[dict[str, Any]]]:
    """Write every sentence to ``sink`` and count the words per source."""
    counts: Counter[str] = Counter()
    stats = []
    for src in sources:
        n_sent = n_words = 0
        for sentence in read_sentences(src):
            sink.write(sentence + "\n")
            words = sentence.split()
            counts.update(words)
            n_sent += 1
            n_words += len(words)
        stats.append({"path": str(src), "sentences": n_sent, "words": n_words})
    return counts, stats


def _run_lmplz(lmplz: str, args: list[str], sources: Sequence[Path], tmp: Path) -> tuple[Counter, list[dict]]:
    # stderr goes to a file: lmplz's progress output could fill a pipe while we are still writing stdin
    with (tmp / "lmplz.log").open("w+") as log:
        proc = subprocess.Popen([lmplz, *args], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log,
                                text=True, encoding="utf-8")
        assert proc.stdin is not None
        try:
            counts, stats = _feed(sources, proc.stdin)
        except BrokenPipeError:
            counts, stats = Counter(), []
        finally:
            try:
                proc.stdin.close()
            except BrokenPipeError:
                pass
        rc = proc.wait()
        log.seek(0)
        tail = log.read()[-2000:]
    if rc != 0:
        raise RuntimeError(f"lmplz failed (exit {rc}): {' '.join(args)}\n{tail}")
    return counts, stats


def build_lm(
    texts: Sequence[str | Path],
    order: int,
    out_dir: str | Path,
    tokenizer: CharTokenizer | SentencePieceTokenizer | None = None,
    min_count: int = 1,
    prune: Sequence[int] | None = None,
    binary: bool = True,
    memory: str = "1G",
) -> LanguageModel:
    """Estimate an ``order``-gram word LM on ``texts`` (text files / manifest JSONL) into ``out_dir``.

    ``tokenizer`` (default: characters A-Z and apostrophe) spells the lexicon; words seen fewer than
    ``min_count`` times stay in the LM but not in the lexicon. ``prune`` is lmplz's ``--prune`` (count
    thresholds per order, e.g. ``[0, 0, 1]``); ``memory`` is its sort memory (``-S``).
    """
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    sources = [Path(t) for t in texts]
    if not sources:
        raise ValueError("build_lm needs at least one text file")
    for src in sources:
        if not src.is_file():
            raise FileNotFoundError(f"LM text {src} does not exist")
    lmplz = find_kenlm_tool("lmplz")
    if lmplz is None:
        raise KenLMMissing("building an n-gram LM needs KenLM's lmplz: run `make kenlm` (it compiles lmplz and "
                           "build_binary into .venv/bin from the kenlm source package)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer if tokenizer is not None else _default_tokenizer()
    with tempfile.TemporaryDirectory(prefix="hff-lm-", dir=out) as tmp:
        args = ["-o", str(order), "-S", memory, "-T", f"{tmp}/", "--arpa", str(out / ARPA),
                # tiny corpora (the training transcripts) cannot estimate every Kneser-Ney discount
                "--discount_fallback"]
        if prune:
            args += ["--prune", *(str(int(p)) for p in prune)]
        counts, stats = _run_lmplz(lmplz, args, sources, Path(tmp))
    if not counts:
        raise ValueError(f"no text in {', '.join(map(str, sources))}")
    has_binary = binary and _build_binary(out)
    if not has_binary:
        (out / BINARY).unlink(missing_ok=True)  # a stale binary of an earlier build must not be loaded
    vocab = sorted(w for w, c in counts.items() if c >= min_count)
    written, skipped = write_lexicon(vocab, tokenizer, out / LEXICON)
    info = {"order": order, "words": len(counts), "lexicon_words": written, "lexicon_skipped": len(skipped),
            "min_count": min_count, "prune": list(prune or []), "sentences": sum(s["sentences"] for s in stats),
            "tokens": sum(s["words"] for s in stats), "sources": stats, "binary": has_binary,
            "tool": "kenlm lmplz (modified Kneser-Ney)", "units": tokenizer.kind,
            "tokenizer": tokenizer.fingerprint()}
    (out / INFO).write_text(json.dumps(info, indent=2) + "\n")
    return LanguageModel(out, order, len(counts), has_binary)


def _build_binary(out: Path) -> bool:
    """lm.arpa -> lm.bin; False (the ARPA alone still works) when build_binary is not installed."""
    tool = find_kenlm_tool("build_binary")
    if tool is None:
        return False
    proc = subprocess.run([tool, str(out / ARPA), str(out / BINARY)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"build_binary failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return True
