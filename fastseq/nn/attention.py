"""``Attention``: the modern attention block (q/k/v projections, GQA, rotary, KV cache)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from fastseq.nn.linear import Linear
from fastseq.nn.rotary import RotaryEmbedding
from fastseq.ops.attention import attention
from fastseq.ops.attention_decode import attention_decode, kv_cache_append


@dataclasses.dataclass
class KVCache:
    """Keys and values of past tokens: ``k``/``v`` ``(B, Hk, S, D)``, ``lengths`` ``(B,)``."""

    k: torch.Tensor
    v: torch.Tensor
    lengths: torch.Tensor

    @classmethod
    def empty(cls, batch, kv_heads, max_len, head_dim, *, device=None, dtype=None) -> KVCache:
        """A cache for ``batch`` sequences of up to ``max_len`` tokens, all empty."""
        shape = (batch, kv_heads, max_len, head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype),
                   torch.zeros(shape, device=device, dtype=dtype),
                   torch.zeros(batch, device=device, dtype=torch.int64))


class Attention(nn.Module):
    """Multi-head self-attention with grouped-query heads, optional rotary and a KV cache.

    Args:
        dim: model width. num_heads: query heads. num_kv_heads: key/value heads (default
            ``num_heads``; fewer for GQA/MQA). head_dim: default ``dim // num_heads``.
        bias: biases in the q/k/v projections; ``out_bias`` in the output projection (default:
            ``bias``; Qwen2 has the first without the second). causal: mask future tokens.
        rotary: a :class:`RotaryEmbedding`, ``True`` for one over the whole head dim, or None.
        dropout: attention dropout in training.

    ``forward(x (B, L, dim), positions=None, cache=None, key_lengths=None)`` returns
    ``(B, L, dim)``. With a :class:`KVCache`, the new tokens are rotated at their positions in the
    cache, appended to it (in place) and attend to everything cached so far; a step of up to 16
    tokens runs the split-KV decode kernels.
    """

    def __init__(self, dim, num_heads, num_kv_heads=None, head_dim=None, *, bias=False,
                 out_bias=None, causal=True, rotary=None, dropout=0.0, device=None, dtype=None):
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        for name, value in (("dim", dim), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Attention: {name} must be a positive int, got {value!r}")
        if num_heads % num_kv_heads:
            raise ValueError(f"Attention: num_heads ({num_heads}) must be a multiple of "
                             f"num_kv_heads ({num_kv_heads})")
        if head_dim is None and dim % num_heads:
            raise ValueError(f"Attention: dim ({dim}) must be a multiple of num_heads ({num_heads}), "
                             "or head_dim given")
        if head_dim is not None and (not isinstance(head_dim, int) or head_dim < 1):
            raise ValueError(f"Attention: head_dim must be a positive int, got {head_dim!r}")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = head_dim or dim // num_heads
        self.causal, self.dropout = causal, dropout
        factory = dict(device=device, dtype=dtype)
        self.q_proj = Linear(dim, num_heads * self.head_dim, bias=bias, **factory)
        self.k_proj = Linear(dim, num_kv_heads * self.head_dim, bias=bias, **factory)
        self.v_proj = Linear(dim, num_kv_heads * self.head_dim, bias=bias, **factory)
        self.o_proj = Linear(num_heads * self.head_dim, dim,
                                bias=bias if out_bias is None else out_bias, **factory)
        self.rotary = RotaryEmbedding(self.head_dim) if rotary is True else rotary

    def new_cache(self, batch, max_len, *, device=None, dtype=None) -> KVCache:
        """An empty :class:`KVCache` sized for this layer."""
        return KVCache.empty(batch, self.num_kv_heads, max_len, self.head_dim,
                             device=device or self.q_proj.weight.device,
                             dtype=dtype or self.q_proj.weight.dtype)

    def forward(self, x, *, positions=None, cache: KVCache | None = None, key_lengths=None,
                attn_mask=None):
        """Attend over ``x`` ``(B, L, dim)``; returns ``(B, L, dim)`` in x's dtype.

        Args:
            positions: rotary positions as :meth:`RotaryEmbedding.forward` takes them (an int
                offset, ``(B,)`` per-sequence offsets or ``(B, L)`` ids); default ``0 .. L-1``,
                or each sequence's cache length onward with a cache.
            cache: a :class:`KVCache` (see :meth:`new_cache`): the new keys and values are
                appended to it in place, and the queries attend to every cached key of their
                sequence (causally among the new ones when the layer is causal).
            key_lengths: ``(B,)`` ints, without a cache: keys at or past ``key_lengths[b]`` are
                padding and never read.
            attn_mask: a bool keep-mask (True = attend) or an additive mask broadcastable to
                ``(B, heads, L, L)``, or ``(B, heads, L, S)`` over a cache of ``S`` slots,
                applied with causality (e.g. the keys of left padding, or a sliding window).
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.q_proj.in_features:
            raise ValueError(f"fastseq Attention: x must be (B, L, {self.q_proj.in_features}), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim)
        if self.rotary is not None:
            at = cache.lengths if cache is not None and positions is None else positions
            # Positions from the cache stay below its size: the tables are sized without a sync.
            bound = cache.k.shape[2] if cache is not None and positions is None else None
            q, k = self.rotary(q, k, positions=at, max_positions=bound)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, L, D) views
        if cache is None:
            out = attention(q, k, v, causal=self.causal, key_lengths=key_lengths,
                            attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0)
        else:
            if key_lengths is not None:
                raise ValueError("fastseq Attention: with a cache, the cache's lengths say which "
                                 "keys are valid; key_lengths must be None")
            cache.lengths = kv_cache_append(cache.k, cache.v, k, v, cache.lengths)
            if attn_mask is not None:  # over the whole cache, (B, heads, L, S)
                out = attention(q, cache.k, cache.v, causal=self.causal,
                                causal_alignment="bottom_right", key_lengths=cache.lengths,
                                attn_mask=attn_mask)
            elif self.causal:
                out = attention_decode(q, cache.k, cache.v, cache.lengths)
            else:  # every cached key of the sequence, the new ones included
                out = attention(q, cache.k, cache.v, key_lengths=cache.lengths)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))
