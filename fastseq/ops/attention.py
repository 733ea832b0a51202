"""Scaled dot-product attention as torch ops: ``torch.ops.fastseq.attention`` and its backward.

The forward op returns ``(out, lse)``; its autograd runs ``torch.ops.fastseq.attention_backward``.
Backends: ``triton`` (the fused FlashAttention-2-style kernels; on CUDA, or on CPU tensors under the
Triton interpreter) and the plain-PyTorch path (``reference``; also what the ``cpu`` backend runs
for now), which materialises the score matrix and is differentiated by recomputation.

:func:`attention` is the native API; it checks inputs and brings masks to the canonical form
(broadcast views, no copies) before calling the op.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch

from fastseq import _backend
from fastseq.reference import attention as reference

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
ALIGNMENTS = ("top_left", "bottom_right")


def _unsupported(q, v) -> dict[str, str]:
    reason = None
    if q.dtype not in KERNEL_DTYPES:
        reason = f"dtype {q.dtype}"
    elif q.shape[-1] > MAX_HEAD_DIM or q.shape[-1] < 1:
        reason = f"head dim {q.shape[-1]} (kernel takes 1..{MAX_HEAD_DIM})"
    elif v.shape[-1] != q.shape[-1]:
        reason = f"value dim {v.shape[-1]} != query/key dim {q.shape[-1]}"
    return {} if reason is None else {"triton": reason, "cuda": reason}


def _use_triton(q, v) -> bool:
    return _backend.choose("attention", q.device, _unsupported(q, v)) == "triton"


@torch.library.custom_op("fastseq::attention", mutates_args=())
def attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    key_lengths: torch.Tensor | None,
    causal: bool,
    bottom_right: bool,
    scale: float,
    dropout_p: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (B, H, Lq, D) over k, v (B, Hk, Lk, D); returns (out, lse (B, H, Lq) fp32).

    ``attn_mask`` is None or already expanded to (B, H, Lq, Lk) (stride-0 views are fine).
    """
    if _use_triton(q, v):
        from fastseq.kernels import attention as kernels

        out = torch.empty(q.shape[:-1] + v.shape[-1:], dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        if q.numel() and out.numel():
            kernels.forward(q, k, v, out, lse, attn_mask, key_lengths, causal, bottom_right, scale,
                            dropout_p, seed, interpreted=_backend.triton_interpreted())
        else:
            lse.fill_(float("-inf"))
            out.zero_()
        return out, lse
    out, lse = _reference(q, k, v, attn_mask, key_lengths, causal, bottom_right, scale, dropout_p,
                          seed)
    return out, lse.float()


def _reference(q, k, v, attn_mask, key_lengths, causal, bottom_right, scale, dropout_p, seed):
    return reference.attention(q, k, v, causal=causal, bottom_right=bottom_right,
                               attn_mask=attn_mask, key_lengths=key_lengths, dropout_p=dropout_p,
                               seed=seed, scale=scale)


@attention_op.register_fake
def _(q, k, v, attn_mask, key_lengths, causal, bottom_right, scale, dropout_p, seed):
    out = q.new_empty(q.shape[:-1] + v.shape[-1:])
    return out, q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("fastseq::attention_backward", mutates_args=())
def attention_backward_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    attn_mask: torch.Tensor | None,
    key_lengths: torch.Tensor | None,
    causal: bool,
    bottom_right: bool,
    scale: float,
    dropout_p: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of :func:`attention_op` given the gradient of its output."""
    if _use_triton(q, v):
        from fastseq.kernels import attention as kernels

        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        if q.numel() and k.numel():
            kernels.backward(grad_out, q, k, v, out, lse, dq, dk, dv, attn_mask, key_lengths,
                             causal, bottom_right, scale, dropout_p, seed,
                             interpreted=_backend.triton_interpreted())
        else:
            dq.zero_(), dk.zero_(), dv.zero_()
        return dq, dk, dv
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        recomputed, _ = _reference(*leaves, attn_mask, key_lengths, causal, bottom_right, scale,
                                   dropout_p, seed)
        grads = torch.autograd.grad(recomputed, leaves, grad_out, allow_unused=True)
    return tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves, strict=True))


@attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, attn_mask, key_lengths, causal, bottom_right, scale, dropout_p,
      seed):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, attn_mask, key_lengths, *config = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, attn_mask, key_lengths)
    ctx.config = config


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, attn_mask, key_lengths = ctx.saved_tensors
    dq, dk, dv = attention_backward_op(grad_out.contiguous(), q, k, v, out, lse, attn_mask,
                                       key_lengths, *ctx.config)
    return dq, dk, dv, None, None, None, None, None, None, None


attention_op.register_autograd(_backward, setup_context=_setup)


# ------------------------------------------------------------------------------------------------
# Checks and the public function
# ------------------------------------------------------------------------------------------------


def _fail(message):
    raise ValueError(f"fastseq attention: {message}")


def _check_qkv(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            _fail(f"{name} must be a 4-D tensor (B, H, L, D), got {shape}")
        if t.dtype != q.dtype:
            _fail(f"{name} dtype {t.dtype} must match q dtype {q.dtype}")
        if t.device != q.device:
            _fail(f"{name} is on {t.device} but q is on {q.device}")
    if not q.is_floating_point():
        _fail(f"q must be floating point, got {q.dtype}")
    if k.shape[:3] != v.shape[:3]:
        _fail(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree in batch, heads and length")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        _fail(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch and head dim")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        _fail(f"q heads ({q.shape[1]}) must be a multiple of k/v heads ({k.shape[1]}) (GQA)")


def _canonical_mask(attn_mask, q, k):
    if attn_mask is None:
        return None
    full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if attn_mask.device != q.device:
        _fail(f"attn_mask is on {attn_mask.device} but q is on {q.device}")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        _fail(f"attn_mask must be bool or floating point, got {attn_mask.dtype}")
    try:
        return attn_mask.expand(full)
    except RuntimeError:
        _fail(f"attn_mask {tuple(attn_mask.shape)} does not broadcast to (B, H, Lq, Lk) = {full}")


def _check_key_lengths(key_lengths, q, k):
    if key_lengths is None:
        return None
    if key_lengths.dtype not in (torch.int32, torch.int64) or key_lengths.shape != (q.shape[0],):
        _fail(f"key_lengths must be an int tensor of shape ({q.shape[0]},), got "
              f"{key_lengths.dtype} {tuple(key_lengths.shape)}")
    if key_lengths.device != q.device:
        _fail(f"key_lengths is on {key_lengths.device} but q is on {q.device}")
    if not torch.compiler.is_compiling() and key_lengths.numel():
        if bool(key_lengths.min() < 0) or bool(key_lengths.max() > k.shape[2]):
            _fail(f"key_lengths must lie in [0, Lk={k.shape[2]}], got {key_lengths.tolist()}")
    return key_lengths


@functools.cache
def _warn_once(reason):
    warnings.warn(f"fastseq attention: {reason}; using the plain-PyTorch path", stacklevel=4)


def attention(q, k, v, *, causal=False, causal_alignment="top_left", attn_mask=None,
              key_lengths=None, dropout_p=0.0, seed=None, scale=None, return_lse=False):
    """Fused scaled dot-product attention.

    Args:
        q: ``(B, H, Lq, D)``; k, v: ``(B, Hk, Lk, D)`` with ``H % Hk == 0`` (GQA/MQA). Any strides;
            float16, bfloat16 or float32 (float32 matmuls use TF32 only if
            ``torch.backends.cuda.matmul.allow_tf32``).
        causal: mask keys after each query. ``causal_alignment``: ``"top_left"`` (query ``i`` sees
            keys ``<= i``, as SDPA's ``is_causal``) or ``"bottom_right"`` (the last query sees all
            keys, as a KV cache needs; aligned to each batch row's key length).
        attn_mask: bool (True = attend) or additive float mask broadcastable to (B, H, Lq, Lk).
        key_lengths: ``(B,)`` ints: keys at or past ``key_lengths[b]`` are padding and skipped.
        dropout_p: dropout on the attention probabilities; ``seed`` makes it reproducible (drawn
            from torch's generator when None).
        scale: softmax scale, default ``1/sqrt(D)``.
        return_lse: also return the log-sum-exp of each row's scores, ``(B, H, Lq)`` float32.

    Returns:
        ``out`` ``(B, H, Lq, D)`` in q's dtype (rows that see no key are zeros), and ``lse`` when
        ``return_lse``. Differentiable in q, k, v.
    """
    _check_qkv(q, k, v)
    if causal_alignment not in ALIGNMENTS:
        _fail(f"causal_alignment must be one of {ALIGNMENTS}, got {causal_alignment!r}")
    if not 0.0 <= dropout_p < 1.0:
        _fail(f"dropout_p must be in [0, 1), got {dropout_p}")
    mask = _canonical_mask(attn_mask, q, k)
    key_lengths = _check_key_lengths(key_lengths, q, k)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if dropout_p > 0 and seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    args = (causal, causal_alignment == "bottom_right", scale, float(dropout_p), int(seed or 0))
    if mask is not None and mask.requires_grad and torch.is_grad_enabled():
        _warn_once("attn_mask requires grad")
        out, lse = _reference(q, k, v, mask, key_lengths, *args)
    else:
        out, lse = attention_op(q, k, v, mask, key_lengths, *args)
    return (out, lse) if return_lse else out
