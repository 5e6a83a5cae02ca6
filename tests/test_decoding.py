"""CTC beam search (flashlight-text), KenLM n-gram LMs (lmplz) and their lexicons, for char and bpe units.

The log-probs are fabricated from known unit paths (each unit 1-2 frames, then a blank) plus Gaussian noise, so
every test knows the right answer and greedy decoding makes real errors on them.
"""

import json
import sys

import pytest
import torch

from hff_cache.evaluation.decoding import CTCDecoder, DecoderConfig
from hff_cache.evaluation.language_model import (
    KenLMMissing,
    LanguageModel,
    build_lm,
    read_lexicon,
    read_sentences,
)
from hff_cache.evaluation.metrics import error_rates
from hff_cache.model.heads import ctc_greedy_decode
from hff_cache.tasks.tokenizers import CharTokenizer, SentencePieceTokenizer, tokenizer_from_dict

SENTENCES = [
    "THE CAT SAT ON THE MAT", "THE DOG RAN TO THE PARK", "A BAT FLEW OUT OF THE CAVE", "THE RAT HID UNDER THE BED",
    "HIS HAT FELL ON THE FLOOR", "WE SAW THE SEA FROM THE HILL", "SHE CAN SEE THE BOAT", "THE MAN SAT BY THE FIRE",
    "THE BOY RAN HOME", "A BIG DOG SAT ON THE BED", "THE CAT HID UNDER THE HAT", "THE SUN SET OVER THE SEA",
]
# (sentence, its word, a lexicon word one letter away): the audio favours the wrong word, the LM the right one
AMBIGUOUS = [
    (0, "CAT", "BAT"), (1, "RAN", "RAT"), (2, "BAT", "HAT"), (3, "RAT", "MAT"), (4, "HAT", "BAT"),
    (5, "SEA", "SEE"), (6, "SEE", "SEA"), (7, "MAN", "CAN"), (8, "RAN", "MAN"), (11, "SET", "SAT"),
]
MEM = "64M"  # lmplz sort memory: the default (1G) is sized for books, not for a dozen sentences


def unit_paths(tok, texts, gen):
    paths = []
    for text in texts:
        path = []
        for i in tok.encode(text):
            path += [i] * int(torch.randint(1, 3, (1,), generator=gen)) + [0]
        paths.append(path)
    return paths


def fabricate(tok, paths, gen, noise, peak=6.0, confusions=None):
    """Log-probs peaked on each path (+ noise); ``confusions[b] = (frames, wrong id)`` moves those frames'
    peak onto the wrong unit, leaving the right one slightly behind."""
    t = max(map(len, paths))
    logits = noise * torch.randn(len(paths), t, tok.vocab_size, generator=gen)
    for b, path in enumerate(paths):
        for f, k in enumerate(path):
            logits[b, f, k] += peak
        frames, wrong = (confusions or {}).get(b, ((), None))
        for f in frames:
            logits[b, f, wrong] += peak + 1.0
    return logits.log_softmax(-1), torch.tensor([len(p) for p in paths])


def write_corpus(tmp_path):
    """The training text twice over: a plain text file and a manifest JSONL (raw case and punctuation)."""
    txt = tmp_path / "text.txt"
    txt.write_text("\n".join(SENTENCES[:6]) + "\n")
    manifest = tmp_path / "train.jsonl"
    rows = [{"id": f"u{i}", "audio": f"u{i}.wav", "text": s.capitalize() + "."} for i, s in enumerate(SENTENCES[6:])]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [txt, manifest]


@pytest.fixture(scope="module")
def char_tok():
    return CharTokenizer.from_texts(SENTENCES)


@pytest.fixture(scope="module")
def char_lm(tmp_path_factory, char_tok):
    tmp = tmp_path_factory.mktemp("lm")
    return build_lm(write_corpus(tmp), 3, tmp / "lm", tokenizer=char_tok, memory=MEM)


def wer(refs, hyps):
    return error_rates(refs, hyps)["wer"]


# ---------------------------------------------------------------- beam search vs greedy


def test_greedy_kind_is_ctc_greedy_decode(char_tok):
    gen = torch.Generator().manual_seed(1)
    lp, lens = fabricate(char_tok, unit_paths(char_tok, SENTENCES[:4], gen), gen, noise=2.0)
    hyps = CTCDecoder(DecoderConfig(), char_tok).hypotheses(lp, lens)
    assert [h.tokens for h in hyps] == ctc_greedy_decode(lp, lens)
    assert [h.text for h in hyps] == [char_tok.decode(ids) for ids in ctc_greedy_decode(lp, lens)]
    best = lp.argmax(-1)
    for h, path, n in zip(hyps, best, lens.tolist(), strict=True):
        assert [int(path[f]) for f in h.frames] == h.tokens  # each token starts where its frame says
        assert all(f < n for f in h.frames)


