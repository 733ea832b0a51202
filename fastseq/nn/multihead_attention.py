"""``MultiheadAttention``: a drop-in for ``torch.nn.MultiheadAttention`` on fused attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastseq.ops.attention import attention


def _keep_mask(attn_mask, key_padding_mask, batch, heads, lq, lk, dtype):
    """Merge torch MHA masks (bool True = *ignore*, or additive) into one fastseq mask.

    Returns None, a bool keep-mask, or an additive mask, broadcastable to (B, H, Lq, Lk).
    """
    parts = []
    if attn_mask is not None:
        mask = attn_mask if attn_mask.dim() == 2 else attn_mask.view(batch, heads, lq, lk)
        parts.append(mask)
    if key_padding_mask is not None:
        parts.append(key_padding_mask.view(batch, 1, 1, lk))
    if not parts:
        return None
    for p in parts:  # as torch: an integer mask is neither a keep-mask nor a bias
        if p.dtype != torch.bool and not p.is_floating_point():
            raise AssertionError(f"only bool and floating types of masks are supported, got {p.dtype}")
    if all(p.dtype == torch.bool for p in parts):
        keep = ~parts[0]
        for p in parts[1:]:
            keep = keep & ~p
        return keep
    additive = None
    for p in parts:
        if p.dtype == torch.bool:
            p = torch.zeros(p.shape, dtype=dtype, device=p.device).masked_fill(p, float("-inf"))
        additive = p.to(dtype) if additive is None else additive + p.to(dtype)
    return additive


def merged_mask(attn_mask, key_padding_mask, is_causal, batch, heads, lq, lk, dtype):
    """The mask fastseq's attention takes for torch's ``attn_mask`` / ``key_padding_mask``.

    With ``is_causal`` the ``attn_mask`` is taken to be the causal mask (torch's hint), which the
    kernel applies itself: only the padding remains.
    """
    return _keep_mask(None if is_causal else attn_mask, key_padding_mask, batch, heads, lq, lk, dtype)


def to_batch_first(t, layout):
    """``(L, B, E)`` / ``(B, L, E)`` / ``(L, E)`` -> ``(B, L, E)``; its own inverse but for
    unbatched inputs."""
    if layout == "unbatched":
        return t[None]
    return t if layout == "batch_first" else t.transpose(0, 1)


class MultiheadAttention(nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` with its attention computed by fastseq's fused kernel.

    Same constructor, parameters (state dicts load both ways) and forward signature. Calls that
    request attention weights (``need_weights=True``, torch's default) or use ``bias_k``/``bias_v``
    or ``add_zero_attn`` run torch's own implementation, so the weights are exact; pass
    ``need_weights=False`` for the fused path. A query whose keys are all masked attends to
    nothing (zeros before the output projection), as torch's does in training mode; torch's
    inference fast path gives NaN there.
    """

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if need_weights or self.bias_k is not None or self.add_zero_attn:
            return super().forward(query, key, value, key_padding_mask=key_padding_mask,
                                   need_weights=need_weights, attn_mask=attn_mask,
                                   average_attn_weights=average_attn_weights, is_causal=is_causal)
        if is_causal and attn_mask is None:
            raise RuntimeError("MultiheadAttention: is_causal=True needs attn_mask (the causal "
                               "mask), as in torch.nn.MultiheadAttention")
        self._check_shapes(query, key, value)
        layout = "unbatched" if query.dim() == 2 else "batch_first" if self.batch_first else "seq_first"
        if layout == "unbatched" and key_padding_mask is not None:
            key_padding_mask = key_padding_mask[None]
        self_attention = key is query and value is query
        query, key, value = (to_batch_first(t, layout) for t in (query, key, value))
        if self_attention:
            key = value = None
        out = self._attend(query, key, value, key_padding_mask, attn_mask, is_causal)
        return (out[0] if layout == "unbatched" else to_batch_first(out, layout)), None

    def _check_shapes(self, query, key, value):
        """query (L, B, E), key (S, B, kdim), value (S, B, vdim), batch first or unbatched."""
        rank = query.dim()
        batch_dim = 0 if self.batch_first else 1
        for name, t, width in (("query", query, self.embed_dim), ("key", key, self.kdim),
                               ("value", value, self.vdim)):
            if t.dim() != rank or rank not in (2, 3) or t.shape[-1] != width:
                raise ValueError(f"fastseq MultiheadAttention: {name} must be {rank}-D with "
                                 f"{width} features (as query is {rank}-D), got {tuple(t.shape)}")
        if rank == 3 and not query.shape[batch_dim] == key.shape[batch_dim] == value.shape[batch_dim]:
            raise ValueError(f"fastseq MultiheadAttention: query, key and value must agree in batch, "
                             f"got {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
        length_dim = 1 if self.batch_first and rank == 3 else 0
        if key.shape[length_dim] != value.shape[length_dim]:
            raise ValueError(f"fastseq MultiheadAttention: key and value must have the same "
                             f"length, got {tuple(key.shape)} and {tuple(value.shape)}")

    def _projection_weights(self):
        if self._qkv_same_embed_dim:
            weights = self.in_proj_weight.chunk(3)
        else:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        biases = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None,) * 3
        return weights, biases

    def _split_heads(self, x, parts):
        """``(B, L, parts * E)`` -> ``parts`` views ``(B, heads, L, head_dim)``."""
        batch, length, _ = x.shape
        x = x.view(batch, length, parts, self.num_heads, self.head_dim)
        return [t.transpose(1, 2) for t in x.unbind(2)]

    def query_heads(self, query):
        """``(B, L, E)`` -> the queries ``(B, heads, L, head_dim)``."""
        (wq, _, _), (bq, _, _) = self._projection_weights()
        return self._split_heads(F.linear(query, wq, bq), 1)[0]

    def key_value_heads(self, key, value=None):
        """``(B, S, kdim)`` (and ``(B, S, vdim)``) -> keys and values ``(B, heads, S, head_dim)``;
        ``value=None`` takes both from ``key`` in one matmul (cross-attention over a memory)."""
        if value is None and self._qkv_same_embed_dim:
            bias = None if self.in_proj_bias is None else self.in_proj_bias[self.embed_dim:]
            return self._split_heads(F.linear(key, self.in_proj_weight[self.embed_dim:], bias), 2)
        (_, wk, wv), (_, bk, bv) = self._projection_weights()
        value = key if value is None else value
        return self._split_heads(F.linear(key, wk, bk), 1) + self._split_heads(F.linear(value, wv, bv), 1)

    def in_projection(self, query, key=None, value=None):
        """Project batch-first inputs ``(B, L, E)`` to heads: ``q, k, v`` each ``(B, heads, L, D)``.

        ``key=None`` is self-attention (q, k and v from ``query`` in one matmul); ``value=None``
        takes the values from ``key``.
        """
        if key is None and self._qkv_same_embed_dim:
            return self._split_heads(F.linear(query, self.in_proj_weight, self.in_proj_bias), 3)
        k, v = self.key_value_heads(query if key is None else key, value)
        return self.query_heads(query), k, v

    def out_projection(self, out):
        """Heads ``(B, heads, L, D)`` -> ``(B, L, E)`` through ``out_proj``."""
        batch, _, length, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, self.embed_dim))

    def _attend(self, query, key, value, key_padding_mask, attn_mask, is_causal):
        """Batch-first ``(B, L, E)`` in (``key=value=None`` for self-attention), ``(B, L, E)`` out."""
        batch, lq, _ = query.shape
        lk = lq if key is None else key.shape[1]
        q, k, v = self.in_projection(query, key, value)
        mask = merged_mask(attn_mask, key_padding_mask, is_causal, batch, self.num_heads, lq, lk,
                           q.dtype)
        return self.attend_heads(q, k, v, is_causal, mask)

    def attend_heads(self, q, k, v, causal=False, mask=None):
        """Fused attention of heads ``(B, heads, L, D)`` over ``(B, heads, S, D)`` (with this
        module's dropout in training), through ``out_proj``: ``(B, L, E)``. ``mask``: a fastseq
        mask (see :func:`merged_mask`)."""
        out = attention(q, k, v, causal=causal, attn_mask=mask,
                        dropout_p=self.dropout if self.training else 0.0)
        return self.out_projection(out)
