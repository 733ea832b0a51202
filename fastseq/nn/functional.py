"""Functional drop-ins: ``scaled_dot_product_attention`` with the signature of torch's."""

from __future__ import annotations

import functools
import warnings

import torch.nn.functional as F

from fastseq.ops.attention import attention


@functools.cache
def _warn_once(reason):
    warnings.warn(f"fastseq scaled_dot_product_attention: {reason}; using torch's", stacklevel=3)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False):
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``, on fastseq's kernels.

    Same arguments and semantics: ``(B, H, L, E)`` inputs (3-D ``(B, L, E)`` too), bool masks with
    True = attend or additive float masks, ``is_causal`` top-left aligned, ``enable_gqa`` for fewer
    k/v heads. One deliberate difference: a query row whose keys are all masked gives zeros where
    torch gives NaN. Inputs of other ranks go to torch's implementation (with a one-time warning).
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
    if query.shape[1] != key.shape[1] and not enable_gqa:
        raise ValueError(
            f"scaled_dot_product_attention: query has {query.shape[1]} heads and key "
            f"{key.shape[1]}; pass enable_gqa=True for grouped-query attention"
        )
    return attention(query, key, value, causal=is_causal, attn_mask=attn_mask,
                     dropout_p=dropout_p, scale=scale)
