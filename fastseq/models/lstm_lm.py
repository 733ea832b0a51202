"""An LSTM language model on ``fastseq.nn.LSTM``: embedding, stacked LSTM, tied output layer.

The classic word/character-level recipe (Zaremba et al. 2014; Press & Wolf 2017 for the tied
weights): dropout on the embeddings, between the layers and before the output; the state carried
across batches for truncated backpropagation through time (:func:`detach_state` cuts the graph
between them). ``proj_size`` adds the LSTM's output projection (Sak et al. 2014), which lets a
wide LSTM tie its output layer to a narrow embedding.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from fastseq.models.decoding import next_token
from fastseq.models.inputs import check_positive_ints, check_token_ids
from fastseq.nn import LSTM


@dataclasses.dataclass
class LSTMLMConfig:
    """Sizes of an :class:`LSTMLanguageModel`."""

    vocab_size: int
    embed_dim: int = 256
    hidden_size: int = 256
    num_layers: int = 2
    dropout: float = 0.2  # on the embeddings, between layers and before the output layer
    proj_size: int = 0  # the LSTM's output width (0: hidden_size)
    tie_weights: bool = True  # needs embed_dim == (proj_size or hidden_size)

    def __post_init__(self):
        check_positive_ints(self, ("vocab_size", "embed_dim", "hidden_size", "num_layers"), "LSTMLMConfig")
        if self.tie_weights and self.embed_dim != (self.proj_size or self.hidden_size):
            raise ValueError(f"LSTMLMConfig: tied weights need embed_dim ({self.embed_dim}) equal to "
                             f"the LSTM's output width ({self.proj_size or self.hidden_size}); set "
                             f"proj_size={self.embed_dim} or tie_weights=False")


def detach_state(state):
    """The ``(h, c)`` state with its history cut: the next batch of truncated BPTT starts here."""
    return None if state is None else tuple(t.detach() for t in state)


class LSTMLanguageModel(nn.Module):
    """``forward(input_ids (B, T), state=None)`` -> ``(logits (B, T, V), state)``.

    ``state`` is the LSTM's ``(h, c)``, each ``(num_layers, B, width)``: pass the returned one
    (through :func:`detach_state`) to continue where the last batch stopped.
    """

    def __init__(self, config: LSTMLMConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embed_dim)
        self.drop = nn.Dropout(config.dropout)
        self.lstm = LSTM(config.embed_dim, config.hidden_size, config.num_layers,
                         dropout=config.dropout if config.num_layers > 1 else 0.0,
                         batch_first=True, proj_size=config.proj_size)
        self.head = nn.Linear(config.proj_size or config.hidden_size, config.vocab_size)
        if config.tie_weights:
            self.head.weight = self.embedding.weight
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids, state=None):
        check_token_ids(input_ids, self.config.vocab_size, "LSTMLanguageModel")
        out, state = self.lstm(self.drop(self.embedding(input_ids)), state)
        return self.head(self.drop(out)), state

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, temperature: float = 1.0, top_k=None,
                 top_p=None, generator=None):
        """Continue each prompt of ``input_ids`` ``(B, T)`` by ``max_new_tokens`` tokens.

        Reads the prompt once, then feeds one token a step through the carried state. Temperature
        0 is greedy. Returns ``(B, T + max_new_tokens)``.
        """
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"fastseq LSTMLanguageModel: max_new_tokens must be an int >= 0, got "
                             f"{max_new_tokens!r}")
        check_token_ids(input_ids, self.config.vocab_size, "LSTMLanguageModel")
        if input_ids.shape[1] == 0:
            raise ValueError("fastseq LSTMLanguageModel: generate needs a prompt of at least one token")
        tokens, step_input, state = [input_ids], input_ids, None
        for _ in range(max_new_tokens):
            logits, state = self(step_input, state)
            step_input = next_token(logits[:, -1], temperature, top_k, top_p, generator)[:, None]
            tokens.append(step_input)
        return torch.cat(tokens, 1)
