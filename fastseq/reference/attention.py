"""Scaled dot-product attention in plain PyTorch, with every option of ``fastseq.attention``.

Materialises the ``(B, H, Lq, Lk)`` score matrix: the oracle for the fused kernels and the eager
baseline of the benchmarks, not a fast path.
"""

from __future__ import annotations

import math

import torch


def visibility(batch, lq, lk, *, causal=False, bottom_right=False, key_lengths=None, device=None):
    """Boolean ``(B, 1, Lq, Lk)``: which key each query may see under causality and key lengths."""
    rows = torch.arange(lq, device=device)[:, None]
    cols = torch.arange(lk, device=device)[None, :]
    klen = (key_lengths.to(torch.int64) if key_lengths is not None
            else torch.full((batch,), lk, device=device))
    klen = klen.clamp(max=lk)[:, None, None, None]
    seen = cols < klen
    if causal:
        shift = (klen - lq) if bottom_right else 0
        seen = seen & (cols <= rows + shift)
    return seen


def without_padding(t, key_lengths):
    """k or v ``(B, H, L, D)`` with every position at or past ``key_lengths[b]`` zeroed (``t``
    itself when there are no lengths): padding is never read, whatever it holds (NaN, Inf)."""
    if key_lengths is None:
        return t
    padded = torch.arange(t.shape[2], device=t.device) >= key_lengths.to(torch.int64)[:, None]
    return t.masked_fill(padded[:, None, :, None], 0)


def dropout_keep_mask(shape, p, seed, device):
    """The keep mask this reference uses for dropout: a function of ``seed`` alone."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.rand(shape, generator=generator, device=device) >= p


def attention(q, k, v, *, causal=False, bottom_right=False, attn_mask=None, key_lengths=None,
              dropout_p=0.0, seed=0, keep_mask=None, scale=None, compute_dtype=None):
    """Attention of q ``(B, H, Lq, D)`` over k/v ``(B, Hk, Lk, D)``; returns ``(out, lse)``.

    ``attn_mask``: bool (True = keep) or additive, broadcastable to ``(B, H, Lq, Lk)``. Rows that see
    no key give zeros and ``lse = -inf``. Dropout zeroes probabilities where ``keep_mask`` (or the
    mask drawn from ``seed``) is False and rescales the rest by ``1 / (1 - p)``. Math in
    ``compute_dtype`` (default fp32, fp64 for fp64 inputs); ``out`` in q's dtype, ``lse`` fp32/fp64.
    """
    batch, heads, lq, dim = q.shape
    lk = k.shape[2]
    compute = compute_dtype or torch.promote_types(q.dtype, torch.float32)
    group = heads // k.shape[1]
    k, v = without_padding(k, key_lengths), without_padding(v, key_lengths)
    k = k.to(compute).repeat_interleave(group, dim=1)
    v = v.to(compute).repeat_interleave(group, dim=1)
    scale = (1.0 / math.sqrt(dim) if dim else 1.0) if scale is None else scale
    scores = (q.to(compute) @ k.transpose(-1, -2)) * scale
    seen = visibility(batch, lq, lk, causal=causal, bottom_right=bottom_right,
                      key_lengths=key_lengths, device=q.device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            seen = seen & attn_mask
        else:
            scores = scores + attn_mask.to(compute)
    scores = scores.masked_fill(~seen, float("-inf"))
    # Rows that see no key (masked out, or -inf in an additive mask) take the log-sum-exp of zeros,
    # so that its gradient stays finite, and then lse = -inf and probabilities 0.
    sees = torch.isfinite(scores).any(dim=-1)
    lse = torch.logsumexp(scores.masked_fill(~sees[..., None], 0.0), dim=-1)
    lse = lse.masked_fill(~sees, float("-inf"))
    probs = torch.exp(scores - lse.masked_fill(~sees, float("inf"))[..., None])
    if dropout_p > 0:
        if keep_mask is None:
            keep_mask = dropout_keep_mask(probs.shape, dropout_p, seed, q.device)
        probs = probs * keep_mask / (1 - dropout_p)
    return (probs @ v).to(q.dtype), lse
