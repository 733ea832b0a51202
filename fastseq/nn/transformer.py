"""Drop-ins for ``torch.nn.Transformer`` and its parts, on fastseq's fused attention.

``Transformer``, ``TransformerEncoder``, ``TransformerDecoder``, ``TransformerEncoderLayer`` and
``TransformerDecoderLayer`` take torch.nn's constructor arguments, hold parameters of the same
names and shapes (state dicts load both ways; built in the same order, so one seed gives both the
same weights) and take the same forward arguments: ``batch_first``, ``norm_first``,
``activation``, the ``*_mask`` and ``*_key_padding_mask`` arguments (bool True = masked, or
additive) and the ``*_is_causal`` hints. As in torch.nn, ``Transformer`` always ends its encoder and
decoder with a LayerNorm, post-norm included.

Beyond torch.nn:

- incremental decoding: :meth:`TransformerDecoder.new_cache` projects the encoder's memory to keys
  and values once per layer and sizes a KV cache for the decoder's self-attention; a forward with
  ``cache=`` then takes only the new target tokens, so each greedy or beam step costs one token's
  work. :meth:`TransformerDecoderCache.reorder` follows the beams.
- ``rotary=``: a :class:`RotaryEmbedding` applied to the queries and keys of every
  self-attention (the cross-attention has no shared positions to rotate by).

Where torch.nn differs: a query whose keys are all masked gives zeros, not NaN; ``is_causal=True``
without a mask means causal (torch.nn requires the mask with the hint); the encoder's outputs at
padded positions are computed, where torch.nn's inference fast path writes zeros there.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fastseq.nn.attention import KVCache
from fastseq.nn.multihead_attention import MultiheadAttention, merged_mask, to_batch_first
from fastseq.nn.rotary import RotaryEmbedding
from fastseq.ops.attention_decode import attention_decode, kv_cache_append


def _activation(activation) -> Callable:
    if activation == "relu":
        return F.relu
    if activation == "gelu":
        return F.gelu
    if callable(activation):
        return activation
    raise ValueError(f"fastseq Transformer: activation must be 'relu', 'gelu' or a callable, "
                     f"got {activation!r}")


def _layout(x, batch_first: bool, name: str, width: int) -> str:
    """Which of torch's layouts ``x`` is in; refuses the wrong rank or width."""
    if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3) or x.shape[-1] != width:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"fastseq Transformer: {name} must be (batch, length, {width}) with "
                         f"batch_first, (length, batch, {width}) without, or (length, {width}) "
                         f"unbatched; got {got}")
    if x.dim() == 2:
        return "unbatched"
    return "batch_first" if batch_first else "seq_first"


def _padding(mask, layout):
    return mask[None] if mask is not None and layout == "unbatched" else mask


def is_causal_mask(mask, is_causal, size) -> bool:
    """torch.nn's reading of the causal hint: True when told so, or (hint None) when ``mask`` is
    exactly :meth:`Transformer.generate_square_subsequent_mask` of ``size``."""
    if is_causal is not None or mask is None:
        return bool(is_causal)
    causal = nn.Transformer.generate_square_subsequent_mask(size, device=mask.device, dtype=mask.dtype)
    return mask.shape == causal.shape and bool((mask == causal).all())


def _residual(x, sublayers, norm_first: bool):
    """Each ``(norm, block, dropout)`` as a residual sub-layer, pre- or post-norm."""
    for norm, block, dropout in sublayers:
        x = x + dropout(block(norm(x))) if norm_first else norm(x + dropout(block(x)))
    return x


