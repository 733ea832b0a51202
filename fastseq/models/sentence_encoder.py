"""Sentence embeddings from a recurrent encoder, trained contrastively (as InferSent and SimCSE do,
on an LSTM).

Word embeddings go through a (bidirectional) LSTM that runs each sentence for its own length
(``lengths=``, no packing); the LSTM's outputs are pooled over the sentence's own words (the last
hidden state of each direction, or the masked mean or maximum), optionally projected, and
L2-normalised: :meth:`SentenceEncoder.encode` ``(B, T)`` -> ``(B, D)``, whose dot products are cosine
similarities. :meth:`SentenceEncoder.contrastive_loss` is the in-batch InfoNCE loss of paired
sentences: ``a[i]`` should be nearer ``b[i]`` than every other ``b[j]`` of the batch, and the other
way round.

Words: :class:`Vocabulary` numbers them (``<pad>`` 0, ``<unk>`` 1, then the frequent words) and
reads every other word as ``<unk>``; the model likewise reads an id past its vocabulary as
``config.unk_id`` (or refuses it, with ``unk_id=None``). An empty sentence has no embedding: it is
refused, by index, rather than pooled over nothing.
"""

from __future__ import annotations

import collections
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from fastseq.models.clip import contrastive_loss
from fastseq.models.inputs import check_lengths, check_positive_ints, check_token_ids
from fastseq.models.lstm_tagging import POOLINGS, pool
from fastseq.nn import LSTM, lstm_over_lengths

PAD, UNK = "<pad>", "<unk>"


@dataclasses.dataclass
class SentenceEncoderConfig:
    """Sizes and options of a :class:`SentenceEncoder`; ``vocab_size`` counts ``<pad>`` and ``<unk>``."""

    vocab_size: int
    embed_dim: int = 128
    hidden_size: int = 128  # per direction
    num_layers: int = 1
    bidirectional: bool = True
    dropout: float = 0.0  # on the word embeddings and the LSTM's outputs (and between its layers)
    pooling: str = "max"  # over each sentence's own words: "max", "mean" or "last"
    projection_dim: int | None = None  # a linear layer after the pooling (None: no projection)
    padding_idx: int = 0
    unk_id: int | None = 1  # what an id past the vocabulary reads as (None: such ids are refused)
    temperature: float = 0.05  # InfoNCE's: similarities are divided by it

    def __post_init__(self):
        check_positive_ints(self, ("vocab_size", "embed_dim", "hidden_size", "num_layers"),
                            "SentenceEncoderConfig")
        if self.pooling not in POOLINGS:
            raise ValueError(f"SentenceEncoderConfig: pooling must be one of {POOLINGS}, "
                             f"got {self.pooling!r}")
        if self.projection_dim is not None:
            check_positive_ints(self, ("projection_dim",), "SentenceEncoderConfig")
        for name in ("padding_idx", "unk_id"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 0 <= value < self.vocab_size):
                raise ValueError(f"SentenceEncoderConfig: {name} must be an id in [0, {self.vocab_size}), "
                                 f"got {value!r}")
        if self.unk_id is not None and self.unk_id == self.padding_idx:
            raise ValueError(f"SentenceEncoderConfig: unk_id and padding_idx must differ (both "
                             f"{self.unk_id}): <pad>'s embedding is fixed at zero, <unk>'s is learned")
        if not self.temperature > 0:
            raise ValueError(f"SentenceEncoderConfig: temperature must be > 0, got {self.temperature!r}")


class Vocabulary:
    """Words <-> ids: ``<pad>`` 0, ``<unk>`` 1, then ``words``. :meth:`encode` reads any other word as
    ``<unk>`` and refuses an empty sentence, naming it."""

    pad_id, unk_id = 0, 1

    def __init__(self, words):
        self.itos = [PAD, UNK, *words]
        self.stoi = {word: i for i, word in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("Vocabulary: words must be distinct and exclude <pad> and <unk>")

    @classmethod
    def build(cls, sentences, min_count: int = 2, max_size: int | None = None) -> Vocabulary:
        """The words of ``sentences`` (lists of words) seen at least ``min_count`` times, most frequent
        first (ties in first-seen order), at most ``max_size`` of them; the rarer ones will be ``<unk>``."""
        counts = collections.Counter(word for sentence in sentences for word in sentence)
        counts.pop(PAD, None)
        counts.pop(UNK, None)
        return cls([w for w, n in counts.most_common(max_size) if n >= min_count])

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, sentences) -> tuple[torch.Tensor, torch.Tensor]:
        """Lists of words -> ``(ids (B, T) int64 padded with <pad>, lengths (B,))``; unknown words
        become ``<unk>``."""
        empty = [i for i, sentence in enumerate(sentences) if len(sentence) == 0]
        if empty:
            raise ValueError(f"Vocabulary: sentences {empty} are empty: an empty sentence has no embedding")
        lengths = torch.tensor([len(s) for s in sentences], dtype=torch.long)
        ids = torch.full((len(sentences), int(lengths.max()) if len(sentences) else 0), self.pad_id)
        for row, sentence in enumerate(sentences):
            ids[row, :len(sentence)] = torch.tensor([self.stoi.get(w, self.unk_id) for w in sentence])
        return ids, lengths


