"""Short-context cross-attention as a torch op: ``torch.ops.fastseq.cross_attention``.

For U-Net blocks where many image tokens attend to at most 256 context tokens: the Triton kernel
keeps each (batch, head)'s K and V on chip while it sweeps the queries, reads every tensor
through strides (feature maps in NCHW or channels-last need no copy, see :func:`feature_map_heads`)
and can add a residual into its output. Longer contexts, other dtypes or head dims take the
general attention op.
"""

from __future__ import annotations

import functools

import torch

from fastseq import _backend
from fastseq.ops.attention import (
    attention_backend,
    attention_op,
    check_key_lengths,
    check_qkv,
    laid_out_like,
    lse_dtype,
    softmax_scale,
)
from fastseq.ops.checks import fail, refuse_untransformable

MAX_CONTEXT = 256

_fail = functools.partial(fail, "cross_attention")


def _unsupported(q, k) -> dict[str, str]:
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return {"triton": f"dtype {q.dtype}"}
    if k.shape[2] > MAX_CONTEXT:
        return {"triton": f"context of {k.shape[2]} tokens (short-context kernel takes <= 256)"}
    if q.shape[-1] > 256:
        return {"triton": f"head dim {q.shape[-1]}"}
    if _backend.triton_importable():
        return _on_chip_reason(q, k)
    return {}


def _on_chip_reason(q, k) -> dict[str, str]:
    """Why K and V of one (batch, head) cannot stay on chip, if they cannot."""
    from fastseq.kernels import cross_attention as kernels

    if kernels.tile_elements(q.shape[-1], k.shape[2]) > kernels.MAX_TILE:
        return {"triton": f"head dim {q.shape[-1]} with {k.shape[2]} context tokens (the kernel "
                          f"takes up to 128 x 256 or 256 x 128, rounded up to powers of two)"}
    if q.device.type != "cuda":
        return {}
    need = kernels.shared_memory_bytes(q.shape[2], q.shape[3], k.shape[2], q.shape[0] * q.shape[1],
                                       q.element_size())
    have = torch.cuda.get_device_properties(q.device).shared_memory_per_block_optin
    if need <= have:
        return {}
    return {"triton": f"{q.dtype} head dim {q.shape[-1]} with {k.shape[2]} context tokens needs "
                      f"{need // 1024} KiB of shared memory, the GPU has {have // 1024} KiB"}


def _use_kernel(q, k) -> bool:
    return _backend.choose("cross_attention", q.device, _unsupported(q, k)) == "triton"


def _general(q, k, v, context_lengths, scale):
    return attention_op(q, k, v, None, context_lengths, None, None, False, False, False, scale, 0.0, 0)


@torch.library.custom_op("fastseq::cross_attention", mutates_args=())
def cross_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context_lengths: torch.Tensor | None,
    residual: torch.Tensor | None, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(q k^T * scale) v (+ residual)`` and the LSE; q (B, H, Lq, D), k/v (B, H, Lk, D).

    The output has the memory layout of ``residual`` (or q) when that is dense.
    """
    if not _use_kernel(q, k):
        attn, lse = _general(q, k, v, context_lengths, scale)
        if residual is None:  # the general path's output, unless it is laid out unlike q
            return laid_out_like(attn, q), lse
        return torch.add(attn, residual, out=torch.empty_like(residual)), lse
    out = torch.empty_like(residual if residual is not None else q)
    from fastseq.kernels import cross_attention as kernels

    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    if q.numel():
        kernels.forward(q, k, v, out, lse, context_lengths, residual, scale,
                        interpreted=_backend.triton_interpreted())
    return out, lse


@cross_attention_op.register_fake
def _(q, k, v, context_lengths, residual, scale):
    out = torch.empty_like(residual if residual is not None else q)
    return out, q.new_empty(q.shape[:-1], dtype=lse_dtype(q.dtype))


@torch.library.custom_op("fastseq::cross_attention_backward", mutates_args=())
def cross_attention_backward_op(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: torch.Tensor,
    context_lengths: torch.Tensor | None, scale: float, out: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of :func:`cross_attention_op` (the residual's gradient is ``grad_out``).

    ``out`` is the forward's output when it holds the attention alone (no residual added), else
    None; the general path needs it and recomputes it when it is not given.
    """
    if not _use_kernel(q, k):
        if out is None:
            attn, attn_lse = _general(q, k, v, context_lengths, scale)
        else:
            attn, attn_lse = out, lse
        return torch.ops.fastseq.attention_backward(
            grad_out, q, k, v, attn, attn_lse, None, context_lengths, None, None, False, False,
            False, scale, 0.0, 0, attention_backend(q, v, 0.0))
    from fastseq.kernels import cross_attention as kernels

    dq = torch.empty_like(q)
    if not q.numel():
        return dq, torch.zeros_like(k), torch.zeros_like(v)
    dk, dv = kernels.backward(grad_out, q, k, v, lse, context_lengths, dq, scale,
                              interpreted=_backend.triton_interpreted())
    return dq, dk.to(k.dtype), dv.to(v.dtype)


