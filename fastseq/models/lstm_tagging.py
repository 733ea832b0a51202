"""Labelling text with a bidirectional LSTM: a label per token (:class:`LSTMTagger`) or per
sequence (:class:`LSTMClassifier`).

Both read a padded batch with ``lengths=`` (B,): fastseq's LSTM runs each sequence for its own
length, no packing, and the backward direction starts at each sequence's last real token.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from fastseq.models.inputs import check_lengths, check_positive_ints, check_token_ids
from fastseq.nn import LSTM, lstm_over_lengths

POOLINGS = ("max", "mean", "last")


@dataclasses.dataclass
class LSTMTaggingConfig:
    """Sizes of a tagger or classifier; ``num_labels`` tags or classes."""

    vocab_size: int
    num_labels: int
    embed_dim: int = 128
    hidden_size: int = 128  # per direction
    num_layers: int = 1
    bidirectional: bool = True
    dropout: float = 0.0
    padding_idx: int | None = 0
    pooling: str = "max"  # the classifier's: over each sequence's own tokens

    def __post_init__(self):
        check_positive_ints(self, ("vocab_size", "num_labels", "embed_dim", "hidden_size", "num_layers"),
                            "LSTMTaggingConfig")
        if self.pooling not in POOLINGS:
            raise ValueError(f"LSTMTaggingConfig: pooling must be one of {POOLINGS}, got {self.pooling!r}")


def pool(out, lengths, pooling: str, hidden_size: int | None = None):
    """``out`` ``(B, T, D)`` -> ``(B, D)`` over each sequence's first ``lengths[b]`` positions (all
    ``T`` when None): their maximum, their mean, or (``"last"``) the last one's. Where ``D`` is
    wider than ``hidden_size`` (a bidirectional LSTM's output, forward then backward halves),
    ``"last"`` takes the forward half at the last position and the backward half at the first:
    each direction's final state. The models that pool over time share this (the classifier
    here, :mod:`fastseq.models.video_classifier`, :mod:`fastseq.models.sentence_encoder`).
    """
    batch, length, width = out.shape
    if lengths is None:
        lengths = torch.full((batch,), length, dtype=torch.long, device=out.device)
    valid = (torch.arange(length, device=out.device) < lengths[:, None])[..., None]
    if pooling == "max":
        return out.masked_fill(~valid, float("-inf")).amax(1)
    if pooling == "mean":
        return (out * valid).sum(1) / lengths[:, None].to(out.dtype)
    last = out[torch.arange(batch, device=out.device), lengths - 1]
    hidden = width if hidden_size is None else hidden_size
    return torch.cat([last[:, :hidden], out[:, 0, hidden:]], 1) if width > hidden else last


class _Encoder(nn.Module):
    """Embedding and LSTM: ``(ids (B, T), lengths)`` -> ``(B, T, directions * hidden)``."""

    def __init__(self, config: LSTMTaggingConfig, model: str):
        super().__init__()
        self.config, self.model = config, model
        self.embedding = nn.Embedding(config.vocab_size, config.embed_dim, padding_idx=config.padding_idx)
        self.lstm = LSTM(config.embed_dim, config.hidden_size, config.num_layers, batch_first=True,
                         bidirectional=config.bidirectional,
                         dropout=config.dropout if config.num_layers > 1 else 0.0)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, input_ids, lengths):
        check_token_ids(input_ids, self.config.vocab_size, self.model)
        lengths = check_lengths(lengths, *input_ids.shape, self.model)
        out, _ = lstm_over_lengths(self.lstm, self.drop(self.embedding(input_ids)), lengths)
        return self.drop(out), lengths


class LSTMTagger(nn.Module):
    """``forward(input_ids (B, T), lengths=None)`` -> tag logits ``(B, T, num_labels)``.

    Positions past a sequence's length get logits too (of a zero LSTM output): mask them out of
    the loss, e.g. with ``ignore_index``.
    """

    def __init__(self, config: LSTMTaggingConfig):
        super().__init__()
        self.config = config
        self.encoder = _Encoder(config, "LSTMTagger")
        self.head = nn.Linear(config.hidden_size * (2 if config.bidirectional else 1), config.num_labels)

    def forward(self, input_ids, lengths=None):
        out, _ = self.encoder(input_ids, lengths)
        return self.head(out)


class LSTMClassifier(nn.Module):
    """``forward(input_ids (B, T), lengths=None)`` -> class logits ``(B, num_labels)``.

    The LSTM's outputs are pooled over each sequence's own tokens (``config.pooling``: their
    maximum, mean, or the last token's forward output with the first token's backward output).
    """

    def __init__(self, config: LSTMTaggingConfig):
        super().__init__()
        self.config = config
        self.encoder = _Encoder(config, "LSTMClassifier")
        self.head = nn.Linear(config.hidden_size * (2 if config.bidirectional else 1), config.num_labels)

    def forward(self, input_ids, lengths=None):
        out, lengths = self.encoder(input_ids, lengths)
        return self.head(pool(out, lengths, self.config.pooling, self.config.hidden_size))
