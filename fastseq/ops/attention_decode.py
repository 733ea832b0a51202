"""Attention decoding over a KV cache, and the in-place cache append.

``torch.ops.fastseq.attention_decode`` runs the split-KV Triton kernels for a few query rows per
sequence against a long cache, bottom-right causal and aligned to each sequence's cache length (on
the CPU, torch's fused CPU kernel, as the attention op does).
It is an inference op: with inputs that require grad, :func:`attention_decode` runs the general
(differentiable) attention op with the same semantics instead.
"""

from __future__ import annotations

import functools

import torch

from fastseq import _backend
from fastseq.ops.attention import (
    attention,
    attention_op,
    check_key_lengths,
    check_qkv,
    last_dim_dense,
    lse_dtype,
    softmax_scale,
)
from fastseq.ops.checks import fail, refuse_untransformable, values_known
from fastseq.reference import attention as reference

MAX_DECODE_ROWS = 16

_fail = functools.partial(fail, "kv_cache_append")


def _decode_unsupported(q) -> dict[str, str]:
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return {"triton": f"dtype {q.dtype}"}
    if q.shape[-1] > 256:
        return {"triton": f"head dim {q.shape[-1]}"}
    return {}


@torch.library.custom_op("fastseq::attention_decode", mutates_args=())
def attention_decode_op(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_lengths: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode q (B, H, Lq <= 16, D) against caches (B, Hk, S, D); returns (out, lse (B, H, Lq))."""
    backend = _backend.choose("attention_decode", q.device, _decode_unsupported(q))
    if backend == "cpu":
        return _cpu_decode(q, k_cache, v_cache, cache_lengths, scale)
    if backend != "triton" or q.shape[2] > MAX_DECODE_ROWS:
        out, lse = reference.attention(q, k_cache, v_cache, causal=True, bottom_right=True,
                                       key_lengths=cache_lengths, scale=scale)
        return out, lse.to(lse_dtype(q.dtype))
    from fastseq.kernels import attention_decode as kernels

    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    if q.numel():
        kernels.decode(q, k_cache, v_cache, cache_lengths, out, lse, scale,
                       interpreted=_backend.triton_interpreted())
    return out, lse


def _cpu_decode(q, k_cache, v_cache, cache_lengths, scale):
    """Decoding through torch's fused CPU kernel, with each GQA group's query heads folded into the
    query rows, (B, Hk, G Lq, D), so that the caches are read as they are rather than repeated."""
    batch, heads, rows, dim = q.shape
    kv_heads = k_cache.shape[1]
    size = int(cache_lengths.max()) if q.numel() else 0
    if not size:  # no rows, or no keys to see
        return torch.zeros_like(q), q.new_full(q.shape[:-1], float("-inf"), dtype=lse_dtype(q.dtype))
    group = heads // kv_heads
    folded = q.reshape(batch, kv_heads, group * rows, dim).contiguous()
    # Slots past every sequence's length are cut off (a view); those past a shorter sequence's
    # length are zeroed in a copy: the kernel would read them, and uninitialised slots may be NaN.
    k_cache, v_cache = k_cache[:, :, :size], v_cache[:, :, :size]
    uniform = bool((cache_lengths == size).all())
    if not uniform:
        k_cache = reference.without_padding(k_cache, cache_lengths)
        v_cache = reference.without_padding(v_cache, cache_lengths)
    k_cache, v_cache = last_dim_dense(k_cache), last_dim_dense(v_cache)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if rows == 1 and uniform:
        out, lse = flash(folded, k_cache, v_cache, 0.0, False, scale=scale)  # sees every key
    else:
        seen = reference.visibility(batch, rows, size, causal=True, bottom_right=True,
                                    key_lengths=cache_lengths, device=q.device)
        if rows > 1:
            seen = seen.repeat(1, 1, group, 1)  # row g Lq + i is query row i of head g
        mask = torch.zeros(seen.shape, dtype=q.dtype, device=q.device).masked_fill(
            ~seen, float("-inf"))
        out, lse = flash(folded, k_cache, v_cache, 0.0, False,
                         attn_mask=mask.expand(batch, kv_heads, group * rows, size), scale=scale)
        lse = lse.masked_fill(~seen.any(-1), float("-inf"))  # rows that see no key, as elsewhere
    return (out.reshape(batch, heads, rows, dim).contiguous(),
            lse.to(lse_dtype(q.dtype)).reshape(batch, heads, rows).contiguous())


@attention_decode_op.register_fake
def _(q, k_cache, v_cache, cache_lengths, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=lse_dtype(q.dtype))


def attention_decode(q, k_cache, v_cache, cache_lengths, *, scale=None, return_lse=False):
    """Attention of a few new query rows over a KV cache (flash-decoding).

    Args:
        q: ``(B, H, Lq, D)`` with ``Lq`` up to 16 (e.g. 1 for greedy decoding, more for
            speculative decoding), the newest ``Lq`` tokens of each sequence.
        k_cache, v_cache: ``(B, Hk, S, D)`` with ``H % Hk == 0``; only the first
            ``cache_lengths[b]`` positions of sequence ``b`` are valid, and they include the
            ``Lq`` new tokens (append them first, e.g. with :func:`kv_cache_append`).
        cache_lengths: ``(B,)`` int32/int64, or None when every cache is full (``S`` valid
            positions).
        scale: softmax scale, default ``1/sqrt(D)``.

    Returns:
        ``out`` ``(B, H, Lq, D)`` (and ``lse`` ``(B, H, Lq)`` float32, float64 for float64
        inputs, when ``return_lse``); query ``i`` sees keys ``n <= cache_lengths[b] - Lq + i``.
        Differentiable inputs take the general attention op (same result, with a backward).
    """
    check_qkv(q, k_cache, v_cache, "attention_decode")
    refuse_untransformable("attention_decode", q, k_cache, v_cache)
    cache_lengths = check_key_lengths(cache_lengths, q, k_cache, "attention_decode", "cache_lengths")
    if cache_lengths is None:
        cache_lengths = torch.full((q.shape[0],), k_cache.shape[2], device=q.device)
    scale = softmax_scale(q, scale, "attention_decode")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache)):
        out, lse = attention_op(q, k_cache, v_cache, None, cache_lengths, None, None, False,
                                True, True, scale, 0.0, 0)
    elif q.shape[2] > MAX_DECODE_ROWS:
        return attention(q, k_cache, v_cache, causal=True, causal_alignment="bottom_right",
                         key_lengths=cache_lengths, scale=scale, return_lse=return_lse)
    else:
        out, lse = attention_decode_op(q, k_cache, v_cache, cache_lengths, scale)
    return (out, lse) if return_lse else out


def kv_cache_append(k_cache, v_cache, k, v, cache_lengths):
    """Write new keys/values ``(B, Hk, L, D)`` into the caches ``(B, Hk, S, D)`` in place.

    Sequence ``b`` receives them at positions ``cache_lengths[b] .. cache_lengths[b] + L - 1``.
    Returns the new lengths ``cache_lengths + L`` (a new tensor). One scatter per cache, no loop.
    """
    if k_cache.dim() != 4 or k.dim() != 4 or k_cache.shape != v_cache.shape or k.shape != v.shape:
        _fail(f"caches must be 4-D of one shape and k/v 4-D of one shape, got k_cache "
              f"{tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}, k {tuple(k.shape)}, "
              f"v {tuple(v.shape)}")
    batch, heads, new, dim = k.shape
    if (k_cache.shape[0], k_cache.shape[1], k_cache.shape[3]) != (batch, heads, dim):
        _fail(f"k {tuple(k.shape)} does not fit the cache {tuple(k_cache.shape)}")
    if cache_lengths is None:
        _fail("cache_lengths is required: the number of positions already in each cache, (B,)")
    cache_lengths = check_key_lengths(cache_lengths, k, k_cache, "kv_cache_append", "cache_lengths")
    if values_known(cache_lengths) and batch:
        if int(cache_lengths.max()) + new > k_cache.shape[2]:
            _fail(f"appending {new} tokens overflows the cache of {k_cache.shape[2]} positions")
    index = cache_lengths.to(torch.int64)[:, None] + torch.arange(new, device=k.device)
    index = index.view(batch, 1, new, 1).expand(batch, heads, new, dim)
    k_cache.scatter_(2, index, k.to(k_cache.dtype))
    v_cache.scatter_(2, index, v.to(v_cache.dtype))
    return cache_lengths + new