@cross_attention_backward_op.register_fake
def _(grad_out, q, k, v, lse, context_lengths, scale, out):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, context_lengths, residual, scale = inputs
    # The general path's backward needs the attention alone: keep the output when it is that.
    attn = output[0] if residual is None and not _use_kernel(q, k) else None
    ctx.save_for_backward(q, k, v, output[1], context_lengths, attn)
    ctx.scale, ctx.has_residual = scale, residual is not None


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, lse, context_lengths, attn = ctx.saved_tensors
    dq, dk, dv = cross_attention_backward_op(grad_out, q, k, v, lse, context_lengths, ctx.scale,
                                             attn)
    return dq, dk, dv, None, grad_out if ctx.has_residual else None, None


cross_attention_op.register_autograd(_backward, setup_context=_setup)


def feature_map_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """View a feature map (B, C, H, W), NCHW or channels-last, as (B, heads, H*W, C/heads).

    A view, never a copy: the kernels read it through its strides.
    """
    if not isinstance(heads, int) or heads < 1:
        _fail(f"heads must be a positive int, got {heads!r}")
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] % heads:
        _fail(f"feature map must be (B, C, H, W) with C divisible by heads={heads}, got {tuple(x.shape)}")
    return x.flatten(2).unflatten(1, (heads, x.shape[1] // heads)).transpose(2, 3)


def cross_attention(q, k, v, *, context_lengths=None, residual=None, scale=None, return_lse=False):
    """Cross-attention of many queries over a short context, fused.

    Args:
        q: ``(B, H, Lq, D)``, any strides (e.g. :func:`feature_map_heads` of a feature map).
        k, v: ``(B, H, Lk, D)`` context keys and values, ``1 <= Lk``; the fused kernel takes
            ``Lk <= 256`` (longer contexts run the general attention kernel).
        context_lengths: ``(B,)`` ints: context tokens past ``context_lengths[b]`` are padding.
        residual: optional tensor of q's shape added to the output (any strides).
        scale: softmax scale, default ``1/sqrt(D)``.

    Returns:
        ``out`` of q's shape and dtype (laid out like ``residual`` when given), and the LSE
        ``(B, H, Lq)`` float32 (float64 for float64 inputs)
        when ``return_lse``. Differentiable in q, k, v and residual.
    """
    check_qkv(q, k, v, "cross_attention")
    refuse_untransformable("cross_attention", q, k, v)
    if k.shape[1] != q.shape[1]:
        _fail(f"q has {q.shape[1]} heads but the context has {k.shape[1]}")
    if k.shape[2] == 0:
        _fail("the context is empty (Lk = 0)")
    context_lengths = check_key_lengths(context_lengths, q, k, "cross_attention", "context_lengths")
    if residual is not None and (residual.shape != q.shape or residual.dtype != q.dtype
                                 or residual.device != q.device):
        _fail(f"residual must match q {tuple(q.shape)} {q.dtype} on {q.device}, got "
              f"{tuple(residual.shape)} {residual.dtype} on {residual.device}")
    scale = softmax_scale(q, scale, "cross_attention")
    out, lse = cross_attention_op(q, k, v, context_lengths, residual, scale)
    return (out, lse) if return_lse else out