@pytest.mark.parametrize("log_add", [False, True])
def test_beam_one_equals_greedy(char_tok, log_add):
    gen = torch.Generator().manual_seed(2)
    lp, lens = fabricate(char_tok, unit_paths(char_tok, SENTENCES, gen), gen, noise=2.5)
    lens[3] = 7  # a short utterance inside a padded batch
    greedy = CTCDecoder(DecoderConfig(), char_tok)
    beam = CTCDecoder(DecoderConfig(kind="beam", beam_size=1, log_add=log_add), char_tok)
    assert [h.tokens for h in beam.hypotheses(lp, lens)] == ctc_greedy_decode(lp, lens)
    assert beam.decode(lp, lens) == greedy.decode(lp, lens)
    assert beam.decode(lp[:, :, :].double(), lens) == greedy.decode(lp, lens)  # any dtype in, float32 inside


def test_beam_without_lm_at_least_as_good_as_greedy(char_tok, char_lm):
    gen = torch.Generator().manual_seed(0)
    refs = SENTENCES * 3
    lp, lens = fabricate(char_tok, unit_paths(char_tok, refs, gen), gen, noise=1.5)
    greedy = wer(refs, CTCDecoder(DecoderConfig(), char_tok).decode(lp, lens))
    assert greedy > 10  # the noise makes greedy decoding wrong often enough to matter
    # lexicon-free prefix search: sums the paths of a labelling instead of taking the best path
    free = wer(refs, CTCDecoder(DecoderConfig(kind="beam", log_add=True), char_tok).decode(lp, lens))
    assert free <= greedy
    # the lexicon alone (no LM) keeps only real words: most character errors go
    lexicon = wer(refs, CTCDecoder(DecoderConfig(kind="beam", lexicon=str(char_lm.lexicon)), char_tok)
                  .decode(lp, lens))
    assert lexicon < greedy / 4


def ambiguous_batch(tok, gen):
    refs = [SENTENCES[i] for i, _, _ in AMBIGUOUS]
    paths = unit_paths(tok, refs, gen)
    confusions = {}
    for b, (i, word, wrong) in enumerate(AMBIGUOUS):
        words = SENTENCES[i].split()
        pos = [p for p, (x, y) in enumerate(zip(word, wrong, strict=True)) if x != y]
        assert len(pos) == 1 and word in words
        # the differing character's place in the sentence's unit sequence (words joined by "|")
        start = len("|".join(words[: words.index(word)])) + (1 if words.index(word) else 0)
        unit = start + pos[0]
        frames, seen = [], -1
        for f, k in enumerate(paths[b]):
            if k != 0 and (f == 0 or paths[b][f - 1] != k):
                seen += 1
            if k != 0 and seen == unit:
                frames.append(f)
        assert all(paths[b][f] == tok.encode(word[pos[0]])[0] for f in frames)
        confusions[b] = (frames, tok.encode(wrong[pos[0]])[0])
    lp, lens = fabricate(tok, paths, gen, noise=0.5, confusions=confusions)
    return refs, lp, lens


def test_lm_lowers_wer_on_ambiguous_audio(char_tok, char_lm):
    gen = torch.Generator().manual_seed(3)
    refs, lp, lens = ambiguous_batch(char_tok, gen)
    greedy = CTCDecoder(DecoderConfig(), char_tok).decode(lp, lens)
    assert all(g != r for g, r in zip(greedy, refs, strict=True))  # every utterance is misheard
    no_lm = wer(refs, CTCDecoder(DecoderConfig(kind="beam", lexicon=str(char_lm.lexicon)), char_tok)
                .decode(lp, lens))
    decoder = CTCDecoder(DecoderConfig(kind="beam", lm=str(char_lm.dir)), char_tok)
    with_lm = wer(refs, decoder.decode(lp, lens))
    assert no_lm >= 10 and with_lm < no_lm / 2
    # the same loaded LM re-weighted (what tuning does): weight 0 falls back to the lexicon-only answer
    flat = decoder.with_weights(lm_weight=0.0)
    assert flat.config.lm_weight == 0.0 and decoder.config.lm_weight == 2.0
    assert wer(refs, flat.decode(lp, lens)) == pytest.approx(no_lm)
    hyp = decoder.hypotheses(lp[:1], lens[:1])[0]
    assert hyp.words == refs[0].split() and len(hyp.word_frames) == len(hyp.words)
    assert hyp.word_frames == sorted(hyp.word_frames) and hyp.word_frames[-1] < int(lens[0])


