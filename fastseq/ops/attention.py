"""Scaled dot-product attention as torch ops: ``torch.ops.fastseq.attention`` and its backward.

The forward op returns ``(out, lse)``; its autograd runs ``torch.ops.fastseq.attention_backward``.
Backends: ``triton`` (the fused FlashAttention-2-style kernels; on CUDA, or on CPU tensors under the
Triton interpreter); ``cpu``, which delegates to torch's own fused CPU kernel (the flash-attention
kernel behind ``F.scaled_dot_product_attention``, which also returns the log-sum-exp), with masks,
key lengths and bottom-right causality folded into one additive mask, GQA by repeating k/v, and
rotary applied before and undone on the gradients after; unmasked float32 attention with a head
dim of at most :data:`SMALL_HEAD_DIM` goes instead to fastseq's own C++ kernel
(``attention_small_head_forward`` / ``_backward``, csrc/cpu/attention.cpp) on AVX-512 CPUs,
where torch's kernel, built of GEMMs of depth D, is slowest; and ``reference``, the plain-PyTorch path,
which materialises the score matrix and is differentiated by recomputation. Dropout on the CPU
takes the reference path: its mask is a function of ``seed`` there, as in the Triton kernel.

:func:`attention` is the native API; it checks inputs and brings masks to the canonical form
(broadcast views, no copies) before calling the op.
"""

from __future__ import annotations

import functools
import math

import torch

from fastseq import _backend, _extension
from fastseq.ops.checks import (
    KERNEL_DTYPES,
    fail,
    out_of_range,
    refuse_untransformable,
    values_known,
    warn_once,
)
from fastseq.ops.rotary import no_heads  # (importing it registers torch.ops.fastseq.rotary_)
from fastseq.reference import attention as reference
from fastseq.reference import rotary as rotary_reference

MAX_HEAD_DIM = 256
# Head dims up to this take csrc/cpu/attention.cpp on the CPU: at 8 it ran 2.2x torch's flash
# kernel forward and 3.3x backward (16 heads of 1024 tokens); at 16, 0.9x and 0.5x (256 tokens).
SMALL_HEAD_DIM = 8
ALIGNMENTS = ("top_left", "bottom_right")


def softmax_scale(q: torch.Tensor, scale, op: str = "attention") -> float:
    """``scale`` as a float, by default ``1/sqrt(D)`` of q's head dim (1 for an empty head dim,
    whose scores are all zero whatever the scale)."""
    if scale is None:
        return 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] else 1.0
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        fail(op, f"scale must be a finite number, got {scale!r}")
    return float(scale)


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the log-sum-exp the attention ops return for inputs of ``dtype``: float32,
    float64 for float64 inputs (whose gradients need it to stay float64-accurate)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _unsupported(q, v) -> dict[str, str]:
    reason = None
    if q.dtype not in KERNEL_DTYPES:
        reason = f"dtype {q.dtype}"
    elif q.shape[-1] > MAX_HEAD_DIM or q.shape[-1] < 1:
        reason = f"head dim {q.shape[-1]} (kernel takes 1..{MAX_HEAD_DIM})"
    elif v.shape[-1] != q.shape[-1]:
        value_dim = f"value dim {v.shape[-1]} != query/key dim {q.shape[-1]}"
        return {"triton": value_dim, "cuda": value_dim, "cpu": value_dim}
    return {} if reason is None else {"triton": reason, "cuda": reason}


def attention_backend(q, v, dropout_p) -> str:
    unsupported = _unsupported(q, v)
    if dropout_p > 0:
        unsupported["cpu"] = "dropout (torch's CPU kernel draws its own mask)"
    return _backend.choose("attention", q.device, unsupported)


