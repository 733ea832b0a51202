"""Word2vec (Mikolov et al. 2013) on fastseq's fused negative-sampling loss.

Each word has an input vector and an output vector. Skip-gram learns to tell a centre word's true
context words from words drawn from a noise distribution (the unigram distribution to the 3/4),
CBOW to tell the centre word from noise given the mean of its context's input vectors; both by the
loss of :func:`fastseq.ops.negative_sampling.negative_sampling_loss`, which runs the gathers, dot
products and their backward in one fused kernel and gives sparse gradients. Frequent words are
subsampled (each occurrence kept with probability ``sqrt(t / f) + t / f``, as word2vec's code does).
The input vectors are the embedding: :meth:`Word2Vec.most_similar` and :meth:`Word2Vec.analogy`
query it by cosine similarity.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from fastseq.models.inputs import check_positive_ints, describe
from fastseq.ops.negative_sampling import negative_sampling_loss

MODES = ("skipgram", "cbow")


def _fail(message):
    raise ValueError(f"fastseq Word2Vec: {message}")


@dataclasses.dataclass
class Word2VecConfig:
    """Sizes and options of a :class:`Word2Vec` and its :class:`Word2VecSampler`."""

    vocab_size: int
    dim: int = 100
    mode: str = "skipgram"  # or "cbow"
    window: int = 5  # context words on each side (skip-gram: at most; drawn per word)
    negatives: int = 5  # noise words per true word
    subsample: float = 1e-4  # word2vec's t (0: keep every word)
    sparse: bool = True  # sparse gradients (for SGD / SparseAdam)

    def __post_init__(self):
        check_positive_ints(self, ("vocab_size", "dim", "window", "negatives"), "Word2VecConfig")
        if self.mode not in MODES:
            raise ValueError(f"Word2VecConfig: mode must be one of {MODES}, got {self.mode!r}")
        if not 0 <= self.subsample < 1:
            raise ValueError(f"Word2VecConfig: subsample must be in [0, 1), got {self.subsample!r}")


class Word2Vec(nn.Module):
    """``forward(inputs (B, W), targets (B, 1 + negatives), reduction="mean")`` -> the
    negative-sampling loss ("sum": word2vec's SGD, which steps every example at the full rate).

    ``inputs`` holds each example's centre word (skip-gram, W = 1) or context words (CBOW, W =
    2 * window); ``targets`` the word to predict first, then the noise words.
    """

    def __init__(self, config: Word2VecConfig):
        super().__init__()
        self.config = config
        self.in_embed = nn.Embedding(config.vocab_size, config.dim, sparse=config.sparse)
        self.out_embed = nn.Embedding(config.vocab_size, config.dim, sparse=config.sparse)
        with torch.no_grad():  # word2vec's initialisation: small input vectors, zero output vectors
            self.in_embed.weight.uniform_(-0.5 / config.dim, 0.5 / config.dim)
            self.out_embed.weight.zero_()

    def forward(self, inputs, targets, reduction: str = "mean"):
        return negative_sampling_loss(self.in_embed.weight, self.out_embed.weight, inputs, targets,
                                      sparse=self.config.sparse, reduction=reduction)

    @torch.no_grad()
    def vectors(self) -> torch.Tensor:
        """The unit-length word vectors ``(vocab_size, dim)``."""
        return F.normalize(self.in_embed.weight, dim=-1)

    @torch.no_grad()
    def most_similar(self, query, k: int = 10, exclude=()) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids (k,), cosines (k,))`` of the words nearest ``query`` (a word id or a ``(dim,)``
        vector), leaving out ``query`` itself and the ids in ``exclude``."""
        vectors = self.vectors()
        if isinstance(query, int) and not isinstance(query, bool):
            self._check_ids([query], "query")
            exclude = (*exclude, query)
            query = vectors[query]
        elif not isinstance(query, torch.Tensor) or query.shape != (self.config.dim,):
            _fail(f"query must be a word id or a ({self.config.dim},) vector, got {describe(query)}")
        most = self.config.vocab_size - len(exclude)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= most:
            _fail(f"k must be an int in [1, {most}], got {k!r}")
        self._check_ids(list(exclude), "exclude")
        cosines = vectors @ F.normalize(query.to(vectors.dtype), dim=0)
        cosines[list(exclude)] = -float("inf")
        top = cosines.topk(k)
        return top.indices, top.values

    def analogy(self, a: int, b: int, c: int, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """"``a`` is to ``b`` as ``c`` is to ?": the ``k`` words nearest ``b - a + c`` (unit
        vectors), leaving out the three."""
        self._check_ids([a, b, c], "a, b, c")
        vectors = self.vectors()
        return self.most_similar(vectors[b] - vectors[a] + vectors[c], k, exclude=(a, b, c))

    def _check_ids(self, ids, name):
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.config.vocab_size:
                _fail(f"{name} must be word ids in [0, {self.config.vocab_size}), got {i!r}")


class Word2VecSampler:
    """The training examples of word2vec from a corpus of word ids: frequent words subsampled,
    skip-gram's (centre, context) pairs within a window drawn per word, or CBOW's (context window,
    centre) examples, each with ``negatives`` noise words from the unigram distribution to the 3/4.

    Args:
        counts: ``(vocab_size,)`` occurrences of each word in the corpus.
        config: the model's :class:`Word2VecConfig` (mode, window, negatives, subsample).
    """

    def __init__(self, counts: torch.Tensor, config: Word2VecConfig):
        if not isinstance(counts, torch.Tensor) or counts.shape != (config.vocab_size,) or (counts < 0).any():
            _fail(f"counts must be ({config.vocab_size},) non-negative word counts, got {describe(counts)}")
        self.config = config
        frequency = counts.double() / counts.sum().clamp(min=1)
        self.noise = frequency.pow(0.75)
        self.noise /= self.noise.sum()
        if config.subsample > 0:
            ratio = config.subsample / frequency.clamp(min=1e-12)
            self.keep = (ratio.sqrt() + ratio).clamp(max=1.0)
        else:
            self.keep = torch.ones_like(frequency)

    def examples(self, corpus: torch.Tensor, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
        """One epoch's ``(inputs (E, W), targets (E, 1 + negatives))`` from ``corpus`` ``(L,)``
        word ids, in corpus order (shuffle them to train)."""
        config = self.config
        if not isinstance(corpus, torch.Tensor) or corpus.dim() != 1 or corpus.is_floating_point():
            _fail(f"corpus must be a 1-D tensor of word ids, got {describe(corpus)}")
        kept = corpus[torch.rand(len(corpus), generator=generator, dtype=torch.float64) < self.keep[corpus]]
        inputs, words = self._skipgram(kept, generator) if config.mode == "skipgram" else self._cbow(kept)
        noise = torch.multinomial(self.noise, len(words) * config.negatives, replacement=True,
                                  generator=generator).view(len(words), config.negatives)
        return inputs, torch.cat([words[:, None], noise], dim=1)

    def _skipgram(self, kept, generator):
        """Pairs (centre, word at offset o) for each centre whose drawn window reaches |o|."""
        window = self.config.window
        reach = torch.randint(1, window + 1, (len(kept),), generator=generator)
        centres, contexts = [], []
        for offset in (*range(-window, 0), *range(1, window + 1)):
            position = torch.arange(max(0, -offset), len(kept) - max(0, offset))
            position = position[reach[position] >= abs(offset)]
            centres.append(kept[position])
            contexts.append(kept[position + offset])
        return torch.cat(centres)[:, None], torch.cat(contexts)

    def _cbow(self, kept):
        """(the ``window`` words on each side, the centre) for each centre with a full window."""
        window = self.config.window
        if len(kept) <= 2 * window:
            return kept.new_empty(0, 2 * window), kept.new_empty(0)
        spans = kept.unfold(0, 2 * window + 1, 1)
        return torch.cat([spans[:, :window], spans[:, window + 1:]], dim=1), spans[:, window]