class _Layer(nn.Module):
    """What both layer kinds share: the self-attention, the feed-forward block and the rotary."""

    cross = False  # the decoder layer's attention over the memory

    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, activation=F.relu,
                 layer_norm_eps=1e-5, batch_first=False, norm_first=False, bias=True, device=None,
                 dtype=None, *, rotary=None):
        super().__init__()
        # torch.nn's modules, in torch.nn's order (so that one seed gives one set of weights)
        factory = dict(device=device, dtype=dtype)
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias,
                                            batch_first=batch_first, **factory)
        if self.cross:
            self.multihead_attn = MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias,
                                                     batch_first=batch_first, **factory)
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias, **factory)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **factory)
        self.norm_first = norm_first
        sublayers = range(1, 4 if self.cross else 3)
        for i in sublayers:
            setattr(self, f"norm{i}", nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory))
        for i in sublayers:
            setattr(self, f"dropout{i}", nn.Dropout(dropout))
        self.activation = _activation(activation)
        self.batch_first, self.d_model = batch_first, d_model
        if rotary is not None and not isinstance(rotary, RotaryEmbedding):
            raise ValueError(f"fastseq Transformer: rotary must be a RotaryEmbedding or None, "
                             f"got {type(rotary).__name__}")
        self.rotary = rotary

    def _feed_forward(self, x):
        return self.linear2(self.dropout(self.activation(self.linear1(x))))

    def _self_attention(self, x, causal, mask):
        q, k, v = self.self_attn.in_projection(x)
        if self.rotary is not None:
            q, k = self.rotary(q, k, layout="bhnd")
        return self.self_attn.attend_heads(q, k, v, causal, mask)


class TransformerEncoderLayer(_Layer):
    """``torch.nn.TransformerEncoderLayer``: self-attention and a feed-forward block.

    ``forward(src, src_mask=None, src_key_padding_mask=None, is_causal=False)``: ``src``
    ``(B, S, E)`` with ``batch_first``, ``(S, B, E)`` without, or ``(S, E)``; returns its shape.
    """

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        layout = _layout(src, self.batch_first, "src", self.d_model)
        x = to_batch_first(src, layout)
        mask = merged_mask(src_mask, _padding(src_key_padding_mask, layout), is_causal, x.shape[0],
                           self.self_attn.num_heads, x.shape[1], x.shape[1], x.dtype)
        out = self.encode(x, is_causal, mask)
        return out[0] if layout == "unbatched" else to_batch_first(out, layout)

    def encode(self, x, causal, mask):
        """Batch-first ``x`` ``(B, S, E)`` with a fastseq mask (see :func:`merged_mask`)."""
        return _residual(x, ((self.norm1, lambda h: self._self_attention(h, causal, mask), self.dropout1),
                             (self.norm2, self._feed_forward, self.dropout2)), self.norm_first)


class TransformerDecoderLayer(_Layer):
    """``torch.nn.TransformerDecoderLayer``: self-attention, attention over the memory, feed-forward.

    ``forward(tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
    memory_key_padding_mask=None, tgt_is_causal=False, memory_is_causal=False)`` returns tgt's
    shape; :meth:`step` is one incremental decoding step over a cache.
    """

    cross = True

    def forward(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, tgt_is_causal=False, memory_is_causal=False):
        layout = _layout(tgt, self.batch_first, "tgt", self.d_model)
        if _layout(memory, self.batch_first, "memory", self.d_model) != layout:
            raise ValueError(f"fastseq Transformer: tgt {tuple(tgt.shape)} and memory "
                             f"{tuple(memory.shape)} must both be batched or both unbatched")
        x, memory = to_batch_first(tgt, layout), to_batch_first(memory, layout)
        masks = _decoder_masks(self.self_attn.num_heads, x, memory, tgt_mask, memory_mask,
                               _padding(tgt_key_padding_mask, layout),
                               _padding(memory_key_padding_mask, layout), tgt_is_causal,
                               memory_is_causal)
        out = self.decode(x, memory, *masks)
        return out[0] if layout == "unbatched" else to_batch_first(out, layout)

    def decode(self, x, memory, causal, mask, memory_causal, memory_mask):
        """Batch-first ``x`` ``(B, T, E)`` and ``memory`` ``(B, S, E)`` with fastseq masks."""
        def cross_attention(h):
            q, k, v = self.multihead_attn.in_projection(h, memory)
            return self.multihead_attn.attend_heads(q, k, v, memory_causal, memory_mask)

        return _residual(x, ((self.norm1, lambda h: self._self_attention(h, causal, mask), self.dropout1),
                             (self.norm2, cross_attention, self.dropout2),
                             (self.norm3, self._feed_forward, self.dropout3)), self.norm_first)

    def step(self, x, cache: KVCache, memory_k, memory_v, memory_mask):
        """New target tokens ``x`` ``(B, T, E)`` (batch first) after those in ``cache``.

        Their keys and values are appended to ``cache`` (in place); they attend causally to every
        cached token and to the memory's keys/values ``(B, heads, S, head_dim)``.
        """
        def self_attention(h):
            q, k, v = self.self_attn.in_projection(h)
            if self.rotary is not None:
                q, k = self.rotary(q, k, positions=cache.lengths, layout="bhnd",
                                   max_positions=cache.k.shape[2])
            cache.lengths = kv_cache_append(cache.k, cache.v, k, v, cache.lengths)
            return self.self_attn.out_projection(attention_decode(q, cache.k, cache.v, cache.lengths))

        def cross_attention(h):
            q = self.multihead_attn.query_heads(h)
            return self.multihead_attn.attend_heads(q, memory_k, memory_v, mask=memory_mask)

        return _residual(x, ((self.norm1, self_attention, self.dropout1),
                             (self.norm2, cross_attention, self.dropout2),
                             (self.norm3, self._feed_forward, self.dropout3)), self.norm_first)