@torch.library.custom_op("fastseq::attention", mutates_args=())
def attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    key_lengths: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    rotary_interleaved: bool,
    causal: bool,
    bottom_right: bool,
    scale: float,
    dropout_p: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (B, H, Lq, D) over k, v (B, Hk, Lk, D); returns (out, lse (B, H, Lq)).

    ``lse`` is float32, float64 for float64 inputs (:func:`lse_dtype`).

    ``attn_mask`` is None or already expanded to (B, H, Lq, Lk) (stride-0 views are fine);
    ``cos``/``sin`` are None or (S, R/2) rotary tables applied to q and k inside the kernel.
    """
    backend = attention_backend(q, v, dropout_p)
    if backend == "cpu":
        return _cpu_forward(q, k, v, attn_mask, key_lengths, cos, sin, rotary_interleaved, causal,
                            bottom_right, scale)
    if backend == "triton":
        from fastseq.kernels import attention as kernels

        out = output_like(q, v)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        if q.numel() and out.numel():
            kernels.forward(q, k, v, out, lse, attn_mask, key_lengths, cos, sin,
                            rotary_interleaved, causal, bottom_right, scale, dropout_p, seed,
                            interpreted=_backend.triton_interpreted())
        else:
            lse.fill_(float("-inf"))
            out.zero_()
        return out, lse
    out, lse = _reference(q, k, v, attn_mask, key_lengths, cos, sin, rotary_interleaved, causal,
                          bottom_right, scale, dropout_p, seed)
    return _as_output(out, q, v), lse.to(lse_dtype(q.dtype))


def output_like(q, v, device=None):
    """An empty output of the attention of ``q`` over ``v``: in q's memory layout when the value
    dim is q's (heads of a ``(B, L, H, D)`` projection, viewed as ``(B, H, L, D)``, come back in
    that layout, so that merging the heads again is a view), else contiguous. ``device="meta"``
    gives the layout without memory."""
    if v.shape[-1] == q.shape[-1]:
        return torch.empty_like(q, device=device)
    return q.new_empty(q.shape[:-1] + v.shape[-1:], device=device)


def _as_output(t, q, v):
    """``t`` (the attention of q over v) in the layout of :func:`output_like`, copied only when
    it is not in it already."""
    if t.stride() == output_like(q, v, device="meta").stride():
        return t
    return output_like(q, v).copy_(t)


def query_positions(batch, lq, lk, key_lengths, bottom_right, device):
    """Rotary position of each query row, ``(B, Lq)``: ``m``, or ``m + Lk_b - Lq`` bottom-right."""
    rows = torch.arange(lq, device=device).expand(batch, lq)
    if not bottom_right:
        return rows
    klen = key_lengths if key_lengths is not None else torch.full((batch,), lk, device=device)
    return (rows + (klen.to(torch.int64) - lq)[:, None]).clamp(min=0)


def _rotate_bhnd(x, cos, sin, positions, interleaved, conjugate=False):
    """Reference rotation of a (B, H, L, D) tensor (positions None: token n at n)."""
    rotated = rotary_reference.rotate(x.transpose(1, 2), cos[None], sin[None], positions, 0,
                                      2 * cos.shape[-1], interleaved, conjugate)
    return rotated.transpose(1, 2)


def _rotated(q, k, cos, sin, key_lengths, interleaved, bottom_right):
    """q and k rotated by the rotary tables (as they are when there are none)."""
    if cos is None:
        return q, k
    qpos = query_positions(q.shape[0], q.shape[2], k.shape[2], key_lengths, bottom_right, q.device)
    return (_rotate_bhnd(q, cos, sin, qpos, interleaved),
            _rotate_bhnd(k, cos, sin, None, interleaved))


def _reference(q, k, v, attn_mask, key_lengths, cos, sin, rotary_interleaved, causal,
               bottom_right, scale, dropout_p, seed):
    q, k = _rotated(q, k, cos, sin, key_lengths, rotary_interleaved, bottom_right)
    return reference.attention(q, k, v, causal=causal, bottom_right=bottom_right,
                               attn_mask=attn_mask, key_lengths=key_lengths, dropout_p=dropout_p,
                               seed=seed, scale=scale)


def _unbroadcast(mask):
    """The smallest tensor that expands back to ``mask``: stride-0 dimensions narrowed to one."""
    for dim, stride in enumerate(mask.stride()):
        if stride == 0 and mask.shape[dim] > 0:
            mask = mask.narrow(dim, 0, 1)
    return mask


def _cpu_additive_mask(q, k, attn_mask, key_lengths, causal, bottom_right):
    """``(is_causal, mask)`` for torch's CPU kernel: top-left causality alone stays a flag; any other
    visibility rule becomes an additive mask in q's dtype, broadcast to (B, H, Lq, Lk)."""
    batch, heads, lq, _ = q.shape
    lk = k.shape[2]
    if attn_mask is None and key_lengths is None and not (causal and bottom_right and lq != lk):
        return causal, None
    if key_lengths is not None or causal:
        seen = reference.visibility(batch, lq, lk, causal=causal, bottom_right=bottom_right,
                                    key_lengths=key_lengths, device=q.device)
    else:
        seen = None
    bias = None
    if attn_mask is not None:
        small = _unbroadcast(attn_mask)
        if small.dtype == torch.bool:
            seen = small if seen is None else seen & small
        else:  # torch's kernel takes the mask in q's dtype: finite values stay finite
            info = torch.finfo(q.dtype)
            bias = torch.where(small.isneginf(), small, small.clamp(info.min, info.max))
            bias = bias.to(q.dtype)
    if seen is not None:
        if bias is None:
            bias = torch.zeros(seen.shape, dtype=q.dtype, device=q.device)
        bias = bias.masked_fill(~seen, float("-inf"))
    return False, bias.expand(batch, heads, lq, lk)


