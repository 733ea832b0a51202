"""An LSTM encoder-decoder with attention (Bahdanau et al. 2015; Luong et al. 2015).

A bidirectional ``fastseq.nn.LSTM`` reads the source (each sequence for its own length); its final
states start the decoder, a ``fastseq.nn.LSTMCell`` that attends over the encoder's states at
every step, the source's padding masked:

- ``attention="bahdanau"``: additive scores ``v . tanh(W_k s + W_q h)`` from the previous decoder
  state; the context is part of the cell's input.
- ``attention="luong"``: multiplicative scores ``h . W_k s`` from the new decoder state, and input
  feeding (the last attentional vector is part of the next step's input).

Either way the output layer reads the attentional vector ``tanh(W_c [h; context])``. Training uses
teacher forcing; :meth:`Seq2Seq.generate` decodes greedily or with beam search.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from fastseq.models.decoding import beam_search
from fastseq.models.inputs import check_decoding, check_lengths, check_positive_ints, check_token_ids
from fastseq.nn import LSTM, LSTMCell, lstm_over_lengths

ATTENTIONS = ("bahdanau", "luong")


@dataclasses.dataclass
class Seq2SeqConfig:
    """Sizes and special tokens of a :class:`Seq2Seq`."""

    src_vocab_size: int
    tgt_vocab_size: int
    embed_dim: int = 128
    hidden_size: int = 256  # the decoder's; each encoder direction has half
    encoder_layers: int = 1
    attention: str = "luong"
    dropout: float = 0.0
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self):
        check_positive_ints(self, ("src_vocab_size", "tgt_vocab_size", "embed_dim", "hidden_size",
                                   "encoder_layers"), "Seq2SeqConfig")
        if self.hidden_size % 2:
            raise ValueError(f"Seq2SeqConfig: hidden_size must be even (two encoder directions), "
                             f"got {self.hidden_size}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"Seq2SeqConfig: attention must be one of {ATTENTIONS}, got {self.attention!r}")


@dataclasses.dataclass
class EncodedSource:
    """The encoder's states ``(B, S, H)``, their projection to attention keys ``(B, S, H)`` and
    the source's validity mask ``(B, S)`` (True = a real token)."""

    states: torch.Tensor
    keys: torch.Tensor
    valid: torch.Tensor

    def repeat(self, times: int) -> EncodedSource:
        """Each sequence ``times`` times in a row (one per beam)."""
        return EncodedSource(*(t.repeat_interleave(times, 0) for t in (self.states, self.keys, self.valid)))


class Attention(nn.Module):
    """Attention of a decoder state ``(B, H)`` over the encoded source: ``(context, weights)``."""

    def __init__(self, hidden: int, kind: str):
        super().__init__()
        self.kind = kind
        self.key_proj = nn.Linear(hidden, hidden, bias=False)
        if kind == "bahdanau":
            self.query_proj = nn.Linear(hidden, hidden)
            self.score = nn.Linear(hidden, 1, bias=False)

    def forward(self, query, source: EncodedSource):
        if self.kind == "bahdanau":
            scores = self.score(torch.tanh(source.keys + self.query_proj(query)[:, None]))[..., 0]
        else:
            scores = torch.einsum("bsh,bh->bs", source.keys, query)
        weights = scores.masked_fill(~source.valid, float("-inf")).softmax(-1)
        return torch.einsum("bs,bsh->bh", weights, source.states), weights


