"""CTC decoding of the head's log-probs: greedy best path, or flashlight-text's beam search (the decoder behind
torchaudio's ``ctc_decoder``) with an optional lexicon and KenLM word n-gram LM.

    decoder = CTCDecoder(DecoderConfig(kind="beam", lm="lm_dir"), tokenizer)
    texts = decoder.decode(log_probs, lengths)          # one string per utterance

Units: characters (the word separator "|" is the decoder's silence token and ends every lexicon spelling),
sentencepiece subwords (words start at a "▁" piece; the blank stands in for silence), or any other symbol
tokenizer without a lexicon.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hff_cache.evaluation.language_model import LEXICON, LanguageModel, read_lexicon
from hff_cache.model.heads import ctc_greedy_decode
from hff_cache.tasks.tokenizers import DECODE_EXTRA, CharTokenizer, PhoneTokenizer, SentencePieceTokenizer

TextTokenizer = CharTokenizer | SentencePieceTokenizer | PhoneTokenizer

__all__ = ["CTCDecoder", "DecoderConfig", "Hypothesis"]

_UNK = "<unk>"
_KINDS = ("greedy", "beam")


@dataclass(frozen=True)
class DecoderConfig:
    """How to turn (B, T, V) log-probs into text. ``lm`` is an LM directory (``build_lm``) or a KenLM file;
    ``lexicon`` defaults to the LM's ``lexicon.txt``. A word LM needs a lexicon; a lexicon works without LM."""

    kind: str = "greedy"  # greedy | beam
    beam_size: int = 50
    beam_threshold: float = 50.0  # drop hypotheses this far (log) below the best
    beam_size_token: int | None = None  # tokens tried per frame; None: all
    lm: str | None = None
    lexicon: str | None = None
    lm_weight: float = 2.0
    word_score: float = 0.0
    sil_score: float = 0.0
    log_add: bool = False  # merge equal hypotheses by log-sum-exp (prefix search) instead of max

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"decoder kind must be one of {_KINDS}, got {self.kind!r}")
        if self.beam_size < 1 or (self.beam_size_token is not None and self.beam_size_token < 1):
            raise ValueError("beam_size and beam_size_token must be >= 1")
        if self.kind == "greedy" and (self.lm or self.lexicon):
            raise ValueError("an LM or lexicon needs kind='beam'")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DecoderConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class Hypothesis:
    """The best decoding of one utterance."""

    text: str
    tokens: list[int]  # unit ids: repeats collapsed, blanks dropped (what greedy returns)
    frames: list[int]  # frame where each of ``tokens`` starts
    words: list[str] = field(default_factory=list)  # lexicon words (beam search with a lexicon only)
    word_frames: list[int] = field(default_factory=list)  # frame where each word's spelling ends
    score: float = math.nan  # decoder score (acoustic + weighted LM + word scores); nan for greedy


def _flashlight() -> tuple[Any, Any]:
    try:
        from flashlight.lib.text import decoder as fl_decoder
        from flashlight.lib.text import dictionary as fl_dictionary
    except ImportError as e:
        raise ImportError(f"beam search needs flashlight-text: {DECODE_EXTRA}") from e
    return fl_decoder, fl_dictionary


def _collapse(path: list[int], blank: int) -> tuple[list[int], list[int]]:
    """CTC collapse of a frame path: ids of the kept tokens and their first frames."""
    ids, frames = [], []
    prev = None
    for t, k in enumerate(path):
        if k != prev and k != blank:
            ids.append(k)
            frames.append(t)
        prev = k
    return ids, frames


def _resolve_lm(config: DecoderConfig) -> tuple[str | None, str | None]:
    """(KenLM file, lexicon file): an LM directory gives both; a lexicon.txt beside an LM file is used."""
    lm, lexicon = config.lm, config.lexicon
    if lm is not None and Path(lm).is_dir():
        info = LanguageModel.load(lm)
        lm, lexicon = str(info.model_path), lexicon or str(info.lexicon)
    elif lm is not None:
        if not Path(lm).is_file():
            raise FileNotFoundError(f"language model {lm} does not exist")
        beside = Path(lm).parent / LEXICON
        lexicon = lexicon or (str(beside) if beside.is_file() else None)
    if lm is not None and lexicon is None:
        raise ValueError(f"the word LM {lm} needs a lexicon (none given and no {LEXICON} beside it)")
    if lexicon is not None and not Path(lexicon).is_file():
        raise FileNotFoundError(f"lexicon {lexicon} does not exist")
    return lm, lexicon


