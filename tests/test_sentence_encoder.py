"""SentenceEncoder against its torch.nn build (``to_torch_nn``: ``nn.LSTM`` fed a ``PackedSequence``
where fastseq takes ``lengths=``) on ragged batches, its poolings, its contrastive loss, unknown
words, and its refusals of empty sentences and bad input."""

import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_within_rule

from fastseq.models import SentenceEncoder, SentenceEncoderConfig, Vocabulary
from fastseq.models.sentence_encoder import info_nce
from fastseq.nn import to_torch_nn

VOCAB = 29
LENGTHS = torch.tensor([9, 4, 1, 6])


def _model(pooling="max", bidirectional=True, projection_dim=8, **options):
    torch.manual_seed(0)
    return SentenceEncoder(SentenceEncoderConfig(VOCAB, 12, 10, num_layers=2, bidirectional=bidirectional,
                                                 pooling=pooling, projection_dim=projection_dim, **options))


def _ids(batch=4, length=9, seed=1):
    ids = torch.randint(2, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
    return ids.masked_fill(torch.arange(length) >= LENGTHS[:batch, None], 0) if length == 9 else ids


def _run(model, fn):
    """``fn(model)``'s output and every parameter's gradient after a backward of a fixed function of it."""
    model.zero_grad()
    out = fn(model)
    out.backward(torch.ones_like(out) / out.numel() + out.detach() * 0.01)
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


def _assert_matches_torch_nn(ours, fn):
    (t_out, t_grads), (l_out, l_grads), (out, grads) = (
        _run(m, fn) for m in (to_torch_nn(ours).double(), to_torch_nn(ours), ours))
    assert_within_rule(out, t_out, l_out, "output")
    for param, grad in grads.items():
        assert grad is not None, param
        assert_within_rule(grad, t_grads[param], l_grads[param], param, factor=3.0)


@pytest.mark.parametrize("bidirectional", [True, False], ids=["bi", "uni"])
@pytest.mark.parametrize("pooling", ["max", "mean", "last"])
def test_embeddings_and_gradients_match_the_torch_nn_build(pooling, bidirectional):
    ours = _model(pooling, bidirectional, projection_dim=8 if bidirectional else None)
    _assert_matches_torch_nn(ours, lambda m: m.encode(_ids(), LENGTHS))


def test_contrastive_loss_and_gradients_match_the_torch_nn_build():
    ours = _model("mean", temperature=0.1)
    other, other_lengths = _ids(length=5, seed=2), torch.tensor([5, 2, 3, 1])
    _assert_matches_torch_nn(ours, lambda m: m.contrastive_loss(_ids(), LENGTHS, other, other_lengths))


def test_contrastive_loss_is_symmetric_infonce_of_the_two_sides_encoded_apart():
    model = _model("max", temperature=0.2).eval()
    a_ids, b_ids, b_lengths = _ids(), _ids(length=5, seed=2), torch.tensor([5, 2, 3, 1])
    a, b = model.encode(a_ids, LENGTHS), model.encode(b_ids, b_lengths)
    logits = a @ b.t() / 0.2
    targets = torch.arange(4)
    expected = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2
    torch.testing.assert_close(model.contrastive_loss(a_ids, LENGTHS, b_ids, b_lengths), expected)
    torch.testing.assert_close(info_nce(a, b, 0.2), expected)
    # lengths=None: every word counts, on either side
    torch.testing.assert_close(model.contrastive_loss(a_ids, None, b_ids, None),
                               info_nce(model.encode(a_ids), model.encode(b_ids), 0.2))
    assert info_nce(torch.eye(4), torch.eye(4), 0.05) < 1e-7  # orthogonal pairs: nothing to learn
    assert info_nce(torch.eye(4), torch.eye(4).roll(1, 0), 0.05) > 19  # every pair the wrong way


@pytest.mark.parametrize("pooling", ["max", "mean", "last"])
def test_a_padded_batch_gives_each_sentence_its_own_embedding(pooling):
    model = _model(pooling).eval()
    ids = _ids().masked_fill(torch.arange(9) >= LENGTHS[:, None], 7)  # whatever the padding holds
    with torch.no_grad():
        batched = model.encode(ids, LENGTHS)
        for row, length in enumerate(LENGTHS.tolist()):
            torch.testing.assert_close(batched[row:row + 1], model.encode(ids[row:row + 1, :length]),
                                       atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(batched.norm(dim=-1), torch.ones(4))


@pytest.mark.parametrize("bidirectional", [True, False], ids=["bi", "uni"])
def test_last_pooling_is_the_final_hidden_state_of_each_direction(bidirectional):
    model = _model("last", bidirectional, projection_dim=None).eval()
    twin = to_torch_nn(model)
    ids = _ids()
    with torch.no_grad():
        packed = torch.nn.utils.rnn.pack_padded_sequence(twin.embedding(ids), LENGTHS, batch_first=True,
                                                         enforce_sorted=False)
        _, (h_n, _) = twin.lstm(packed)
        expected = torch.cat([h_n[-2], h_n[-1]], 1) if bidirectional else h_n[-1]
        torch.testing.assert_close(model(ids, LENGTHS), expected, atol=1e-6, rtol=1e-5)


def test_max_and_mean_pool_over_the_real_words_only():
    model = _model("mean", projection_dim=None).eval()
    ids = _ids()
    with torch.no_grad():
        out, _ = model.lstm(model.embedding(ids), lengths=LENGTHS)
        mean = torch.stack([out[b, :n].mean(0) for b, n in enumerate(LENGTHS.tolist())])
        torch.testing.assert_close(model(ids, LENGTHS), mean)
        model.config.pooling = "max"
        largest = torch.stack([out[b, :n].amax(0) for b, n in enumerate(LENGTHS.tolist())])
        torch.testing.assert_close(model(ids, LENGTHS), largest)


def test_unknown_words_read_as_unk():
    model = _model().eval()
    ids = _ids()
    unknown = ids.clone()
    unknown[0, 2], unknown[3, 0] = VOCAB, 10**6  # past the vocabulary
    known = ids.clone()
    known[0, 2] = known[3, 0] = model.config.unk_id
    torch.testing.assert_close(model.encode(unknown, LENGTHS), model.encode(known, LENGTHS))
    assert not torch.equal(model.encode(known, LENGTHS), model.encode(ids, LENGTHS))  # <unk> is a word
    strict = _model(unk_id=None)
    with pytest.raises(ValueError, match=rf"input_ids must lie in \[0, {VOCAB}\), got 0..1000000"):
        strict(unknown, LENGTHS)

    vocab = Vocabulary.build([["a", "b", "a"], ["b", "c", "a"]], min_count=2)
    assert vocab.itos == ["<pad>", "<unk>", "a", "b"] and len(vocab) == 4
    ids, lengths = vocab.encode([["a", "zebra", "b"], ["c"]])
    assert ids.tolist() == [[2, 1, 3], [1, 0, 0]] and lengths.tolist() == [3, 1]


def test_empty_sentences_are_refused_by_name():
    model = _model()
    with pytest.raises(ValueError, match=r"lengths says sentences \[1, 3\] are empty \(length 0\)"):
        model.encode(_ids(), torch.tensor([9, 0, 1, 0]))
    with pytest.raises(ValueError, match=r"input_ids hold no words \(T = 0\)"):
        model.encode(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"lengths_b says sentences \[2\] are empty"):
        model.contrastive_loss(_ids(), LENGTHS, _ids(), torch.tensor([1, 1, 0, 1]))
    with pytest.raises(ValueError, match=r"Vocabulary: sentences \[1\] are empty"):
        Vocabulary(["a"]).encode([["a"], []])


def test_bad_input_is_refused_by_name():
    model = _model()
    with pytest.raises(ValueError, match=r"input_ids must be a \(B, T\) integer tensor, got torch.float32"):
        model(_ids().float())
    with pytest.raises(ValueError, match=r"input_ids must be a \(B, T\) integer tensor, got .* \(9,\)"):
        model(_ids()[0])
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 29\), got -3..25"):
        model(_ids() - 3)
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 9\], got 1..10"):
        model(_ids(), torch.tensor([10, 4, 1, 6]))
    with pytest.raises(ValueError, match=r"lengths must be a \(4,\) integer tensor"):
        model(_ids(), LENGTHS[:3])
    with pytest.raises(ValueError, match="ids_a and ids_b must pair up, got 4 and 3 sentences"):
        model.contrastive_loss(_ids(), LENGTHS, _ids()[:3], LENGTHS[:3])
    with pytest.raises(ValueError, match="unk_id and padding_idx must differ"):
        SentenceEncoderConfig(VOCAB, unk_id=0)
    with pytest.raises(ValueError, match=r"unk_id must be an id in \[0, 29\), got 29"):
        SentenceEncoderConfig(VOCAB, unk_id=29)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        SentenceEncoderConfig(VOCAB, temperature=0.0)
    with pytest.raises(ValueError, match="pooling must be one of"):
        SentenceEncoderConfig(VOCAB, pooling="cls")
