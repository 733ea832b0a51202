"""The encoder-decoder Transformer of "Attention Is All You Need" on ``fastseq.nn.Transformer``.

Token embeddings scaled by ``sqrt(d_model)``, sinusoidal positions (or rotary, applied inside every
self-attention), the Transformer, and an output layer tied to the target embedding. Generation
encodes the source once and decodes over the decoder's KV cache, so each step of greedy or beam
search runs one token through the decoder.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from fastseq.models.decoding import beam_search
from fastseq.models.inputs import check_decoding, check_lengths, check_positive_ints, check_token_ids
from fastseq.nn import RotaryEmbedding, Transformer

POSITIONS = ("sinusoidal", "rotary")


@dataclasses.dataclass
class TransformerSeq2SeqConfig:
    """Sizes, position scheme and special tokens of a :class:`TransformerSeq2Seq`."""

    src_vocab_size: int
    tgt_vocab_size: int
    d_model: int = 128
    nhead: int = 4
    num_encoder_layers: int = 2
    num_decoder_layers: int = 2
    dim_feedforward: int = 512
    dropout: float = 0.1
    max_len: int = 256  # longest source or target
    positions: str = "sinusoidal"
    norm_first: bool = True
    tie_embeddings: bool = True  # the output layer shares the target embedding
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self):
        check_positive_ints(self, ("src_vocab_size", "tgt_vocab_size", "d_model", "nhead",
                                   "num_encoder_layers", "num_decoder_layers", "dim_feedforward",
                                   "max_len"), "TransformerSeq2SeqConfig")
        if self.d_model % self.nhead:
            raise ValueError(f"TransformerSeq2SeqConfig: d_model ({self.d_model}) must be a multiple "
                             f"of nhead ({self.nhead})")
        if self.positions not in POSITIONS:
            raise ValueError(f"TransformerSeq2SeqConfig: positions must be one of {POSITIONS}, got "
                             f"{self.positions!r}")


def sinusoids(length: int, dim: int) -> torch.Tensor:
    """``(length, dim)``: sin at even, cos at odd features, wavelengths 2 pi .. 10000 * 2 pi."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: dim // 2])
    return table


class TransformerSeq2Seq(nn.Module):
    """``forward(src (B, S), tgt_in (B, T), src_lengths=None)`` -> logits ``(B, T, V_tgt)``;
    ``tgt_in`` starts with BOS (teacher forcing), the source's padding is masked."""

    def __init__(self, config: TransformerSeq2SeqConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        self.src_embedding = nn.Embedding(config.src_vocab_size, d, padding_idx=config.pad_id)
        self.tgt_embedding = nn.Embedding(config.tgt_vocab_size, d, padding_idx=config.pad_id)
        rotary = RotaryEmbedding(d // config.nhead) if config.positions == "rotary" else None
        self.register_buffer("sinusoids", sinusoids(config.max_len, d), persistent=False)
        self.transformer = Transformer(d, config.nhead, config.num_encoder_layers,
                                       config.num_decoder_layers, config.dim_feedforward,
                                       config.dropout, batch_first=True,
                                       norm_first=config.norm_first, rotary=rotary)
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(d, config.tgt_vocab_size, bias=False)
        for embedding in (self.src_embedding, self.tgt_embedding):
            nn.init.normal_(embedding.weight, std=d**-0.5)
        if config.tie_embeddings:
            self.head.weight = self.tgt_embedding.weight

    def _embed(self, embedding, ids, offset: int = 0):
        x = embedding(ids) * math.sqrt(self.config.d_model)
        if self.config.positions == "sinusoidal":
            x = x + self.sinusoids[offset:offset + ids.shape[1]].to(x.dtype)
        return self.drop(x)

    def _check_length(self, length: int, name: str):
        if length > self.config.max_len:
            raise ValueError(f"fastseq TransformerSeq2Seq: {name} has {length} positions, more than "
                             f"max_len={self.config.max_len}")

    def encode(self, src, src_lengths=None):
        """``src`` ``(B, S)`` -> ``(memory (B, S, d_model), padding (B, S) True = padding)``."""
        check_token_ids(src, self.config.src_vocab_size, "TransformerSeq2Seq", "src")
        self._check_length(src.shape[1], "src")
        lengths = check_lengths(src_lengths, *src.shape, "TransformerSeq2Seq", "src_lengths")
        padding = None
        if lengths is not None:
            padding = torch.arange(src.shape[1], device=src.device) >= lengths[:, None]
        memory = self.transformer.encoder(self._embed(self.src_embedding, src),
                                          src_key_padding_mask=padding)
        return memory, padding

    def forward(self, src, tgt_in, src_lengths=None):
        check_token_ids(tgt_in, self.config.tgt_vocab_size, "TransformerSeq2Seq", "tgt_in")
        self._check_length(tgt_in.shape[1], "tgt_in")
        if tgt_in.shape[0] != src.shape[0]:
            raise ValueError(f"fastseq TransformerSeq2Seq: src and tgt_in must have the same batch "
                             f"size, got {tuple(src.shape)} and {tuple(tgt_in.shape)}")
        memory, padding = self.encode(src, src_lengths)
        # The mask is for torch.nn's decoder (see fastseq.nn.to_torch_nn), which needs it with
        # the hint; fastseq's runs the causal kernel without reading it.
        causal = Transformer.generate_square_subsequent_mask(tgt_in.shape[1], device=tgt_in.device)
        out = self.transformer.decoder(self._embed(self.tgt_embedding, tgt_in), memory,
                                       tgt_mask=causal, memory_key_padding_mask=padding,
                                       tgt_is_causal=True)
        return self.head(out)

    @torch.no_grad()
    def generate(self, src, src_lengths=None, max_len: int = 64, beam_size: int = 1,
                 length_penalty: float = 1.0, stop_at_eos: bool = True):
        """Translate ``src`` ``(B, S)``: ``(B, L)`` tokens after BOS, ending at EOS (``eos_id``
        fills the rest); ``beam_size=1`` is greedy; ``stop_at_eos=False`` decodes ``max_len``
        tokens whatever they are. Each step runs the new token through the
        decoder's KV cache. Call ``eval()`` first to turn dropout off."""
        check_decoding(max_len, beam_size, "TransformerSeq2Seq")
        self._check_length(max_len, "max_len")
        memory, padding = self.encode(src, src_lengths)
        memory = memory.repeat_interleave(beam_size, 0)
        padding = None if padding is None else padding.repeat_interleave(beam_size, 0)
        cache = self.transformer.decoder.new_cache(memory, max_len, memory_key_padding_mask=padding)

        def step(token, state):
            cache, position = state
            x = self._embed(self.tgt_embedding, token[:, None], position)
            out = self.transformer.decoder(x, cache=cache)
            return F.log_softmax(self.head(out[:, 0]), -1), (cache, position + 1)

        def reorder(state, index):
            if beam_size > 1:  # a source's beams share its memory: only the KV caches move
                state[0].reorder(index, memory=False)
            return state

        config = self.config
        tokens, _ = beam_search(step, reorder, (cache, 0), src.shape[0], beam_size=beam_size,
                                max_len=max_len, bos_id=config.bos_id,
                                eos_id=config.eos_id if stop_at_eos else None,
                                length_penalty=length_penalty, device=src.device)
        return tokens