def _decoder_masks(heads, x, memory, tgt_mask, memory_mask, tgt_key_padding_mask,
                   memory_key_padding_mask, tgt_is_causal, memory_is_causal):
    """``(causal, mask, memory_causal, memory_mask)`` for batch-first ``x`` and ``memory``."""
    batch, length, _ = x.shape
    mask = merged_mask(tgt_mask, tgt_key_padding_mask, tgt_is_causal, batch, heads, length, length,
                       x.dtype)
    memory_mask = merged_mask(memory_mask, memory_key_padding_mask, memory_is_causal, batch, heads,
                              length, memory.shape[1], x.dtype)
    return bool(tgt_is_causal), mask, bool(memory_is_causal), memory_mask


def _clones(layer, kind, n: int, owner: str, name: str) -> nn.ModuleList:
    """``n`` deep copies of ``layer``, which must be a fastseq ``kind``."""
    if not isinstance(layer, kind):
        raise ValueError(f"fastseq {owner}: {name} must be a fastseq {kind.__name__}, got "
                         f"{type(layer).__name__}")
    return nn.ModuleList([copy.deepcopy(layer) for _ in range(n)])


class TransformerEncoder(nn.Module):
    """``torch.nn.TransformerEncoder``: ``num_layers`` copies of ``encoder_layer``, then ``norm``.

    ``forward(src, mask=None, src_key_padding_mask=None, is_causal=None)``; a ``mask`` equal to
    the causal mask runs the causal kernel without reading it (``is_causal=None`` checks).
    """

    def __init__(self, encoder_layer, num_layers, norm=None, enable_nested_tensor=True,
                 mask_check=True):
        super().__init__()
        self.layers = _clones(encoder_layer, TransformerEncoderLayer, num_layers,
                              "TransformerEncoder", "encoder_layer")
        self.num_layers, self.norm = num_layers, norm
        self.enable_nested_tensor, self.mask_check = enable_nested_tensor, mask_check

    def forward(self, src, mask=None, src_key_padding_mask=None, is_causal=None):
        first = self.layers[0]
        layout = _layout(src, first.batch_first, "src", first.d_model)
        x = to_batch_first(src, layout)
        causal = is_causal_mask(mask, is_causal, x.shape[1])
        merged = merged_mask(mask, _padding(src_key_padding_mask, layout), causal, x.shape[0],
                             first.self_attn.num_heads, x.shape[1], x.shape[1], x.dtype)
        for layer in self.layers:
            x = layer.encode(x, causal, merged)
        if self.norm is not None:
            x = self.norm(x)
        return x[0] if layout == "unbatched" else to_batch_first(x, layout)


