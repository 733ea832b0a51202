"""Attention decoding over a KV cache, and the in-place cache append.

``torch.ops.fastseq.attention_decode`` runs the split-KV Triton kernels for a few query rows per
sequence against a long cache, bottom-right causal and aligned to each sequence's cache length (on
the CPU, the C++ kernel of csrc/cpu/attention_decode.cpp).
It is an inference op: with inputs that require grad, :func:`attention_decode` runs the general
(differentiable) attention op with the same semantics instead.
"""

from __future__ import annotations

import functools

import torch

from fastseq import _backend, _extension
from fastseq.ops.attention import (
    attention,
    attention_op,
    check_key_lengths,
    check_qkv,
    lse_dtype,
    softmax_scale,
)
from fastseq.ops.checks import fail, refuse_untransformable, values_known
from fastseq.reference import attention as reference

MAX_DECODE_ROWS = 16

_fail = functools.partial(fail, "kv_cache_append")


def _decode_unsupported(q) -> dict[str, str]:
    return _decode_unsupported_by(q.dtype, q.shape[-1])


def _decode_unsupported_by(dtype: torch.dtype, head_dim: int) -> dict[str, str]:
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return {"triton": f"dtype {dtype}"}
    if head_dim > 256:
        return {"triton": f"head dim {head_dim}"}
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
    """The C++ kernel (csrc/cpu/attention_decode.cpp): each query row reads the keys it sees where
    they lie (no mask, no copy dropping the padding), grouped-query heads their group's rows."""
    _extension.load()  # a graph loaded by torch.export may run this before anything else did
    return tuple(torch.ops.fastseq.attention_decode_cpu(q, k_cache, v_cache, cache_lengths, scale))


# torch.compile runs the choice while tracing and keeps its answer.
@torch.compiler.assume_constant_result
def _cpu_kernel_chosen(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether CPU calls of these inputs go to the C++ kernel (built, and not forced elsewhere)."""
    return _extension.has_op("attention_decode_cpu") and _backend.choose(
        "attention_decode", torch.device("cpu"), _decode_unsupported_by(dtype, head_dim)) == "cpu"


def _decode(q, k_cache, v_cache, cache_lengths, scale):
    """:func:`attention_decode_op`; CPU calls go straight to the C++ kernel, eager or traced: the
    custom op's Python wrapper costs more than a decoding step's attention itself."""
    if q.is_cpu and _cpu_kernel_chosen(q.dtype, q.shape[-1]):
        return torch.ops.fastseq.attention_decode_cpu(q, k_cache, v_cache, cache_lengths, scale)
    return attention_decode_op(q, k_cache, v_cache, cache_lengths, scale)


@torch.compiler.assume_constant_result
def _append_kernel_chosen() -> bool:
    """Whether CPU cache appends go to the C++ op (built, and the reference not forced)."""
    return _extension.has_op("kv_cache_append_cpu") and _backend.forced_backend() in (None, "cpu")


def _register_fake() -> None:
    """The C++ kernels' fake implementations (shapes for torch.compile), where they are built."""
    if _extension.has_op("attention_decode_cpu"):
        torch.library.register_fake("fastseq::attention_decode_cpu")(_decode_like)
    if _extension.has_op("kv_cache_append_cpu"):
        torch.library.register_fake("fastseq::kv_cache_append_cpu")(lambda *args: None)


def _decode_like(q, k_cache, v_cache, cache_lengths, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=lse_dtype(q.dtype))


attention_decode_op.register_fake(_decode_like)
_register_fake()


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
        out, lse = _decode(q, k_cache, v_cache, cache_lengths, scale)
    return (out, lse) if return_lse else out


def kv_cache_append(k_cache, v_cache, k, v, cache_lengths):
    """Write new keys/values ``(B, Hk, L, D)`` into the caches ``(B, Hk, S, D)`` in place.

    Sequence ``b`` receives them at positions ``cache_lengths[b] .. cache_lengths[b] + L - 1``.
    Returns the new lengths ``cache_lengths + L`` (a new tensor). On the CPU, the C++ op copies
    the rows in place (traced too: a scatter there would copy each whole cache per step);
    elsewhere one scatter per cache.
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
    # The C++ op has no autograd: keys or values that take gradients go through the scatter.
    differentiable = torch.is_grad_enabled() and any(
        t.requires_grad for t in (k_cache, v_cache, k, v))
    if k.is_cpu and not differentiable and _append_kernel_chosen():
        torch.ops.fastseq.kv_cache_append_cpu(k_cache, v_cache, k, v, cache_lengths)
        return cache_lengths + new
    index = cache_lengths.to(torch.int64)[:, None] + torch.arange(new, device=k.device)
    index = index.view(batch, 1, new, 1).expand(batch, heads, new, dim)
    k_cache.scatter_(2, index, k.to(k_cache.dtype))
    v_cache.scatter_(2, index, v.to(v_cache.dtype))
    return cache_lengths + new