def test_lexicon_decoding_closes_the_last_word(char_tok, char_lm):
    # targets have no separator after the last word, and audio may end right on its last unit (no blank)
    gen = torch.Generator().manual_seed(5)
    lp, lens = fabricate(char_tok, unit_paths(char_tok, SENTENCES, gen), gen, noise=0.0)
    decoder = CTCDecoder(DecoderConfig(kind="beam", lexicon=str(char_lm.lexicon)), char_tok)
    assert decoder.decode(lp, lens - 1) == SENTENCES
    hyps = decoder.hypotheses(lp, lens - 1)
    assert all(h.word_frames[-1] == n for h, n in zip(hyps, (lens - 2).tolist(), strict=True))  # last real frame


# ---------------------------------------------------------------- LM files


def test_lm_files_written_and_readable(tmp_path, char_tok):
    from flashlight.lib.text.decoder.kenlm import KenLM
    from flashlight.lib.text.dictionary import Dictionary

    sources = write_corpus(tmp_path)
    no_q = CharTokenizer.from_texts([s for s in SENTENCES if "Q" not in s])
    sentences = [s for src in sources for s in read_sentences(src)]
    assert sentences == SENTENCES  # the manifest's "Capitalised." text comes back normalised
    vocab = sorted({w for s in SENTENCES for w in s.split()} | {"QUIET"})
    (tmp_path / "extra.txt").write_text("quiet\n")
    lm = build_lm([*sources, tmp_path / "extra.txt"], 2, tmp_path / "lm", tokenizer=no_q, min_count=1, memory=MEM)
    assert LanguageModel.load(lm.dir) == lm and lm.order == 2 and lm.binary and lm.model_path.name == "lm.bin"

    arpa = lm.arpa.read_text().splitlines()
    assert arpa[0] == "\\data\\" and any(line.startswith("ngram 2=") for line in arpa)
    unigrams = arpa[arpa.index("\\1-grams:") + 1 : arpa.index("\\2-grams:") - 1]
    assert sorted(line.split("\t")[1] for line in unigrams) == sorted([*vocab, "<s>", "</s>", "<unk>"])

    lexicon = read_lexicon(lm.lexicon)
    assert sorted(lexicon) == [w for w in vocab if w != "QUIET"]  # no "Q" among this tokenizer's units
    assert lexicon["CAT"] == [["C", "A", "T", "|"]]
    info = json.loads((lm.dir / "lm.json").read_text())
    assert info["order"] == 2 and info["words"] == len(vocab) and info["lexicon_skipped"] == 1
    assert [s["sentences"] for s in info["sources"]] == [6, 6, 1] and info["tokenizer"] == no_q.fingerprint()

    words = Dictionary([*vocab, "<unk>"])
    scores = []
    for path in (lm.arpa, lm.model_path):  # the ARPA and the binary are the same model
        model = KenLM(str(path), words)
        state = model.start(False)
        _, seen = model.score(model.score(state, words.get_index("THE"))[0], words.get_index("CAT"))
        _, unseen = model.score(model.score(state, words.get_index("THE"))[0], words.get_index("FROM"))
        scores.append((seen, unseen))
    assert scores[0] == pytest.approx(scores[1]) and scores[0][0] > scores[0][1]

    rare = build_lm(sources, 3, tmp_path / "rare", min_count=2, binary=False, memory=MEM)
    assert not rare.binary and not (rare.dir / "lm.bin").exists() and rare.model_path == rare.arpa
    assert sorted(read_lexicon(rare.lexicon)) == sorted(w for w in vocab if sum(s.split().count(w)
                                                                               for s in SENTENCES) >= 2)