@dataclasses.dataclass
class TransformerDecoderCache:
    """What incremental decoding keeps: per layer, the KV cache of the self-attention and the
    memory's keys/values ``(B, heads, S, head_dim)``; ``memory_mask`` the memory's padding as a
    keep-mask ``(B, 1, 1, S)`` (or None)."""

    self_attn: list[KVCache]
    memory_k: list[torch.Tensor]
    memory_v: list[torch.Tensor]
    memory_mask: torch.Tensor | None

    @property
    def lengths(self) -> torch.Tensor:
        """``(B,)`` tokens decoded so far per sequence."""
        return self.self_attn[0].lengths

    def reorder(self, index: torch.Tensor, memory: bool = True) -> None:
        """Keep the sequences ``index`` ``(B',)`` picks, in that order, in place.

        ``memory=False`` leaves the memory's keys, values and mask as they are: right for beam
        search, whose beams of one source share its memory and are only ever reordered among
        themselves.
        """
        for cache in self.self_attn:
            cache.k, cache.v = cache.k.index_select(0, index), cache.v.index_select(0, index)
            cache.lengths = cache.lengths.index_select(0, index)
        if not memory:
            return
        self.memory_k = [k.index_select(0, index) for k in self.memory_k]
        self.memory_v = [v.index_select(0, index) for v in self.memory_v]
        if self.memory_mask is not None:
            self.memory_mask = self.memory_mask.index_select(0, index)


class TransformerDecoder(nn.Module):
    """``torch.nn.TransformerDecoder``: ``num_layers`` copies of ``decoder_layer``, then ``norm``.

    ``forward(tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
    memory_key_padding_mask=None, tgt_is_causal=None, memory_is_causal=False, *, cache=None)``.
    With a ``cache`` from :meth:`new_cache`, ``tgt`` holds only the new tokens, ``memory`` may be
    None and the masks must be: the cache is causal and knows the memory's padding.
    """

    def __init__(self, decoder_layer, num_layers, norm=None):
        super().__init__()
        self.layers = _clones(decoder_layer, TransformerDecoderLayer, num_layers,
                              "TransformerDecoder", "decoder_layer")
        self.num_layers, self.norm = num_layers, norm

    def forward(self, tgt, memory=None, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, tgt_is_causal=None, memory_is_causal=False, *,
                cache: TransformerDecoderCache | None = None):
        first = self.layers[0]
        layout = _layout(tgt, first.batch_first, "tgt", first.d_model)
        x = to_batch_first(tgt, layout)
        if cache is not None:
            given = [name for name, value in (("tgt_mask", tgt_mask), ("memory_mask", memory_mask),
                                              ("tgt_key_padding_mask", tgt_key_padding_mask),
                                              ("memory_key_padding_mask", memory_key_padding_mask))
                     if value is not None]
            if given or memory_is_causal:
                raise ValueError(f"fastseq TransformerDecoder: with a cache, decoding is causal and "
                                 f"the memory's padding was given to new_cache; got "
                                 f"{given or 'memory_is_causal'}")
            for layer, self_cache, k, v in zip(self.layers, cache.self_attn, cache.memory_k,
                                               cache.memory_v, strict=True):
                x = layer.step(x, self_cache, k, v, cache.memory_mask)
        else:
            if _layout(memory, first.batch_first, "memory", first.d_model) != layout:
                raise ValueError(f"fastseq Transformer: tgt {tuple(tgt.shape)} and memory "
                                 f"{tuple(memory.shape)} must both be batched or both unbatched")
            memory = to_batch_first(memory, layout)
            causal = is_causal_mask(tgt_mask, tgt_is_causal, x.shape[1])
            masks = _decoder_masks(first.self_attn.num_heads, x, memory, tgt_mask, memory_mask,
                                   _padding(tgt_key_padding_mask, layout),
                                   _padding(memory_key_padding_mask, layout), causal, memory_is_causal)
            for layer in self.layers:
                x = layer.decode(x, memory, *masks)
        if self.norm is not None:
            x = self.norm(x)
        return x[0] if layout == "unbatched" else to_batch_first(x, layout)

    def new_cache(self, memory, max_len: int, memory_key_padding_mask=None) -> TransformerDecoderCache:
        """A cache for decoding up to ``max_len`` target tokens against ``memory`` (the encoder's
        output, in this module's layout); ``memory_key_padding_mask`` ``(B, S)``, True = padding."""
        first = self.layers[0]
        layout = _layout(memory, first.batch_first, "memory", first.d_model)
        if layout == "unbatched":
            raise ValueError("fastseq TransformerDecoder: new_cache takes a batched memory")
        if not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"fastseq TransformerDecoder: max_len must be a positive int, got {max_len!r}")
        memory = to_batch_first(memory, layout)
        batch, source, _ = memory.shape
        if memory_key_padding_mask is not None and memory_key_padding_mask.shape != (batch, source):
            raise ValueError(f"fastseq TransformerDecoder: memory_key_padding_mask must be "
                             f"({batch}, {source}), got {tuple(memory_key_padding_mask.shape)}")
        keep = None if memory_key_padding_mask is None else ~memory_key_padding_mask.view(batch, 1, 1, source)
        keys, values = zip(*(layer.multihead_attn.key_value_heads(memory) for layer in self.layers),
                           strict=True)
        attn = first.self_attn
        return TransformerDecoderCache(
            [KVCache.empty(batch, attn.num_heads, max_len, attn.head_dim, device=memory.device,
                           dtype=memory.dtype) for _ in self.layers],
            list(keys), list(values), keep)


