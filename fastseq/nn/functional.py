"""Functional drop-ins: ``scaled_dot_product_attention`` with the signature of torch's."""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

from fastseq.ops.attention import attention


@functools.cache
def _warn_once(reason):
    warnings.warn(f"fastseq scaled_dot_product_attention: {reason}; using torch's", stacklevel=3)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False):
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``, on fastseq's kernels.

    Same arguments and semantics: ``(B, H, L, E)`` inputs (3-D ``(B, L, E)`` too), batch and head
    dimensions of size 1 broadcast as torch broadcasts them (as views: nothing is copied), bool
    masks with True = attend or additive float masks, ``is_causal`` top-left aligned,
    ``enable_gqa`` for fewer k/v heads. A query row whose keys are all masked gives zeros, as
    torch's does. Inputs of other ranks go to torch's implementation (with a one-time warning).
    """
    if is_causal and attn_mask is not None:
        raise ValueError("scaled_dot_product_attention: attn_mask must be None when is_causal=True")
    ranks = {query.dim(), key.dim(), value.dim()}
    if ranks == {3}:
        mask = attn_mask.unsqueeze(-3) if attn_mask is not None and attn_mask.dim() == 3 else attn_mask
        out = scaled_dot_product_attention(query[:, None], key[:, None], value[:, None], mask,
                                           dropout_p, is_causal, scale, enable_gqa)
        return out[:, 0]
    if ranks != {4}:
        _warn_once(f"inputs of rank {sorted(ranks)}")
        return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal,
                                              scale=scale, enable_gqa=enable_gqa)
    query, key, value = _broadcast(query, key, value, enable_gqa)
    return attention(query, key, value, causal=is_causal, attn_mask=attn_mask,
                     dropout_p=dropout_p, scale=scale)


def _broadcast(query, key, value, enable_gqa):
    """q, k, v with their batch dimensions broadcast against each other, and their head
    dimensions too unless ``enable_gqa`` (then k/v keep their fewer heads): expanded views."""
    dims = 1 if enable_gqa else 2
    try:
        shape = torch.broadcast_shapes(*(t.shape[:dims] for t in (query, key, value)))
    except RuntimeError:
        raise ValueError(
            f"scaled_dot_product_attention: query {tuple(query.shape)}, key {tuple(key.shape)} "
            f"and value {tuple(value.shape)} must agree (or be 1) in batch"
            + ("" if enable_gqa else " and heads; pass enable_gqa=True for grouped-query "
                                      "attention")) from None
    return tuple(t.expand(*shape, *t.shape[dims:]) for t in (query, key, value))
