import json
import math
import pickle

import pytest
import torch

from hff_cache.model.fusion import FusionConfig, build_model_body
from hff_cache.model.heads import ClassifierHead, CTCHead, ctc_greedy_decode, masked_mean
from hff_cache.tasks.tokenizers import (
    CharTokenizer,
    LabelEncoder,
    PhoneTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    normalize_text,
    parse_units,
    text_tokenizer,
    tokenizer_from_dict,
)

# ---------------------------------------------------------------- CTC


def test_greedy_decode_hand_made():
    # frames: a a _ a b b _ _ b | padding (ignored)
    path = [1, 1, 0, 1, 2, 2, 0, 0, 2, 3, 3]
    lp = torch.full((1, len(path), 4), -10.0)
    for t, k in enumerate(path):
        lp[0, t, k] = 0.0
    assert ctc_greedy_decode(lp, torch.tensor([9])) == [[1, 1, 2, 2]]
    assert ctc_greedy_decode(lp) == [[1, 1, 2, 2, 3]]
    two = torch.cat([lp, lp.flip(1)])
    assert CTCHead(4, 4).greedy_decode(two, torch.tensor([3, 0])) == [[1], []]


def test_ctc_loss_matches_reference_and_handles_impossible():
    torch.manual_seed(0)
    head = CTCHead(8, 5)
    lp = head(torch.randn(2, 6, 8))
    assert lp.shape == (2, 6, 5)
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(2, 6))
    targets = torch.tensor([[1, 2, 0], [3, 3, 4]])
    lengths, tl = torch.tensor([6, 6]), torch.tensor([2, 3])
    loss = head.loss(lp, lengths, targets, tl)
    per = torch.nn.functional.ctc_loss(lp.transpose(0, 1), targets, lengths, tl, reduction="none")
    torch.testing.assert_close(loss, (per / tl).mean())
    # target longer than the input: zeroed, not inf
    bad = head.loss(lp, torch.tensor([2, 6]), targets, tl)
    assert torch.isfinite(bad)


def test_tiny_model_overfits_ctc():
    torch.manual_seed(0)
    n_layers, hidden, vocab = 3, 16, 6
    cfg = FusionConfig(kind="hierarchical", groups=2, width=32, blocks=1, kernel=3, dropout=0.0)
    body = build_model_body(cfg, n_layers, hidden)
    head = CTCHead(32, vocab)
    feats = torch.randn(2, 24, n_layers, hidden)
    lengths = torch.tensor([24, 18])
    targets = torch.tensor([[1, 2, 2, 3, 5], [4, 1, 4, 0, 0]])  # repeats need a blank in between
    tl = torch.tensor([5, 3])
    params = [*body.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=3e-3)
    for _ in range(200):  # decodes exactly after ~100 steps on every seed tried
        opt.zero_grad()
        loss = head.loss(head(body(feats, lengths)), lengths, targets, tl)
        loss.backward()
        opt.step()
    body.eval()
    decoded = head.greedy_decode(head(body(feats, lengths)), lengths)
    assert decoded == [[1, 2, 2, 3, 5], [4, 1, 4]]


# ---------------------------------------------------------------- classifier


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_classifier_pooling_ignores_padding(pooling):
    torch.manual_seed(0)
    head = ClassifierHead(8, 3, pooling=pooling).eval()
    x = torch.randn(2, 7, 8)
    lengths = torch.tensor([7, 4])
    y = x.clone()
    y[1, 4:] = 1e6
    y[1, -1] = float("nan")
    torch.testing.assert_close(head(x, lengths), head(y, lengths))
    torch.testing.assert_close(head(x[1:2, :4]), head(x, lengths)[1:2])
    logits = head(x, lengths)
    assert logits.shape == (2, 3)
    assert head.predict(logits).shape == (2,)
    assert torch.isfinite(head.loss(logits, torch.tensor([0, 2])))


def test_masked_mean_values():
    x = torch.arange(12.0).view(1, 4, 3).repeat(2, 1, 1)
    out = masked_mean(x, torch.tensor([4, 2]))
    torch.testing.assert_close(out[0], x[0].mean(0))
    torch.testing.assert_close(out[1], x[1, :2].mean(0))
    assert torch.all(masked_mean(x, torch.tensor([0, 1]))[0] == 0)  # empty -> zeros, not NaN


def test_classifier_learns():
    torch.manual_seed(0)
    head = ClassifierHead(4, 2, pooling="attention")
    x = torch.randn(8, 5, 4)
    labels = (x[:, :, 0].mean(1) > 0).long()
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        head.loss(head(x), labels).backward()
        opt.step()
    assert torch.equal(head.predict(head(x)), labels)


# ---------------------------------------------------------------- tokenizers


def roundtrip(tok):
    d = json.loads(json.dumps(tok.to_dict()))  # must survive JSON (checkpoint metadata)
    back = tokenizer_from_dict(d)
    assert type(back) is type(tok) and back == tok
    assert back.fingerprint() == tok.fingerprint()
    return back


def test_normalize_text():
    assert normalize_text("  Hello,   world!\tIt’s well-known 42 ") == "HELLO WORLD IT'S WELL KNOWN"


def test_char_tokenizer():
    tok = CharTokenizer.from_texts(["hello world", "it's"])
    assert isinstance(tok, Tokenizer)
    assert tok.symbols[0] == "<blank>" and tok.blank_id == 0
    assert tok.symbols[1:] == sorted(tok.symbols[1:]) and "|" in tok.symbols
    ids = tok.encode("Hello,  World")
    assert 0 not in ids and tok.decode(ids) == "HELLO WORLD"
    assert tok.decode(tok.encode("hez world")) == "HE WORLD"  # unknown 'Z' dropped
    assert tok.decode([0, *tok.encode("it's"), 0, 999]) == "IT'S"  # blanks and bad ids skipped
    back = roundtrip(tok)
    assert back.encode("its low") == tok.encode("its low")
    assert tok.vocab_size == len(set("HELOWRDIT'S|")) + 1