class Transformer(nn.Module):
    """``torch.nn.Transformer`` on fastseq's attention (see the module docstring).

    ``forward(src, tgt, src_mask=None, tgt_mask=None, memory_mask=None, src_key_padding_mask=None,
    tgt_key_padding_mask=None, memory_key_padding_mask=None, src_is_causal=None,
    tgt_is_causal=None, memory_is_causal=False)`` returns tgt's shape. For decoding, run
    ``self.encoder`` once, then ``self.decoder`` with a cache (:meth:`TransformerDecoder.new_cache`).
    """

    def __init__(self, d_model=512, nhead=8, num_encoder_layers=6, num_decoder_layers=6,
                 dim_feedforward=2048, dropout=0.1, activation=F.relu, custom_encoder=None,
                 custom_decoder=None, layer_norm_eps=1e-5, batch_first=False, norm_first=False,
                 bias=True, device=None, dtype=None, *, rotary=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        options = dict(dim_feedforward=dim_feedforward, dropout=dropout, activation=activation,
                       layer_norm_eps=layer_norm_eps, batch_first=batch_first,
                       norm_first=norm_first, bias=bias, rotary=rotary, **factory)
        if custom_encoder is not None:
            self.encoder = custom_encoder
        else:
            layer = TransformerEncoderLayer(d_model, nhead, **options)
            norm = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
            self.encoder = TransformerEncoder(layer, num_encoder_layers, norm)
        if custom_decoder is not None:
            self.decoder = custom_decoder
        else:
            layer = TransformerDecoderLayer(d_model, nhead, **options)
            norm = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
            self.decoder = TransformerDecoder(layer, num_decoder_layers, norm)
        self._reset_parameters()
        self.d_model, self.nhead, self.batch_first = d_model, nhead, batch_first

    def _reset_parameters(self):
        """torch.nn.Transformer's initialisation: Xavier-uniform for every matrix."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src, tgt, src_mask=None, tgt_mask=None, memory_mask=None,
                src_key_padding_mask=None, tgt_key_padding_mask=None, memory_key_padding_mask=None,
                src_is_causal=None, tgt_is_causal=None, memory_is_causal=False):
        batch_dim = 0 if self.batch_first else 1
        if src.dim() != tgt.dim() or (src.dim() == 3 and src.shape[batch_dim] != tgt.shape[batch_dim]):
            raise ValueError(f"fastseq Transformer: src {tuple(src.shape)} and tgt "
                             f"{tuple(tgt.shape)} must have the same batch size")
        memory = self.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask,
                              is_causal=src_is_causal)
        return self.decoder(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                            tgt_key_padding_mask=tgt_key_padding_mask,
                            memory_key_padding_mask=memory_key_padding_mask,
                            tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)

    @staticmethod
    def generate_square_subsequent_mask(sz, device=None, dtype=None) -> torch.Tensor:
        """The causal mask ``(sz, sz)``: ``-inf`` above the diagonal, 0 elsewhere (torch.nn's)."""
        return nn.Transformer.generate_square_subsequent_mask(sz, device=device, dtype=dtype)
