import pytest
import torch

from hff_cache.model.augment import spec_augment
from hff_cache.model.fusion import FusionConfig, FusionNetwork, build_model_body, count_parameters
from hff_cache.model.fusions.hierarchical import group_bounds
from hff_cache.runtime.tensors import length_mask as lengths_to_mask

L, D, W = 5, 12, 16
KINDS = ["last", "single:1", "single:-2", "weighted", "hierarchical"]
# every fusion with the default conv downstream, and the lstm downstream behind two of them
CASES = [(k, "conv") for k in KINDS] + [("last", "lstm"), ("hierarchical", "lstm")]


def make(kind: str, **kw) -> FusionNetwork:
    torch.manual_seed(0)
    cfg = FusionConfig(kind=kind, groups=kw.pop("groups", 3), width=W, blocks=2, kernel=3, **kw)
    return build_model_body(cfg, L, D)


def batch(b: int = 3, t: int = 11, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # scale differs per layer, like real encoders: per-layer norm must cope
    scales = torch.logspace(-1, 2, L)[None, None, :, None]
    feats = torch.randn(b, t, L, D, generator=g) * scales
    lengths = torch.tensor([t, t - 4, 3][:b])
    return feats, lengths


@pytest.mark.parametrize("kind,downstream", CASES)
def test_shape_and_padding_zero(kind, downstream):
    model = make(kind, downstream=downstream).eval()
    feats, lengths = batch()
    out = model(feats, lengths)
    assert out.shape == (3, 11, W)
    mask = lengths_to_mask(lengths, 11)
    assert torch.all(out[~mask] == 0)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("kind,downstream", CASES)
def test_gradients_reach_every_parameter(kind, downstream):
    model = make(kind, downstream=downstream).train()
    feats, lengths = batch()
    model(feats, lengths).pow(2).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind,downstream", CASES)
def test_padding_does_not_leak(kind, downstream):
    model = make(kind, downstream=downstream).eval()
    feats, lengths = batch()
    mask = lengths_to_mask(lengths, feats.shape[1])
    other = feats.clone()
    other[~mask] = torch.randn_like(other[~mask]) * 1e4
    other[2, -1] = float("nan")  # even NaN in padding must not reach valid frames
    a, b = model(feats, lengths), model(other, lengths)
    torch.testing.assert_close(a[mask], b[mask], rtol=0, atol=1e-5)
    # an utterance alone, trimmed, equals its slice of the padded batch
    n = int(lengths[1])
    alone = model(feats[1:2, :n], lengths[1:2])
    torch.testing.assert_close(alone[0], a[1, :n], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,k", [("single:1", 1), ("single:-2", L - 2), ("last", L - 1)])
def test_single_uses_only_layer_k(kind, k):
    model = make(kind).eval()
    feats, lengths = batch()
    feats.requires_grad_(True)
    model(feats, lengths).sum().backward()
    g = feats.grad.abs().sum(dim=(0, 1, 3))
    assert g[k] > 0
    assert torch.all(g[torch.arange(L) != k] == 0)


def test_single_out_of_range():
    with pytest.raises(ValueError):
        make("single:5")
    with pytest.raises(ValueError):
        make("bogus")


@pytest.mark.parametrize("kind", KINDS)
def test_weights_sum_to_one(kind):
    info = make(kind).layer_weights()
    w = info["layer"]
    assert w.shape == (L,)
    for s, e in info["groups"]:
        torch.testing.assert_close(w[s:e].sum(), torch.tensor(1.0))


def test_weighted_uniform_and_top_init():
    w = make("weighted", top_init=0.0).layer_weights()["layer"]
    torch.testing.assert_close(w, torch.full((L,), 1 / L))
    w = make("weighted", top_init=2.0).layer_weights()["layer"]
    assert w.argmax() == L - 1 and w[-1] > 0.5


def test_hierarchical_top_of_each_group_favoured():
    info = make("hierarchical", top_init=2.0).layer_weights()
    for s, e in info["groups"]:
        if e - s > 1:
            assert info["layer"][s:e].argmax() == e - s - 1
    assert info["group_gate"] == pytest.approx(0.1)


def test_group_bounds():
    assert group_bounds(7, 4) == [(0, 2), (2, 4), (4, 6), (6, 7)]
    assert group_bounds(13, 4) == [(0, 4), (4, 7), (7, 10), (10, 13)]
    assert group_bounds(3, 4) == [(0, 1), (1, 2), (2, 3)]  # G = min(groups, L)
    assert group_bounds(1, 4) == [(0, 1)]


def test_closed_gate_starts_as_top_group_only():
    # rung_gate_init=0 and a singleton top group: the network is exactly "last layer + blocks" at init
    model = make("hierarchical", groups=3, rung_gate_init=0.0).eval()  # L=5 -> (0,2) (2,4) (4,5)
    feats, lengths = batch()
    feats.requires_grad_(True)
    model(feats, lengths).sum().backward()
    g = feats.grad.abs().sum(dim=(0, 1, 3))
    assert torch.all(g[:-1] == 0) and g[-1] > 0


def test_naive_ladder_option_has_no_gate():
    model = make("hierarchical", rung_gate_init=None)
    assert model.fusion.gate is None and model.layer_weights()["group_gate"] is None


def test_downstream_identical_across_kinds():
    counts = {k: count_parameters(make(k).downstream) for k in KINDS}
    assert len(set(counts.values())) == 1
    totals = {k: count_parameters(make(k)) for k in KINDS}
    assert totals["last"] == totals["single:1"] < totals["weighted"] < totals["hierarchical"]
    model = make("last")
    for p in model.fusion.parameters():
        p.requires_grad_(False)
    assert count_parameters(model) == counts["last"]
    assert count_parameters(model, trainable_only=False) == totals["last"]


def test_lstm_downstream_sees_the_whole_utterance():
    """A conv block sees kernel // 2 frames each side; the lstm's first frame depends on the last one."""
    feats, lengths = batch(b=1, t=11)
    for downstream, reaches in (("conv", False), ("lstm", True)):
        model = make("last", downstream=downstream).eval()
        other = feats.clone()
        other[0, -1] = torch.randn_like(other[0, -1])
        first = model(feats, lengths)[0, 0], model(other, lengths)[0, 0]
        assert (not torch.allclose(*first)) == reaches, downstream


def test_lstm_downstream_equals_a_packed_bidirectional_lstm():
    """Two one-way LSTMs over the padded batch, the backward one on each utterance reversed within its length,
    compute exactly what torch's packed bidirectional LSTM does with the same weights."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    from hff_cache.model.downstream import LSTMDownstream

    torch.manual_seed(0)
    ours = LSTMDownstream(W, blocks=2, kernel=3, dropout=0.0).eval()
    packed = torch.nn.LSTM(W, W // 2, num_layers=2, batch_first=True, bidirectional=True)
    with torch.no_grad():
        for layer in range(2):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(packed, f"{name}_l{layer}").copy_(getattr(ours.forwards[layer], f"{name}_l0"))
                getattr(packed, f"{name}_l{layer}_reverse").copy_(getattr(ours.backwards[layer], f"{name}_l0"))
    x, lengths = torch.randn(3, 11, W), torch.tensor([11, 7, 3])
    mask = lengths_to_mask(lengths, 11)
    y, _ = pad_packed_sequence(packed(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))[0],
                               batch_first=True, total_length=11)
    expected = ours.norm(x + y)
    torch.testing.assert_close(ours(x, mask)[mask], expected[mask], rtol=1e-5, atol=1e-5)


def test_unknown_downstream_and_odd_lstm_width_refused():
    with pytest.raises(ValueError, match="unknown downstream 'gru'; choose one of conv, lstm"):
        make("last", downstream="gru")
    with pytest.raises(ValueError, match="width must be even"):
        build_model_body(FusionConfig(kind="last", width=15, downstream="lstm"), L, D)


def test_accepts_half_precision_input():
    model = make("hierarchical").eval()
    feats, lengths = batch()
    out = model(feats.half(), lengths)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_spec_augment():
    feats, lengths = batch(t=40)
    feats = feats + 10.0  # no exact zeros before masking
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = spec_augment(feats, lengths, 2, 5, 2, 3, generator=g1)
    b = spec_augment(feats, lengths, 2, 5, 2, 3, generator=g2)
    assert torch.equal(a, b)  # reproducible with a generator
    assert not torch.equal(a, feats) and torch.all(feats != 0)  # input untouched
    zero = a == 0
    # the same mask for every layer
    assert torch.equal(zero, zero[:, :, :1].expand_as(zero))
    # time masks never exceed the width budget and stay inside valid frames
    full_time = zero.all(dim=3)[:, :, 0]  # (B, T)
    for i, n in enumerate(lengths.tolist()):
        assert full_time[i].sum() <= 2 * 5
        assert not full_time[i, n:].any()
    full_feat = zero.all(dim=1)[:, 0]  # (B, D)
    assert (full_feat.sum(1) <= 2 * 3).all()
    assert torch.equal(spec_augment(feats, lengths, 0, 5, 0, 3), feats)


def test_spec_augment_in_place_and_copy_draw_the_same_masks():
    """The cached path zeroes spans in place, the online path (features with a graph) masks a copy: one draw."""
    from hff_cache.model.augment import SpecAugment

    feats, lengths = batch(t=40)
    feats = feats + 10.0
    aug = SpecAugment(time_masks=2, time_width=6, feat_masks=2, feat_width=3)
    in_place = feats.clone()
    out = aug.apply(in_place, lengths, torch.Generator().manual_seed(7))
    assert out.data_ptr() == in_place.data_ptr()  # no copy of the batch
    graph = feats.clone().requires_grad_(True) * 1.0  # a non-leaf, as online features with adapters are
    copied = aug.apply(graph, lengths, torch.Generator().manual_seed(7))
    assert copied.data_ptr() != graph.data_ptr()
    assert torch.equal(out, copied.detach()) and (out == 0).any()