def test_phone_tokenizer():
    seqs = ["HH AH0 L OW1", ["W", "ER1", "L", "D", "AH1"]]
    tok = PhoneTokenizer.from_sequences(seqs)
    assert tok.decode(tok.encode("HH AH0 L OW1")) == "HH AH0 L OW1"
    assert tok.encode("HH XX OW1") == tok.encode("HH OW1")
    plain = PhoneTokenizer.from_sequences(seqs, strip_stress=True)
    assert "AH0" not in plain.symbols and "AH" in plain.symbols
    assert plain.decode(plain.encode("HH AH0 L OW2")) == "HH AH L OW"
    assert plain.vocab_size < tok.vocab_size
    assert roundtrip(plain).strip_stress
    assert roundtrip(tok).fingerprint() != plain.fingerprint()


def test_label_encoder():
    enc = LabelEncoder.from_labels(["yes", "no", "yes", "up"])
    assert enc.labels == ["no", "up", "yes"] and enc.num_classes == 3
    assert [enc.decode(enc.encode(x)) for x in ["up", "no"]] == ["up", "no"]
    with pytest.raises(ValueError):
        enc.encode("down")
    roundtrip(enc)


def test_fingerprint_changes_with_vocab():
    a = CharTokenizer.from_texts(["abc"])
    b = CharTokenizer.from_texts(["abd"])
    c = CharTokenizer.from_texts(["cab"])
    assert a.fingerprint() == c.fingerprint() and len(a.fingerprint()) == 16
    assert a.fingerprint() != b.fingerprint()
    assert LabelEncoder(["a", "b"]).fingerprint() != LabelEncoder(["b", "a"]).fingerprint()
    # a char and a phone tokenizer with identical symbols are still distinguishable
    assert PhoneTokenizer(["A", "B", "C"]).fingerprint() != a.fingerprint()
    with pytest.raises(ValueError):
        tokenizer_from_dict({"type": "bpe", "symbols": []})


def test_vocab_size_matches_head():
    tok = CharTokenizer.from_texts(["ab"])
    head = CTCHead(4, tok.vocab_size)
    with torch.no_grad():
        lp = head(torch.zeros(1, 3, 4))
    assert lp.shape[-1] == tok.vocab_size and math.isclose(float(lp.exp().sum(-1)[0, 0]), 1.0, rel_tol=1e-5)


# ---------------------------------------------------------------- subword units (sentencepiece)

BPE_TEXT = [
    "The cat sat on the mat.", "THE DOG RAN TO THE PARK", "a bat flew out of the cave", "The rat hid under the bed",
    "His hat fell on the floor", "We saw the sea from the hill", "She can't see the boat", "The man sat by the fire",
]


def test_sentencepiece_round_trip_and_units():
    tok = SentencePieceTokenizer.train(BPE_TEXT * 4, 50)
    assert isinstance(tok, Tokenizer) and tok.vocab_size == 50 and tok.symbols[0] == "<blank>"
    for text in BPE_TEXT:
        ids = tok.encode(text)
        assert ids and all(0 < i < 50 for i in ids)
        assert tok.decode(ids) == normalize_text(text)
    # subwords: fewer units than characters, word starts marked with "▁"
    assert len(tok.encode("THE CAT SAT")) < len("THE CAT SAT")
    pieces = tok.spell("CAT")
    assert pieces[0].startswith("\u2581") and "".join(pieces).lstrip("\u2581") == "CAT"
    assert tok.decode([0, *tok.encode("the mat"), 0, 999]) == "THE MAT"  # blanks and bad ids skipped
    # a character never seen in training cannot be encoded: it is dropped, like CharTokenizer drops it
    assert tok.decode(tok.encode("the zoo")) == "THE OO"


def test_sentencepiece_serialisation():
    tok = SentencePieceTokenizer.train(BPE_TEXT * 4, 40)
    back = roundtrip(tok)
    assert back.encode("the cat hid") == tok.encode("the cat hid") and back.symbols == tok.symbols
    assert pickle.loads(pickle.dumps(tok)) == tok  # data-loader workers receive it pickled
    assert len(tok.fingerprint()) == 16
    # the fingerprint covers the model: another piece inventory, another fingerprint
    assert SentencePieceTokenizer.train(BPE_TEXT * 4, 45).fingerprint() != tok.fingerprint()
    d = tok.to_dict()
    with pytest.raises(ValueError, match="pieces"):
        tokenizer_from_dict({**d, "vocab_size": 41})
    with pytest.raises(ValueError, match="sentencepiece"):
        tokenizer_from_dict({**d, "model": "bm90IGEgbW9kZWw="})  # valid base64, not a model


def test_sentencepiece_errors_and_units_spec():
    with pytest.raises(ValueError, match="bpe:5000"):
        SentencePieceTokenizer.train(BPE_TEXT, 5000)  # far more pieces than the text has
    with pytest.raises(ValueError, match="no text"):
        SentencePieceTokenizer.train(["123", "!!"], 20)
    assert parse_units("char") == ("char", None) and parse_units("bpe:300") == ("bpe", 300)
    for bad in ["bpe", "bpe:x", "bpe:1", "word", "char:3"]:
        with pytest.raises(ValueError, match="units"):
            parse_units(bad)
    assert isinstance(text_tokenizer("char", BPE_TEXT), CharTokenizer)
    bpe = text_tokenizer("bpe:40", BPE_TEXT * 4)
    assert isinstance(bpe, SentencePieceTokenizer) and bpe.vocab_size == 40
