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
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query[:, None], key[:, None], value[:, None]
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask[None]
        elif self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        out = self._attend(query, key, value, key_padding_mask, attn_mask, is_causal)
        if unbatched:
            out = out[:, 0]
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, None

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

    def _attend(self, query, key, value, key_padding_mask, attn_mask, is_causal):
        """Sequence-first (L, B, E) in, (L, B, E) out."""
        lq, batch, _ = query.shape
        lk = key.shape[0]
        heads, head_dim = self.num_heads, self.head_dim
        (wq, wk, wv), (bq, bk, bv) = self._projection_weights()

        def heads_view(x, w, b, length):
            return F.linear(x, w, b).view(length, batch, heads, head_dim).permute(1, 2, 0, 3)

        q = heads_view(query, wq, bq, lq)
        k = heads_view(key, wk, bk, lk)
        v = heads_view(value, wv, bv, lk)
        mask = None if is_causal else _keep_mask(attn_mask, key_padding_mask, batch, heads, lq, lk,
                                                 q.dtype)
        if is_causal and key_padding_mask is not None:
            mask = _keep_mask(None, key_padding_mask, batch, heads, lq, lk, q.dtype)
        out = attention(q, k, v, causal=is_causal, attn_mask=mask,
                        dropout_p=self.dropout if self.training else 0.0)
        out = out.permute(2, 0, 1, 3).reshape(lq, batch, self.embed_dim)
        return self.out_proj(out)
