"""The recurrent and encoder-decoder models against their torch.nn builds (``to_torch_nn``: the
same model, weights and code on torch.nn's modules), and their decoding."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_within_rule

from fastseq.models import (
    LSTMClassifier,
    LSTMLanguageModel,
    LSTMLMConfig,
    LSTMTagger,
    LSTMTaggingConfig,
    Seq2Seq,
    Seq2SeqConfig,
    TransformerSeq2Seq,
    TransformerSeq2SeqConfig,
    detach_state,
)
from fastseq.models.decoding import beam_search
from fastseq.nn import to_torch_nn

pytestmark = pytest.mark.filterwarnings("ignore:.*(nested_tensor|mismatched).*:UserWarning")

SRC_VOCAB, TGT_VOCAB = 23, 17
LENGTHS = torch.tensor([9, 4, 1])


def _models(name):
    torch.manual_seed(0)
    if name == "lm":
        return LSTMLanguageModel(LSTMLMConfig(SRC_VOCAB, 16, 24, 2, dropout=0.0, proj_size=16))
    if name.startswith("tagger") or name.startswith("classifier"):
        kind, _, pooling = name.partition("-")
        config = LSTMTaggingConfig(SRC_VOCAB, 5, 12, 10, num_layers=2, pooling=pooling or "max")
        return (LSTMTagger if kind == "tagger" else LSTMClassifier)(config)
    if name.startswith("seq2seq"):
        return Seq2Seq(Seq2SeqConfig(SRC_VOCAB, TGT_VOCAB, 12, 16, encoder_layers=2,
                                     attention=name.split("-")[1]))
    return TransformerSeq2Seq(TransformerSeq2SeqConfig(SRC_VOCAB, TGT_VOCAB, 16, 4, 2, 2, 24, dropout=0.0,
                                                       max_len=32, positions=name.split("-")[1]))


def _batch():
    src = torch.randint(3, SRC_VOCAB, (3, 9))
    src[1, 4:] = src[2, 1:] = 0  # padding
    return src, torch.randint(3, TGT_VOCAB, (3, 6))


def _output(model, src, tgt):
    if isinstance(model, LSTMLanguageModel):
        return model(src)[0]
    if isinstance(model, LSTMTagger | LSTMClassifier):
        return model(src, LENGTHS)
    out = model(src, tgt, src_lengths=LENGTHS)
    return out[0] if isinstance(out, tuple) else out


NAMES = ["lm", "tagger", "classifier-max", "classifier-mean", "classifier-last", "seq2seq-luong",
         "seq2seq-bahdanau", "transformer-sinusoidal"]


@pytest.mark.parametrize("name", NAMES)
def test_output_and_gradients_match_the_torch_nn_build(name):
    ours = _models(name)
    low = to_torch_nn(ours)
    truth = to_torch_nn(ours).double()
    src, tgt = _batch()
    results = []
    for model in (truth, low, ours):
        model.zero_grad()
        out = _output(model, src, tgt)
        out.backward(torch.ones_like(out) / out.numel() + out.detach() * 0.01)
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (t_out, t_grads), (l_out, l_grads), (out, grads) = results
    assert_within_rule(out, t_out, l_out, "output")
    for param, grad in grads.items():
        assert_within_rule(grad, t_grads[param], l_grads[param], param, factor=3.0)


@pytest.mark.parametrize("name", ["tagger", "classifier-last", "seq2seq-luong", "transformer-rotary"])
def test_a_padded_batch_gives_each_sequence_its_own_result(name):
    model = _models(name).eval()
    src, tgt = _batch()
    with torch.no_grad():
        batched = _output(model, src, tgt)
        for row, length in enumerate(LENGTHS.tolist()):
            alone = model(src[row:row + 1, :length], *(() if "tagger" in name or "classifier" in name
                                                        else (tgt[row:row + 1],)))
            alone = alone[0] if isinstance(alone, tuple) else alone
            got = batched[row:row + 1, :length] if name == "tagger" else batched[row:row + 1]
            torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-4)


def test_seq2seq_attention_ignores_padding_and_sums_to_one():
    model = _models("seq2seq-bahdanau")
    src, tgt = _batch()
    _, weights = model(src, tgt, src_lengths=LENGTHS)
    assert weights.shape == (3, 6, 9)
    assert weights[1, :, 4:].abs().max() == 0 and weights[2, :, 1:].abs().max() == 0
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 6))


def test_language_model_carried_state_equals_one_long_run():
    model = _models("lm").eval()
    ids = torch.randint(0, SRC_VOCAB, (2, 12))
    with torch.no_grad():
        whole, _ = model(ids)
        first, state = model(ids[:, :5])
        second, _ = model(ids[:, 5:], detach_state(state))
    torch.testing.assert_close(torch.cat([first, second], 1), whole, atol=1e-6, rtol=1e-5)
    assert model.head.weight is model.embedding.weight


def test_language_model_greedy_generation_equals_rereading_the_prefix():
    model = _models("lm").eval()
    prompt = torch.randint(0, SRC_VOCAB, (2, 3))
    got = model.generate(prompt, 6, temperature=0.0)
    tokens = prompt
    with torch.no_grad():
        for _ in range(6):
            tokens = torch.cat([tokens, model(tokens)[0][:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(got, tokens)


def _rerun_greedy(model, src, max_len):
    """Greedy decoding that reruns the whole model over the prefix at every step (no cache)."""
    tokens = torch.full((src.shape[0], 1), model.config.bos_id)
    with torch.no_grad():
        for _ in range(max_len):
            tokens = torch.cat([tokens, _output(model, src, tokens)[:, -1].argmax(-1, keepdim=True)], 1)
    eos = model.config.eos_id
    out = tokens[:, 1:]
    ended = (out == eos).cumsum(1) > 0
    return out.masked_fill(ended, eos)


@pytest.mark.parametrize("name", ["seq2seq-luong", "seq2seq-bahdanau", "transformer-sinusoidal",
                                  "transformer-rotary"])
def test_greedy_generation_equals_rerunning_the_prefix(name):
    model = _models(name).eval()
    src, _ = _batch()
    got = model.generate(src, LENGTHS, max_len=7)
    assert torch.equal(got, _rerun_greedy(model, src, 7))


def test_transformer_greedy_generation_equals_the_torch_nn_builds():
    model = _models("transformer-sinusoidal").eval()
    src, _ = _batch()
    assert torch.equal(model.generate(src, LENGTHS, max_len=7), _rerun_greedy(to_torch_nn(model), src, 7))


def test_beam_search_finds_the_best_sequence_of_a_small_search_space():
    torch.manual_seed(0)
    vocab, eos, max_len = 4, 3, 4
    table = torch.randn(vocab, vocab).log_softmax(-1)  # next-token log-probs given the last token

    def step(last, state):
        return table[last], state

    for penalty in (0.0, 1.0):
        tokens, score = beam_search(step, lambda s, i: s, None, 1, beam_size=vocab**max_len,
                                    max_len=max_len, bos_id=0, eos_id=eos, length_penalty=penalty)
        best, best_score = None, -math.inf
        for n in range(1, max_len + 1):  # every sequence that ends with EOS
            for body in itertools.product(range(vocab), repeat=n - 1):
                sequence = (*body, eos)
                if eos in body:
                    continue
                logp = sum(table[a, b].item() for a, b in zip((0, *sequence), sequence, strict=False))
                if logp / n**penalty > best_score:
                    best, best_score = sequence, logp / n**penalty
        assert tuple(tokens[0, :len(best)].tolist()) == best
        assert score.item() == pytest.approx(best_score, abs=1e-5)


@pytest.mark.parametrize("name", ["seq2seq-luong", "transformer-rotary"])
def test_beam_search_returns_finished_hypotheses_at_least_as_likely_as_greedy(name):
    model = _models(name).eval()
    src, _ = _batch()

    def log_prob(tokens):
        tgt_in = torch.cat([torch.full((3, 1), model.config.bos_id), tokens[:, :-1]], 1)
        with torch.no_grad():
            logp = F.log_softmax(_output(model, src, tgt_in), -1).gather(-1, tokens[..., None])[..., 0]
        ended = (tokens == model.config.eos_id).cumsum(1) > 1  # after the first EOS
        return logp.masked_fill(ended, 0.0).sum(1)

    greedy = model.generate(src, LENGTHS, max_len=8)
    beam = model.generate(src, LENGTHS, max_len=8, beam_size=6, length_penalty=0.0)
    assert beam.shape[0] == 3
    finished = (greedy == model.config.eos_id).any(1)
    assert (log_prob(beam)[finished] >= log_prob(greedy)[finished] - 1e-5).all()


def test_bad_inputs_are_refused_by_name():
    lm, tagger, s2s, tr = (_models(n) for n in ("lm", "tagger", "seq2seq-luong", "transformer-rotary"))
    src, tgt = _batch()
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 23\), got 0..23"):
        lm(torch.tensor([[0, 23]]))
    with pytest.raises(ValueError, match="input_ids must be a \\(B, T\\) integer tensor"):
        lm(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 9\]"):
        tagger(src, torch.tensor([9, 10, 1]))
    with pytest.raises(ValueError, match="lengths must be a \\(3,\\) integer tensor"):
        tagger(src, torch.tensor([9, 1]))
    with pytest.raises(ValueError, match="tgt_in must lie"):
        s2s(src, tgt + TGT_VOCAB)
    with pytest.raises(ValueError, match="same batch size"):
        s2s(src, tgt[:2])
    with pytest.raises(ValueError, match="src has 40 positions, more than max_len=32"):
        tr(torch.ones(1, 40, dtype=torch.long), tgt[:1])
    with pytest.raises(ValueError, match="beam_size must be a positive int"):
        tr.generate(src, beam_size=0)
    with pytest.raises(ValueError, match="tied weights need embed_dim"):
        LSTMLMConfig(10, embed_dim=8, hidden_size=16)
    with pytest.raises(ValueError, match="attention must be one of"):
        Seq2SeqConfig(10, 10, attention="dot")
    with pytest.raises(ValueError, match="rotary"):
        to_torch_nn(tr)