def _repeat_heads(t, heads):
    """k or v (B, Hk, L, D) with each head repeated for its group of query heads: (B, H, L, D)."""
    return t if t.shape[1] == heads else t.repeat_interleave(heads // t.shape[1], dim=1)


def last_dim_dense(t):
    """``t`` with unit stride in its last dimension, which torch's CPU kernels assume."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def laid_out_like(t, like):
    """``t`` in the memory layout of ``torch.empty_like(like)`` (what the fake impl promises)."""
    if like.is_contiguous() and t.stride() == like.stride():
        return t  # what empty_like(like) would be: no need to allocate it
    want = torch.empty_like(like)
    return t if t.stride() == want.stride() else want.copy_(t)


@functools.cache
def _small_head_kernel_built() -> bool:
    """Whether csrc/cpu/attention.cpp is built and this CPU runs its AVX-512 code (elsewhere it
    would run scalar code, slower than torch's kernel)."""
    return (_extension.has_op("attention_small_head_forward")
            and torch.backends.cpu.get_cpu_capability() == "AVX512")


def _takes_small_head_kernel(q, v, is_causal, mask) -> bool:
    """Whether a CPU call (after masks were folded) goes to fastseq's small-head-dim kernel."""
    return (not is_causal and mask is None and q.dtype == torch.float32
            and 1 <= q.shape[-1] <= SMALL_HEAD_DIM and v.shape[-1] == q.shape[-1]
            and _small_head_kernel_built())


def _cpu_forward(q, k, v, attn_mask, key_lengths, cos, sin, rotary_interleaved, causal,
                 bottom_right, scale):
    if not q.numel() or not k.shape[2]:  # no rows, or no keys to see
        return (output_like(q, v).zero_(),
                q.new_full(q.shape[:-1], float("-inf"), dtype=lse_dtype(q.dtype)))
    q_in = q
    q, k = _rotated(q, k, cos, sin, key_lengths, rotary_interleaved, bottom_right)
    k, v = reference.without_padding(k, key_lengths), reference.without_padding(v, key_lengths)
    q, k, v = (last_dim_dense(t) for t in (q, k, v))
    is_causal, mask = _cpu_additive_mask(q, k, attn_mask, key_lengths, causal, bottom_right)
    heads = q.shape[1]
    if _takes_small_head_kernel(q, v, is_causal, mask):
        out, lse = torch.ops.fastseq.attention_small_head_forward(
            q, _repeat_heads(k, heads), _repeat_heads(v, heads), scale)
        return _as_output(out, q_in, v), lse
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, _repeat_heads(k, heads), _repeat_heads(v, heads), 0.0, is_causal, attn_mask=mask,
        scale=scale)
    if mask is not None:  # rows that see no key: torch's kernel leaves lse 0, ours says -inf
        lse = lse.masked_fill((_unbroadcast(mask) == float("-inf")).all(-1), float("-inf"))
    # The kernel's output is (B, L, H, D) in memory: the layout of q when q is a projection's
    # heads (no copy then); the log-sum-exp is promised dense (B, H, L).
    return _as_output(out, q_in, v), lse.to(lse_dtype(q.dtype)).contiguous()


def _cpu_backward(grad_out, q, k, v, out, lse, attn_mask, key_lengths, cos, sin, rotary_interleaved,
                  causal, bottom_right, scale):
    q_in, k_in, v_in = q, k, v
    if not q.numel() or not k.shape[2]:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    q, k = _rotated(q, k, cos, sin, key_lengths, rotary_interleaved, bottom_right)
    k, v = reference.without_padding(k, key_lengths), reference.without_padding(v, key_lengths)
    q, k, v, out, grad_out = (last_dim_dense(t) for t in (q, k, v, out, grad_out))
    is_causal, mask = _cpu_additive_mask(q, k, attn_mask, key_lengths, causal, bottom_right)
    heads, kv_heads = q.shape[1], k.shape[1]
    if _takes_small_head_kernel(q, v, is_causal, mask):
        dq, dk, dv = torch.ops.fastseq.attention_small_head_backward(
            grad_out, q, _repeat_heads(k, heads), _repeat_heads(v, heads), out, lse, scale)
    else:
        lse = lse.masked_fill(lse == float("-inf"), 0.0).to(torch.promote_types(q.dtype,
                                                                               torch.float32))
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, _repeat_heads(k, heads), _repeat_heads(v, heads), out, lse, 0.0,
            is_causal, attn_mask=mask, scale=scale)
    if heads != kv_heads:
        dk = dk.unflatten(1, (kv_heads, heads // kv_heads)).sum(2)
        dv = dv.unflatten(1, (kv_heads, heads // kv_heads)).sum(2)
    if cos is not None:
        dq, dk = dq.contiguous(), dk.contiguous()
        _rotate_back(dq, dk, cos, sin, key_lengths, rotary_interleaved, bottom_right)
    return (laid_out_like(dq.to(q_in.dtype), q_in), laid_out_like(dk.to(k_in.dtype), k_in),
            laid_out_like(dv.to(v_in.dtype), v_in))


@attention_op.register_fake
def _(q, k, v, attn_mask, key_lengths, cos, sin, rotary_interleaved, causal, bottom_right, scale,
      dropout_p, seed):
    return output_like(q, v), q.new_empty(q.shape[:-1], dtype=lse_dtype(q.dtype))


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
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    rotary_interleaved: bool,
    causal: bool,
    bottom_right: bool,
    scale: float,
    dropout_p: float,
    seed: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of :func:`attention_op` given the gradient of its output.

    ``backend`` is the one the forward ran: the backward must run the same implementation
    (dropout masks differ between them).
    """
    if backend == "cpu":
        return _cpu_backward(grad_out, q, k, v, out, lse, attn_mask, key_lengths, cos, sin,
                             rotary_interleaved, causal, bottom_right, scale)
    if backend == "triton":
        from fastseq.kernels import attention as kernels

        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        if q.numel() and k.numel():
            kernels.backward(grad_out, q, k, v, out, lse, dq, dk, dv, attn_mask, key_lengths,
                             cos, sin, rotary_interleaved, causal, bottom_right, scale, dropout_p,
                             seed, interpreted=_backend.triton_interpreted())
            if cos is not None:
                _rotate_back(dq, dk, cos, sin, key_lengths, rotary_interleaved, bottom_right)
        else:
            dq.zero_(), dk.zero_(), dv.zero_()
        return dq, dk, dv
    # Autograd is off inside an op's implementation; torch.func differentiates the recomputation.
    def forward(q, k, v):
        return _reference(q, k, v, attn_mask, key_lengths, cos, sin, rotary_interleaved, causal,
                          bottom_right, scale, dropout_p, seed)[0]

    _, vjp = torch.func.vjp(forward, q, k, v)
    return vjp(grad_out)


def _rotate_back(dq, dk, cos, sin, key_lengths, interleaved, bottom_right):
    """Turn gradients w.r.t. rotated q/k into gradients w.r.t. q/k: the transposed rotation."""
    qpos = query_positions(dq.shape[0], dq.shape[2], dk.shape[2], key_lengths, bottom_right,
                           dq.device)
    table = (cos[None], sin[None])
    for grad, positions in ((dq.transpose(1, 2), qpos), (dk.transpose(1, 2), None)):
        torch.ops.fastseq.rotary_(grad, no_heads(grad), *table, positions, 0, 2 * cos.shape[-1],
                                  interleaved, True)


@attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, attn_mask, key_lengths, cos, sin, rotary_interleaved, causal,
      bottom_right, scale, dropout_p, seed, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, attn_mask, key_lengths, cos, sin, *config = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, attn_mask, key_lengths, cos, sin)
    dropout_p = config[-2]
    ctx.config = (*config, attention_backend(q, v, dropout_p))  # the forward's, same context
    ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, attn_mask, key_lengths, cos, sin = ctx.saved_tensors
    if grad_out is not None:
        grads = attention_backward_op(grad_out.contiguous(), *ctx.saved_tensors, *ctx.config)
    else:
        grads = (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v))
    if grad_lse is not None:
        # The log-sum-exp's own gradient (rarely wanted: merging partial attentions) goes
        # through the plain-PyTorch recomputation, whose memory is quadratic in the length.
        rotary_interleaved, causal, bottom_right, scale, *_ = ctx.config

        def lse_of(q, k):
            return _reference(q, k, v, attn_mask, key_lengths, cos, sin, rotary_interleaved,
                              causal, bottom_right, scale, 0.0, 0)[1]

        _, vjp = torch.func.vjp(lse_of, q, k)
        dq_lse, dk_lse = vjp(grad_lse.to(lse.dtype))
        grads = (grads[0] + dq_lse.to(q.dtype), grads[1] + dk_lse.to(k.dtype), grads[2])
    return *grads, *([None] * 10)


attention_op.register_autograd(_backward, setup_context=_setup)


# ------------------------------------------------------------------------------------------------
# Checks and the public function
# ------------------------------------------------------------------------------------------------


_fail = functools.partial(fail, "attention")


def check_qkv(q, k, v, op: str = "attention"):
    """q ``(B, Hq, Lq, D)``, k and v ``(B, Hk, Lk, D)`` of one floating dtype and device, with
    ``Hq`` a multiple of ``Hk``; errors name ``op``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            fail(op, f"{name} must be a 4-D tensor (B, H, L, D), got {shape}")
        if t.dtype != q.dtype:
            fail(op, f"{name} dtype {t.dtype} must match q dtype {q.dtype}")
        if t.device != q.device:
            fail(op, f"{name} is on {t.device} but q is on {q.device}")
    if not q.is_floating_point():
        fail(op, f"q must be floating point, got {q.dtype}")
    if k.shape[:3] != v.shape[:3]:
        fail(op, f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree in batch, heads and length")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        fail(op, f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch and head dim")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        fail(op, f"q heads ({q.shape[1]}) must be a multiple of k/v heads ({k.shape[1]}) (GQA)")


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


def check_key_lengths(lengths, q, k, op: str = "attention", name: str = "key_lengths"):
    """``lengths`` (``None``, or ``(B,)`` int32/int64 on q's device, each in ``[0, Lk]``), as a
    tensor; a list or tuple of ints is taken as torch takes one. Errors name ``op`` and ``name``."""
    if lengths is None:
        return None
    if isinstance(lengths, (list, tuple)):
        lengths = torch.tensor(lengths, device=q.device)
    if not isinstance(lengths, torch.Tensor):
        fail(op, f"{name} must be a (B,) int tensor or a list of ints, got {type(lengths).__name__}")
    if lengths.dtype not in (torch.int32, torch.int64) or lengths.shape != (q.shape[0],):
        fail(op, f"{name} must be an int tensor of shape ({q.shape[0]},), got "
                 f"{lengths.dtype} {tuple(lengths.shape)}")
    if lengths.device != q.device:
        fail(op, f"{name} is on {lengths.device} but q is on {q.device}")
    if values_known(lengths) and lengths.numel():
        if out_of_range(lengths, lengths, 0, k.shape[2]):
            fail(op, f"{name} must lie in [0, Lk={k.shape[2]}], got {lengths.tolist()}")
    return lengths


_warn_once = functools.partial(warn_once, "attention")


def _check_rotary(cos, sin, q, k):
    if cos is None and sin is None:
        return
    if cos is None or sin is None:
        _fail("pass both cos and sin, or neither")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 2 or t.shape != cos.shape or not t.is_floating_point():
            _fail(f"{name} must be a floating (S, R/2) table like cos, got {tuple(t.shape)}")
        if t.device != q.device:
            _fail(f"{name} is on {t.device} but q is on {q.device}")
        if t.dtype not in (torch.float32, q.dtype) or t.dtype != cos.dtype:
            _fail(f"{name} dtype {t.dtype} must be float32 or q's dtype {q.dtype}, like cos")
    if 2 * cos.shape[1] > q.shape[-1]:
        _fail(f"rotary dim 2 * cos.shape[-1] = {2 * cos.shape[1]} exceeds the head dim {q.shape[-1]}")
    if cos.shape[0] < max(q.shape[2], k.shape[2]):
        _fail(f"the cos/sin table has {cos.shape[0]} positions, fewer than the "
              f"{max(q.shape[2], k.shape[2])} of the sequences")


def attention(q, k, v, *, causal=False, causal_alignment="top_left", attn_mask=None,
              key_lengths=None, dropout_p=0.0, seed=None, scale=None, return_lse=False,
              cos=None, sin=None, rotary_interleaved=False):
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
        return_lse: also return the log-sum-exp of each row's scores, ``(B, H, Lq)`` float32
            (float64 for float64 inputs).
        cos, sin: optional ``(S, R/2)`` rotary tables (e.g. ``RotaryEmbedding.cos_sin``): q and k
            are rotated inside the kernel as they are loaded, exactly as
            :func:`fastseq.apply_rotary` would rotate them (``rotary_interleaved`` picks GPT-J
            pairs). Key ``n`` sits at position ``n``; query ``m`` at ``m``, or at
            ``m + key_lengths[b] - Lq`` with bottom-right alignment.

    Returns:
        ``out`` ``(B, H, Lq, D)`` in q's dtype (rows that see no key are zeros), and ``lse`` when
        ``return_lse``. Differentiable in q, k, v.
    """
    check_qkv(q, k, v)
    refuse_untransformable("attention", q, k, v)
    if causal_alignment not in ALIGNMENTS:
        _fail(f"causal_alignment must be one of {ALIGNMENTS}, got {causal_alignment!r}")
    if not 0.0 <= dropout_p < 1.0:
        _fail(f"dropout_p must be in [0, 1), got {dropout_p}")
    mask = _canonical_mask(attn_mask, q, k)
    key_lengths = check_key_lengths(key_lengths, q, k)
    _check_rotary(cos, sin, q, k)
    scale = softmax_scale(q, scale)
    if dropout_p > 0 and seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                             or not 0 <= seed < 2**63):
        _fail(f"seed must be an int in [0, 2**63), got {seed!r}")
    args = (cos, sin, rotary_interleaved, causal, causal_alignment == "bottom_right", scale,
            float(dropout_p), int(seed or 0))
    if mask is not None and mask.requires_grad and torch.is_grad_enabled():
        _warn_once("attn_mask requires grad")
        out, lse = _reference(q, k, v, mask, key_lengths, *args)
    else:
        out, lse = attention_op(q, k, v, mask, key_lengths, *args)
    return (out, lse) if return_lse else out