def _integers(x) -> bool:
    """Whether ``x`` is a tensor of integers (not floats, complex numbers or bools)."""
    return isinstance(x, torch.Tensor) and not (x.is_floating_point() or x.is_complex()
                                                or x.dtype == torch.bool)


def info_nce(a, b, temperature: float) -> torch.Tensor:
    """In-batch InfoNCE of L2-normalised ``a`` ``(B, D)`` and ``b`` ``(B, D)``: row ``i`` of each
    belongs with row ``i`` of the other, every other row is a negative; symmetric (CLIP's loss on
    cosine similarities divided by ``temperature``)."""
    return contrastive_loss(a @ b.t() / temperature)


class SentenceEncoder(nn.Module):
    """``forward(input_ids (B, T), lengths=None)`` -> sentence embeddings ``(B, D)``, not normalised;
    :meth:`encode` gives them L2-normalised. ``D`` is ``projection_dim``, or the LSTM's output width
    (``directions * hidden_size``) without a projection. ``lengths`` ``(B,)``: each sentence's words,
    the first ``lengths[b]`` (all ``T`` when None), at least one."""

    def __init__(self, config: SentenceEncoderConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embed_dim, padding_idx=config.padding_idx)
        self.lstm = LSTM(config.embed_dim, config.hidden_size, config.num_layers, batch_first=True,
                         bidirectional=config.bidirectional,
                         dropout=config.dropout if config.num_layers > 1 else 0.0)
        self.drop = nn.Dropout(config.dropout)
        width = config.hidden_size * (2 if config.bidirectional else 1)
        self.proj = nn.Linear(width, config.projection_dim) if config.projection_dim else nn.Identity()

    def checked(self, input_ids, lengths, names=("input_ids", "lengths")):
        """``(ids, lengths)`` as the encoder reads them: ids past the vocabulary as ``<unk>``, lengths
        int64 (or None); refuses bad ids, lengths outside ``[1, T]`` and empty sentences by name."""
        config, model = self.config, "SentenceEncoder"
        if config.unk_id is not None and _integers(input_ids) and input_ids.dim() == 2:
            input_ids = torch.where(input_ids >= config.vocab_size, config.unk_id, input_ids)
        check_token_ids(input_ids, config.vocab_size, model, names[0])
        batch, length = input_ids.shape
        if length == 0:
            raise ValueError(f"fastseq {model}: {names[0]} hold no words (T = 0): an empty sentence has "
                             "no embedding")
        if _integers(lengths) and lengths.shape == (batch,) and batch and not torch.compiler.is_compiling():
            empty = torch.nonzero(lengths == 0).flatten().tolist()
            if empty:
                raise ValueError(f"fastseq {model}: {names[1]} says sentences {empty} are empty (length 0): "
                                 "an empty sentence has no embedding (drop it, or give it a word such as "
                                 "<unk>)")
        return input_ids, check_lengths(lengths, batch, length, model, names[1])

    def forward(self, input_ids, lengths=None):
        return self._embed(*self.checked(input_ids, lengths))

    def encode(self, input_ids, lengths=None):
        """Unit-length sentence embeddings ``(B, D)``: their dot products are cosine similarities."""
        return F.normalize(self(input_ids, lengths), dim=-1)

    def contrastive_loss(self, ids_a, lengths_a, ids_b, lengths_b) -> torch.Tensor:
        """In-batch InfoNCE (:func:`info_nce`, ``config.temperature``) of the pairs ``(a[i], b[i])``.
        Both sides go through the encoder as one batch of ``2B`` sentences, padded to the longer side:
        one LSTM call, where two would each run at half the width."""
        ids_a, lengths_a = self.checked(ids_a, lengths_a, ("ids_a", "lengths_a"))
        ids_b, lengths_b = self.checked(ids_b, lengths_b, ("ids_b", "lengths_b"))
        if ids_a.shape[0] != ids_b.shape[0]:
            raise ValueError(f"fastseq SentenceEncoder: ids_a and ids_b must pair up, got {ids_a.shape[0]} "
                             f"and {ids_b.shape[0]} sentences")
        length = max(ids_a.shape[1], ids_b.shape[1])
        ids = torch.cat([F.pad(ids, (0, length - ids.shape[1]), value=self.config.padding_idx)
                         for ids in (ids_a, ids_b)])
        lengths = torch.cat([torch.full((ids.shape[0],), ids.shape[1], dtype=torch.long, device=ids.device)
                             if n is None else n for ids, n in ((ids_a, lengths_a), (ids_b, lengths_b))])
        a, b = F.normalize(self._embed(ids, lengths), dim=-1).chunk(2)
        return info_nce(a, b, self.config.temperature)

    def _embed(self, ids, lengths):
        out, _ = lstm_over_lengths(self.lstm, self.drop(self.embedding(ids)), lengths)
        return self.proj(pool(self.drop(out), lengths, self.config.pooling, self.config.hidden_size))