class Seq2Seq(nn.Module):
    """``forward(src (B, S), tgt_in (B, T), src_lengths=None)`` -> ``(logits (B, T, V_tgt),
    attention (B, T, S))``; ``tgt_in`` starts with BOS (teacher forcing)."""

    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.src_embedding = nn.Embedding(config.src_vocab_size, config.embed_dim, padding_idx=config.pad_id)
        self.tgt_embedding = nn.Embedding(config.tgt_vocab_size, config.embed_dim, padding_idx=config.pad_id)
        self.encoder = LSTM(config.embed_dim, hidden // 2, config.encoder_layers, batch_first=True,
                            bidirectional=True, dropout=config.dropout if config.encoder_layers > 1 else 0.0)
        self.bridge = nn.Linear(hidden, 2 * hidden)  # final encoder states -> decoder (h0, c0)
        self.cell = LSTMCell(config.embed_dim + hidden, hidden)
        self.attention = Attention(hidden, config.attention)
        self.combine = nn.Linear(2 * hidden, hidden, bias=False)
        self.head = nn.Linear(hidden, config.tgt_vocab_size)
        self.drop = nn.Dropout(config.dropout)

    def encode(self, src, src_lengths=None):
        """``src`` ``(B, S)`` -> the :class:`EncodedSource` and the decoder's first state."""
        config = self.config
        check_token_ids(src, config.src_vocab_size, "Seq2Seq", "src")
        lengths = check_lengths(src_lengths, *src.shape, "Seq2Seq", "src_lengths")
        states, (h_n, _) = lstm_over_lengths(self.encoder, self.drop(self.src_embedding(src)), lengths)
        batch, length, _ = states.shape
        if lengths is None:
            lengths = torch.full((batch,), length, device=src.device)
        valid = torch.arange(length, device=src.device) < lengths[:, None]
        final = torch.cat([h_n[-2], h_n[-1]], -1)  # the top layer's two directions
        h0, c0 = torch.tanh(self.bridge(final)).chunk(2, -1)
        source = EncodedSource(states, self.attention.key_proj(states), valid)
        return source, (h0, c0, torch.zeros_like(h0))

    def step(self, token, state, source: EncodedSource):
        """One decoder step for ``token`` ``(B,)``: ``(attentional vector (B, H), state, weights)``."""
        h, c, feed = state
        embedded = self.drop(self.tgt_embedding(token))
        if self.config.attention == "bahdanau":
            feed, weights = self.attention(h, source)
        h, c = self.cell(torch.cat([embedded, feed], -1), (h, c))
        if self.config.attention == "luong":
            context, weights = self.attention(h, source)
        else:
            context = feed
        out = torch.tanh(self.combine(torch.cat([h, context], -1)))
        return out, (h, c, out if self.config.attention == "luong" else feed), weights

    def forward(self, src, tgt_in, src_lengths=None):
        check_token_ids(tgt_in, self.config.tgt_vocab_size, "Seq2Seq", "tgt_in")
        if tgt_in.shape[0] != src.shape[0]:
            raise ValueError(f"fastseq Seq2Seq: src and tgt_in must have the same batch size, got "
                             f"{tuple(src.shape)} and {tuple(tgt_in.shape)}")
        source, state = self.encode(src, src_lengths)
        outs, weights = [], []
        for t in range(tgt_in.shape[1]):
            out, state, w = self.step(tgt_in[:, t], state, source)
            outs.append(out)
            weights.append(w)
        logits = self.head(self.drop(torch.stack(outs, 1)))
        attention = torch.stack(weights, 1) if weights else logits.new_zeros(src.shape[0], 0, src.shape[1])
        return logits, attention

    @torch.no_grad()
    def generate(self, src, src_lengths=None, max_len: int = 64, beam_size: int = 1,
                 length_penalty: float = 1.0, stop_at_eos: bool = True):
        """Translate ``src`` ``(B, S)``: ``(B, L)`` tokens after BOS, ending at EOS (``eos_id``
        fills the rest); ``beam_size=1`` is greedy; ``stop_at_eos=False`` decodes ``max_len``
        tokens whatever they are. Call ``eval()`` first to turn dropout off."""
        check_decoding(max_len, beam_size, "Seq2Seq")
        source, state = self.encode(src, src_lengths)
        source = source.repeat(beam_size)
        state = tuple(t.repeat_interleave(beam_size, 0) for t in state)

        def step(token, state):
            out, state, _ = self.step(token, state, source)
            return F.log_softmax(self.head(out), -1), state

        def reorder(state, index):
            return tuple(t.index_select(0, index) for t in state)

        config = self.config
        tokens, _ = beam_search(step, reorder, state, src.shape[0], beam_size=beam_size,
                                max_len=max_len, bos_id=config.bos_id,
                                eos_id=config.eos_id if stop_at_eos else None,
                                length_penalty=length_penalty, device=src.device)
        return tokens