def test_lm_inputs_are_checked(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        build_lm([tmp_path / "missing.txt"], 3, tmp_path / "lm")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n[1, 2]\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        build_lm([bad], 3, tmp_path / "lm", memory=MEM)
    empty = tmp_path / "empty.txt"
    empty.write_text("123\n\n!!\n")
    with pytest.raises(ValueError, match="no text"):
        build_lm([empty], 3, tmp_path / "lm", memory=MEM)


def test_decoder_config_checks(tmp_path, char_tok, char_lm):
    cfg = DecoderConfig(kind="beam", beam_size=8, lm=str(char_lm.dir), lm_weight=0.7, word_score=-1.5)
    assert DecoderConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for bad in [dict(kind="viterbi"), dict(kind="beam", beam_size=0), dict(lm=str(char_lm.dir))]:
        with pytest.raises(ValueError):
            DecoderConfig(**bad)
    lone = tmp_path / "alone.arpa"
    lone.write_text(char_lm.arpa.read_text())
    with pytest.raises(ValueError, match="needs a lexicon"):
        CTCDecoder(DecoderConfig(kind="beam", lm=str(lone)), char_tok)
    with pytest.raises(FileNotFoundError):
        CTCDecoder(DecoderConfig(kind="beam", lm=str(tmp_path / "nope.bin")), char_tok)
    decoder = CTCDecoder(cfg, char_tok)
    with pytest.raises(ValueError, match="log_probs must be"):
        decoder.decode(torch.zeros(1, 5, char_tok.vocab_size + 1))


# ---------------------------------------------------------------- subword units


def test_beam_decoding_with_bpe_units(tmp_path):
    bpe = SentencePieceTokenizer.train(SENTENCES * 5, 60)
    bpe = tokenizer_from_dict(json.loads(json.dumps(bpe.to_dict())))  # as a run directory restores it
    lm = build_lm(write_corpus(tmp_path), 3, tmp_path / "lm", tokenizer=bpe, memory=MEM)
    spelled = read_lexicon(lm.lexicon)
    assert spelled["CAT"] == [bpe.spell("CAT")] and all(s[0][0].startswith("\u2581") for s in spelled.values())

    gen = torch.Generator().manual_seed(0)
    refs = SENTENCES * 3
    lp, lens = fabricate(bpe, unit_paths(bpe, refs, gen), gen, noise=1.5)
    greedy = CTCDecoder(DecoderConfig(), bpe)
    beam1 = CTCDecoder(DecoderConfig(kind="beam", beam_size=1), bpe)
    assert [h.tokens for h in beam1.hypotheses(lp, lens)] == ctc_greedy_decode(lp, lens)
    wer_greedy = wer(refs, greedy.decode(lp, lens))
    wer_lexicon = wer(refs, CTCDecoder(DecoderConfig(kind="beam", lexicon=str(lm.lexicon)), bpe).decode(lp, lens))
    wer_lm = wer(refs, CTCDecoder(DecoderConfig(kind="beam", lm=str(lm.dir)), bpe).decode(lp, lens))
    assert wer_greedy > 10 and wer_lexicon < wer_greedy / 4 and wer_lm <= wer_lexicon

    # clean audio whose units last several frames decodes exactly (repeats of a word's last piece included)
    clean, clean_lens = fabricate(bpe, unit_paths(bpe, SENTENCES, gen), gen, noise=0.0)
    assert CTCDecoder(DecoderConfig(kind="beam", lexicon=str(lm.lexicon)), bpe).decode(clean, clean_lens) == SENTENCES


def test_lexicon_in_other_units_is_respelled(char_lm):
    bpe = SentencePieceTokenizer.train(SENTENCES * 5, 60)
    with pytest.warns(UserWarning, match="respelled"):
        decoder = CTCDecoder(DecoderConfig(kind="beam", lm=str(char_lm.dir)), bpe)  # a char-units lexicon
    gen = torch.Generator().manual_seed(4)
    lp, lens = fabricate(bpe, unit_paths(bpe, SENTENCES, gen), gen, noise=1.0)
    assert wer(SENTENCES, decoder.decode(lp, lens)) < 5


# ---------------------------------------------------------------- missing dependencies


def test_missing_flashlight_is_explained(monkeypatch, char_tok):
    for name in [m for m in sys.modules if m == "flashlight" or m.startswith("flashlight.")] + ["flashlight"]:
        monkeypatch.setitem(sys.modules, name, None)  # makes `import flashlight...` raise ImportError
    with pytest.raises(ImportError, match=r"beam search needs flashlight-text: pip install 'hff-cache\[decode\]'"):
        CTCDecoder(DecoderConfig(kind="beam"), char_tok)
    lp = torch.randn(1, 6, char_tok.vocab_size).log_softmax(-1)
    assert CTCDecoder(DecoderConfig(), char_tok).decode(lp) == [char_tok.decode(ctc_greedy_decode(lp)[0])]


def test_missing_sentencepiece_is_explained(monkeypatch):
    d = SentencePieceTokenizer.train(SENTENCES * 5, 40).to_dict()
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    with pytest.raises(ImportError, match=r"sentencepiece: pip install 'hff-cache\[decode\]'"):
        SentencePieceTokenizer.train(SENTENCES, 40)
    with pytest.raises(ImportError, match="sentencepiece"):
        tokenizer_from_dict(d)


def test_missing_lmplz_is_explained(monkeypatch, tmp_path):
    # neither beside this Python (where `make kenlm` installs it) nor on PATH
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    (tmp_path / "t.txt").write_text("THE CAT\n")
    with pytest.raises(KenLMMissing, match="make kenlm"):
        build_lm([tmp_path / "t.txt"], 3, tmp_path / "lm")