class CTCDecoder:
    """Greedy or beam-search CTC decoding for one tokenizer (its ids are the head's outputs, blank = 0)."""

    def __init__(self, config: DecoderConfig, tokenizer: TextTokenizer) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.blank = 0
        self._decoder: Any = None
        self._lexicon = False
        self._sil = self.blank
        if config.kind == "beam":
            self._build()

    # ------------------------------------------------------------------ building

    def _build(self) -> None:
        fl, fl_dictionary = _flashlight()
        index: dict[str, int] = self.tokenizer._index
        sep = getattr(self.tokenizer, "word_separator", None)
        self._sil = index[sep] if sep is not None and sep in index else self.blank
        lm_path, lexicon_path = _resolve_lm(self.config)
        self._lm = fl.ZeroLM()
        self._trie = None
        self._words: list[str] = []
        if lexicon_path is not None:
            self._lexicon = True
            self._load_lexicon(fl, fl_dictionary, lexicon_path, lm_path)
        self._decoder = self._make_decoder(fl)

    def _load_lexicon(self, fl: Any, fl_dictionary: Any, lexicon_path: str, lm_path: str | None) -> None:
        index: dict[str, int] = self.tokenizer._index
        spellings = self._spellings(read_lexicon(lexicon_path), index, lexicon_path)
        self._words = [*spellings, _UNK]
        word_dict = fl_dictionary.Dictionary(self._words)
        word_dict.set_default_index(len(self._words) - 1)
        self._unk = len(self._words) - 1
        if lm_path is not None:
            try:
                from flashlight.lib.text.decoder.kenlm import KenLM
            except ImportError as e:  # a source build of flashlight-text without KenLM
                raise ImportError(f"this flashlight-text has no KenLM support; reinstall it: {DECODE_EXTRA}") from e
            self._lm = KenLM(lm_path, word_dict)
        # as torchaudio does: each spelling's trie node carries the word's unigram LM score, smeared
        # towards the root so that partial words are ranked by their best completion
        self._trie = fl.Trie(self.tokenizer.vocab_size, self._sil)
        start = self._lm.start(False)
        for w, spells in enumerate(spellings.values()):
            _, score = self._lm.score(start, w)
            for units in spells:
                ids = [index[u] for u in units]
                self._trie.insert(ids, w, score)
                if self._sil == self.blank:
                    # no separator token (subwords): flashlight ends a word on its last unit, so a repeat of that
                    # unit in the next frames could only be read as silence (blank). A second spelling that ends
                    # on the blank after the last unit keeps repeats inside the word; the first one still lets the
                    # next word follow without a blank in between.
                    self._trie.insert([*ids, self.blank], w, score)
        self._trie.smear(fl.SmearingMode.MAX)

    def _spellings(self, lexicon: dict[str, list[list[str]]], index: dict, path: str) -> dict[str, list[list[str]]]:
        """The lexicon's spellings whose units are all the tokenizer's, plus the tokenizer's own spelling (how
        its targets segment the word, so what the model learnt to emit); a lexicon written for other units
        still gives its words. Words nothing can spell are left out."""
        spell = getattr(self.tokenizer, "spell", None)

        def valid(units: list[str]) -> bool:
            return bool(units) and all(index.get(u, 0) > 0 for u in units)

        out: dict[str, list[list[str]]] = {}
        respelled = 0
        for word, spells in lexicon.items():
            ok = [s for s in spells if valid(s)]
            own = spell(word) if spell is not None else []
            if valid(own) and own not in ok:
                respelled += not ok
                ok.append(own)
            if ok:
                out[word] = ok
        if not out:
            raise ValueError(f"lexicon {path}: none of its {len(lexicon)} words can be spelled in the "
                             f"{getattr(self.tokenizer, 'kind', '?')} units of this model")
        if respelled:
            warnings.warn(f"lexicon {path}: {respelled} words spelled in other units were respelled with the "
                          "model's tokenizer", stacklevel=3)
        return out

    def _make_decoder(self, fl: Any) -> Any:
        c, vocab = self.config, self.tokenizer.vocab_size
        token_beam = min(c.beam_size_token or vocab, vocab)
        if self._trie is not None:
            opts = fl.LexiconDecoderOptions(
                beam_size=c.beam_size, beam_size_token=token_beam, beam_threshold=c.beam_threshold,
                lm_weight=c.lm_weight, word_score=c.word_score, unk_score=-math.inf, sil_score=c.sil_score,
                log_add=c.log_add, criterion_type=fl.CriterionType.CTC)
            return fl.LexiconDecoder(opts, self._trie, self._lm, self._sil, self.blank, self._unk, [], False)
        opts = fl.LexiconFreeDecoderOptions(
            beam_size=c.beam_size, beam_size_token=token_beam, beam_threshold=c.beam_threshold,
            lm_weight=c.lm_weight, sil_score=c.sil_score, log_add=c.log_add, criterion_type=fl.CriterionType.CTC)
        return fl.LexiconFreeDecoder(opts, self._lm, self._sil, self.blank, [])

    def with_weights(self, lm_weight: float | None = None, word_score: float | None = None) -> CTCDecoder:
        """The same decoder with other LM weight / word score, sharing the loaded LM and lexicon (for tuning)."""
        changes = {k: v for k, v in (("lm_weight", lm_weight), ("word_score", word_score)) if v is not None}
        other = object.__new__(CTCDecoder)
        other.__dict__.update(self.__dict__)
        other.config = dataclasses.replace(self.config, **changes)
        if self._decoder is not None:
            other._decoder = other._make_decoder(_flashlight()[0])
        return other

    # ------------------------------------------------------------------ decoding

    def decode(self, log_probs: torch.Tensor, lengths: torch.Tensor | None = None) -> list[str]:
        """(B, T, V) log-probs (+ valid frames per utterance) -> one text per utterance."""
        return [h.text for h in self.hypotheses(log_probs, lengths)]

    def hypotheses(self, log_probs: torch.Tensor, lengths: torch.Tensor | None = None) -> list[Hypothesis]:
        """The best hypothesis per utterance, with unit ids, their frames and (with a lexicon) the words."""
        if log_probs.ndim != 3 or log_probs.shape[-1] != self.tokenizer.vocab_size:
            raise ValueError(f"log_probs must be (B, T, {self.tokenizer.vocab_size}) for this tokenizer, "
                             f"got {tuple(log_probs.shape)}")
        b, t, _ = log_probs.shape
        lens = [t] * b if lengths is None else [min(int(n), t) for n in lengths.cpu().tolist()]
        if self._decoder is None:
            out = []
            for ids, n, lp in zip(ctc_greedy_decode(log_probs, lengths, self.blank), lens, log_probs, strict=True):
                path = lp[:n].argmax(-1).tolist()
                out.append(Hypothesis(self.tokenizer.decode(ids), ids, _collapse(path, self.blank)[1]))
            return out
        lp = log_probs.detach().to("cpu", torch.float32)
        return [self._beam_one(lp[i, : lens[i]]) for i in range(b)]

    def _beam_one(self, emissions: torch.Tensor) -> Hypothesis:
        n, vocab = emissions.shape
        if self._lexicon:
            # targets carry no separator after the last word, but a lexicon spelling ends with one (the
            # separator, or the blank for subwords): one extra frame that is certainly that token lets the
            # decoder close the utterance's last word
            end = torch.full((1, vocab), -1e4)
            end[0, self._sil] = 0.0
            emissions = torch.cat([emissions, end])
        emissions = emissions.contiguous()
        results = self._decoder.decode(emissions.data_ptr(), emissions.shape[0], vocab)
        if not results:
            return Hypothesis("", [], [])
        best = results[0]
        path = list(best.tokens)[1 : n + 1]  # [start state, one label per frame, end state]
        ids, frames = _collapse(path, self.blank)
        if not self._lexicon:
            return Hypothesis(self.tokenizer.decode(ids), ids, frames, score=best.score)
        word_ids = list(best.words)[1 : n + 2]
        words = [(t, self._words[w]) for t, w in enumerate(word_ids) if w >= 0]
        return Hypothesis(" ".join(w for _, w in words), ids, frames, [w for _, w in words],
                          [min(t, n - 1) for t, _ in words], best.score)


def resolve_decoder(given: dict[str, Any], tuned: dict[str, Any] | None) -> DecoderConfig:
    """The decoder a command uses: the options typed on its command line over the run's tuned settings
    (``tune-decoder``) over greedy. ``kind`` ``auto`` (the CLI's default) is the tuned decoder when the run has
    one, else greedy; ``greedy`` ignores the tuned settings."""
    settings = {**(tuned or {}), **given}
    kind = settings.pop("kind", "auto")
    if kind == "auto":
        kind = tuned.get("kind", "greedy") if tuned else ("beam" if settings.get("lm") else "greedy")
    if kind == "greedy":
        return DecoderConfig()
    return DecoderConfig.from_dict({**settings, "kind": kind})
