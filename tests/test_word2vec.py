"""fastseq.models.Word2Vec and its sampler: the loss against the eager model, training moves the
vectors, the queries, the examples the sampler draws, bad input."""

import pytest
import torch

import fastseq
from fastseq.models import Word2Vec, Word2VecConfig, Word2VecSampler


def _model(**options):
    torch.manual_seed(0)
    model = Word2Vec(Word2VecConfig(30, 8, **options))
    with torch.no_grad():
        model.out_embed.weight.normal_(0, 0.3)  # word2vec starts it at zero: make the test see it
    return model


@pytest.mark.parametrize("mode, words", [("skipgram", 1), ("cbow", 4)])
def test_loss_and_sparse_gradients_equal_the_eager_model(mode, words):
    model = _model(mode=mode, window=2)
    inputs, targets = torch.randint(0, 30, (9, words)), torch.randint(0, 30, (9, 6))
    loss = model(inputs, targets)
    loss.backward()
    grads = [p.grad.to_dense() for p in model.parameters()]
    model.zero_grad()
    with fastseq.use_backend("reference"):  # the same model in eager PyTorch
        eager = model(inputs, targets)
    eager.backward()
    torch.testing.assert_close(loss, eager)
    for grad, p in zip(grads, model.parameters(), strict=True):
        assert p.grad.layout == torch.sparse_coo
        torch.testing.assert_close(grad, p.grad.to_dense())


def test_training_lowers_the_loss_and_brings_words_of_shared_contexts_together():
    corpus = torch.tensor([0, 1, 2, 3] * 200 + [4, 5, 6, 7] * 200)
    config = Word2VecConfig(8, 16, window=1, negatives=3, subsample=0)
    model, sampler = Word2Vec(config), Word2VecSampler(torch.bincount(corpus, minlength=8), config)
    optimizer = torch.optim.SparseAdam(list(model.parameters()), lr=0.05)
    generator = torch.Generator().manual_seed(0)
    first = None
    for _ in range(20):
        inputs, targets = sampler.examples(corpus, generator)
        loss = model(inputs, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        first = first or loss.item()
    assert loss.item() < 0.7 * first
    # Words 1 and 3 share their contexts (0 and 2), words 1 and 5 share none.
    vectors = model.vectors()
    assert vectors[1] @ vectors[3] > vectors[1] @ vectors[5] + 0.3


def test_skipgram_examples_stay_within_the_window():
    config = Word2VecConfig(100, 4, window=3, negatives=2, subsample=0)
    sampler = Word2VecSampler(torch.ones(100), config)
    corpus = torch.arange(100)
    inputs, targets = sampler.examples(corpus, torch.Generator().manual_seed(0))
    assert inputs.shape[1] == 1 and targets.shape == (len(inputs), 3)
    distance = (inputs[:, 0] - targets[:, 0]).abs()
    assert distance.min() >= 1 and distance.max() <= 3
    assert (distance == 1).sum() > (distance == 3).sum()  # the window is drawn per word, as word2vec


def test_cbow_examples_are_full_windows_around_the_centre():
    config = Word2VecConfig(50, 4, mode="cbow", window=2, negatives=1, subsample=0)
    inputs, targets = Word2VecSampler(torch.ones(50), config).examples(torch.arange(50))
    assert inputs.shape == (46, 4)
    assert torch.equal(inputs, torch.stack([targets[:, 0] + o for o in (-2, -1, 1, 2)], dim=1))


def test_subsampling_drops_frequent_words_and_noise_follows_the_three_quarter_power():
    counts = torch.tensor([10000, 1, 1, 1])
    config = Word2VecConfig(4, 4, window=1, negatives=50, subsample=1e-3)
    sampler = Word2VecSampler(counts, config)
    assert sampler.keep[0] < 0.5 and sampler.keep[1:].eq(1).all()
    torch.testing.assert_close(sampler.noise, counts.double().pow(0.75) / counts.double().pow(0.75).sum())


def test_queries_and_bad_input():
    model = _model()
    ids, cosines = model.most_similar(3, k=5)
    assert 3 not in ids.tolist() and cosines.shape == (5,) and (cosines[:-1] >= cosines[1:]).all()
    best, _ = model.analogy(1, 2, 3, k=2)
    assert not {1, 2, 3} & set(best.tolist())
    for call, message in [
        (lambda: model.most_similar(30), r"query must be word ids in \[0, 30\)"),
        (lambda: model.most_similar(torch.zeros(5)), r"query must be a word id or a \(8,\) vector"),
        (lambda: model.most_similar(1, k=0), r"k must be an int in \[1, 29\]"),
        (lambda: model.analogy(1, 2, -1), r"a, b, c must be word ids"),
        (lambda: model(torch.zeros(2, 1, dtype=torch.long), torch.full((2, 3), 30)),
         r"targets must lie in \[0, 30\)"),
        (lambda: Word2VecSampler(torch.ones(5), model.config), r"counts must be \(30,\) non-negative"),
        (lambda: Word2VecSampler(torch.ones(30), model.config).examples(torch.zeros(2, 2)),
         "corpus must be a 1-D tensor of word ids"),
        (lambda: Word2VecConfig(10, mode="glove"), "mode must be one of"),
        (lambda: Word2VecConfig(10, negatives=0), "negatives must be a positive int"),
    ]:
        with pytest.raises(ValueError, match=message):
            call()
