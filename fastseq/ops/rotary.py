"""Rotary positional embeddings as torch ops: ``torch.ops.fastseq.rotary`` and ``rotary_``.

Both ops take canonical arguments (``(B, N, H, D)`` views with any strides, 3-D angle tables,
positions as an offset, per-batch offsets or ids) and run one fused launch over q and k on the
chosen backend: Triton, the C++ CPU kernel, the CUDA kernel, or the plain-PyTorch reference.
``rotary`` returns new tensors; ``rotary_`` rotates in place. The backward of a rotation is the
transposed rotation, so both directions run the same kernel.

The public functions :func:`apply_rotary` and :func:`apply_rotary_pos_emb` check their inputs,
bring them to the canonical form (views only: no copies), and call the ops.
"""

from __future__ import annotations

import functools

import torch

from fastseq import _backend, _extension
from fastseq.ops.checks import (
    KERNEL_DTYPES,
    describe,
    fail,
    out_of_range,
    refuse_untransformable,
    values_known,
    warn_once,
)
from fastseq.reference import rotary as reference

LAYOUTS = ("bnhd", "bhnd")


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------


def _unsupported(q: torch.Tensor, cos: torch.Tensor) -> dict[str, str]:
    """Backends that cannot take these inputs, with the reason."""
    reason = None
    if q.dtype not in KERNEL_DTYPES:
        reason = f"dtype {q.dtype} (kernels take float32, float16, bfloat16)"
    elif cos.dtype not in (torch.float32, q.dtype):
        reason = f"cos/sin dtype {cos.dtype} (kernels take float32 or q's dtype)"
    if reason is None:
        return {}
    return {name: reason for name in ("triton", "cpu", "cuda")}


def _launch(q_out, k_out, q, k, cos, sin, positions, offset, rotary_dim, interleaved, conjugate):
    backend = _backend.choose("rotary", q.device, _unsupported(q, cos))
    args = (cos, sin, positions, offset, rotary_dim, interleaved, conjugate)
    if backend == "triton":
        from fastseq.kernels import rotary as triton_rotary

        for name, out in (("q", q_out), ("k", k_out)):  # as ATen's overlap check on the others
            if any(stride == 0 and size > 1 for stride, size in zip(out.stride(), out.shape, strict=True)):
                _fail(f"the output for {name} has elements that share memory (an expanded "
                      "tensor); rotate a copy instead of rotating it in place")
        triton_rotary.rotary(q_out, k_out, q, k, *args)
    elif backend in ("cpu", "cuda"):
        _extension.load()
        torch.ops.fastseq.rotary_kernel(q_out, k_out, q, k, *args)
    else:
        q_out.copy_(reference.rotate(q, *args))
        k_out.copy_(reference.rotate(k, *args))


# --------------------------------------------------------------------------------------------
# The ops
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("fastseq::rotary", mutates_args=())
def rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor | None,
    offset: int,
    rotary_dim: int,
    interleaved: bool,
    conjugate: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, N, Hq, D) and k (B, N, Hk, D) out of place; returns ``(q_out, k_out)``.

    Outputs keep the memory layout (strides) of the inputs.
    """
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    _launch(q_out, k_out, q, k, cos, sin, positions, offset, rotary_dim, interleaved, conjugate)
    return q_out, k_out


@rotary.register_fake
def _(q, k, cos, sin, positions, offset, rotary_dim, interleaved, conjugate):
    return torch.empty_like(q), torch.empty_like(k)


def _setup_rotary(ctx, inputs, output):
    q, k, cos, sin, positions, offset, rotary_dim, interleaved, conjugate = inputs
    ctx.save_for_backward(cos, sin, positions)
    ctx.config = (offset, rotary_dim, interleaved, not conjugate)


def _rotary_backward(ctx, grad_q, grad_k):
    cos, sin, positions = ctx.saved_tensors
    dq, dk = rotary(grad_q, grad_k, cos, sin, positions, *ctx.config)
    return dq, dk, None, None, None, None, None, None, None


rotary.register_autograd(_rotary_backward, setup_context=_setup_rotary)


@torch.library.custom_op("fastseq::rotary_", mutates_args=("q", "k"))
def rotary_(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor | None,
    offset: int,
    rotary_dim: int,
    interleaved: bool,
    conjugate: bool,
) -> None:
    """Rotate q (B, N, Hq, D) and k (B, N, Hk, D) in place."""
    _launch(q, k, q, k, cos, sin, positions, offset, rotary_dim, interleaved, conjugate)


@rotary_.register_fake
def _(q, k, cos, sin, positions, offset, rotary_dim, interleaved, conjugate):
    return None


def no_heads(x):
    """An operand with no heads, (B, N, 0, D) like x, for rotating one tensor through the
    two-operand ops."""
    return x.new_empty(x.shape[0], x.shape[1], 0, x.shape[3])


class _RotaryInplace(torch.autograd.Function):
    """Autograd for rotating one tensor in place; the gradient is rotated back. One tensor per
    node: autograd lets a node modify a view in place only when it has a single output."""

    @staticmethod
    def forward(ctx, x, cos, sin, positions, offset, rotary_dim, interleaved):
        rotary_(x, no_heads(x), cos, sin, positions, offset, rotary_dim, interleaved, False)
        ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin, positions)
        ctx.config = (offset, rotary_dim, interleaved, True)
        return x

    @staticmethod
    def backward(ctx, grad):
        cos, sin, positions = ctx.saved_tensors
        dx, _ = rotary(grad, no_heads(grad), cos, sin, positions, *ctx.config)
        return dx, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


_fail = functools.partial(fail, "rotary")


def _check_tensors(q, k, cos, sin):
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        _fail(f"q must be a 4-D tensor, got {describe(q)}")
    if not q.is_floating_point():
        _fail(f"q must be floating point, got dtype {q.dtype}")
    if k is not None:
        if not isinstance(k, torch.Tensor) or k.dim() != 4:
            _fail(f"k must be a 4-D tensor or None, got {describe(k)}")
        if k.dtype != q.dtype:
            _fail(f"k dtype {k.dtype} must match q dtype {q.dtype}")
        if k.device != q.device:
            _fail(f"k is on {k.device} but q is on {q.device}")
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            _fail(f"{name} must be a floating-point tensor, got {describe(t)}")
        if t.device != q.device:
            _fail(f"{name} is on {t.device} but q is on {q.device}")
    if cos.shape != sin.shape:
        _fail(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have the same shape")
    if cos.dtype != sin.dtype:
        _fail(f"cos dtype {cos.dtype} and sin dtype {sin.dtype} must match")


def _check_same_tokens(q, k):
    if k is not None and (k.shape[0], k.shape[1], k.shape[3]) != (q.shape[0], q.shape[1], q.shape[3]):
        _fail(
            f"k {tuple(k.shape)} and q {tuple(q.shape)} must agree in batch, sequence and head "
            "dims (head counts may differ)"
        )


def _check_positions(positions, batch, seqlen, table_len, device):
    """Bring ``positions`` to ``(tensor or None, offset)``, checking shape and range."""
    if positions is None or isinstance(positions, int):
        offset = positions or 0
        if offset < 0 or offset + seqlen > table_len:
            _fail(
                f"positions {offset}..{offset + seqlen - 1} are past the cos/sin table of "
                f"{table_len} positions"
            )
        return None, offset
    if not isinstance(positions, torch.Tensor) or positions.dtype not in (torch.int32, torch.int64):
        _fail(f"positions must be None, an int, or an int32/int64 tensor, got {describe(positions)}")
    if positions.device != device:
        _fail(f"positions is on {positions.device} but q is on {device}")
    if positions.dim() == 1:
        if positions.shape[0] != batch:
            _fail(f"per-batch positions must have shape ({batch},), got {tuple(positions.shape)}")
        # The last token of row b sits at positions[b] + seqlen - 1: bound positions[b] itself,
        # so that no addition on a user's value can wrap around.
        highest = table_len - seqlen
    elif positions.dim() == 2:
        if positions.shape[1] != seqlen or positions.shape[0] not in (1, batch):
            _fail(f"position ids must have shape ({batch}, {seqlen}), got {tuple(positions.shape)}")
        positions = positions.expand(batch, seqlen)
        highest = table_len - 1
    else:
        _fail(f"positions must be 1-D (per-batch offsets) or 2-D (ids), got {positions.dim()}-D")
    if seqlen > 0 and batch > 0 and values_known(positions):
        # A data-dependent check (one device sync); an out-of-range position would read garbage.
        if out_of_range(positions, positions, 0, highest):
            what = "per-batch offsets" if positions.dim() == 1 else "position ids"
            _fail(
                f"{what} span {int(positions.min())}..{int(positions.max())}, past the cos/sin "
                f"table of {table_len} positions for {seqlen} tokens (they must lie in "
                f"[0, {highest}])"
            )
    return positions, 0


def _table_3d(table, batch, name):
    if table.dim() == 2:
        return table.unsqueeze(0)
    if table.dim() == 3 and table.shape[0] in (1, batch):
        return table
    _fail(f"{name} must be (S, R/2) or (B, S, R/2) with B in {{1, {batch}}}, got {tuple(table.shape)}")


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _needs_reference(cos, sin) -> bool:
    """Differentiable tables need autograd through cos/sin: only the reference path gives it."""
    return torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad)


_warn_reference_once = functools.partial(warn_once, "rotary")


# torch.compile runs the choice while tracing and keeps its answer.
@torch.compiler.assume_constant_result
def _cpu_kernel_chosen(dtype: torch.dtype, table_dtype: torch.dtype) -> bool:
    """Whether CPU calls of these dtypes go to the C++ kernel (built, and not forced elsewhere)."""
    if not _extension.has_op("rotary_kernel"):
        return False
    reasons = _unsupported(torch.empty(0, dtype=dtype), torch.empty(0, dtype=table_dtype))
    return _backend.choose("rotary", torch.device("cpu"), reasons) == "cpu"


def _register_fake() -> None:
    """The C++ kernel's fake implementation (it writes its outputs and returns nothing)."""
    if _extension.has_op("rotary_kernel"):
        torch.library.register_fake("fastseq::rotary_kernel")(lambda *args: None)


_register_fake()


def _rotate_pair(q, k, cos, sin, positions, offset, rotary_dim, interleaved, inplace):
    """Rotate canonical (B, N, H, D) views q and k (k may be None); returns (q_out, k_out)."""
    k_given = k is not None
    if not k_given:
        k = no_heads(q)
    if inplace and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        args = (cos, sin, positions, offset, rotary_dim, interleaved)
        q_out = _RotaryInplace.apply(q, *args)
        k_out = _RotaryInplace.apply(k, *args) if k.shape[2] else k
    elif inplace:
        rotary_(q, k, cos, sin, positions, offset, rotary_dim, interleaved, False)
        q_out, k_out = q, k
    elif q.is_cpu and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)) \
            and _cpu_kernel_chosen(q.dtype, cos.dtype):
        # Inference on the CPU calls the C++ kernel itself, eager or traced: the custom op's
        # Python wrapper costs several times a decoding step's rotation.
        q_out, k_out = torch.empty_like(q), torch.empty_like(k)
        torch.ops.fastseq.rotary_kernel(q_out, k_out, q, k, cos, sin, positions, offset, rotary_dim,
                                        interleaved, False)
    else:
        q_out, k_out = rotary(q, k, cos, sin, positions, offset, rotary_dim, interleaved, False)
    return q_out, (k_out if k_given else None)


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    positions: int | torch.Tensor | None = None,
    interleaved: bool = False,
    inplace: bool = False,
    layout: str = "bnhd",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotate queries and keys by rotary positional embeddings, in one fused pass.

    Args:
        q: ``(B, N, Hq, D)`` (``layout="bnhd"``) or ``(B, Hq, N, D)`` (``layout="bhnd"``), any
            strides; float32, float16 or bfloat16 (other float dtypes take the reference path).
        k: the same layout with ``Hk`` heads (GQA: ``Hk != Hq``), or ``None``.
        cos, sin: angle tables ``(S, R/2)``, or ``(B, S, R/2)`` per batch row, usually float32
            (e.g. from :class:`fastseq.nn.RotaryEmbedding`). ``R = 2 * cos.shape[-1] <= D`` is the
            rotary dim; columns past it pass through unchanged.
        positions: where each token sits in the table: ``None`` or an ``int`` offset (token ``n``
            at ``offset + n``), a ``(B,)`` int tensor of per-batch offsets (a KV cache), or
            ``(B, N)`` position ids.
        interleaved: GPT-J convention (pairs ``(2j, 2j+1)``) instead of NeoX (``(j, j + R/2)``).
        inplace: rotate q and k in place and return them.
        layout: ``"bnhd"`` or ``"bhnd"``.

    Returns:
        ``(q_out, k_out)``, with the layout and dtype of the inputs (``k_out`` is ``None`` when
        ``k`` is). Math is float32. Differentiable in q and k.
    """
    _check_tensors(q, k, cos, sin)
    refuse_untransformable("rotary", q, k, cos, sin)
    if (inplace and k is not None and values_known(q) and q.numel() and k.numel()
            and q.data_ptr() == k.data_ptr()):
        _fail("inplace=True with q and k starting at the same memory would rotate it twice; "
              "pass k=None")
    if layout not in LAYOUTS:
        _fail(f"layout must be one of {LAYOUTS}, got {layout!r}")
    to_bnhd = (lambda t: t) if layout == "bnhd" else (lambda t: t if t is None else t.transpose(1, 2))
    qc, kc = to_bnhd(q), to_bnhd(k)
    _check_same_tokens(qc, kc)
    batch, seqlen, _, dim = qc.shape
    cos3, sin3 = _table_3d(cos, batch, "cos"), _table_3d(sin, batch, "sin")
    rotary_dim = 2 * cos3.shape[-1]
    if rotary_dim > dim:
        _fail(f"rotary dim 2 * cos.shape[-1] = {rotary_dim} exceeds the head dim {dim}")
    pos, offset = _check_positions(positions, batch, seqlen, cos3.shape[1], q.device)
    if _needs_reference(cos, sin):
        _warn_reference_once("cos/sin require grad")
        return reference.apply_rotary(
            q, k, cos, sin, positions=positions, interleaved=interleaved, inplace=inplace,
            layout=layout,
        )
    q_out, k_out = _rotate_pair(qc, kc, cos3, sin3, pos, offset, rotary_dim, interleaved, inplace)
    return to_bnhd(q_out), to_bnhd(k_out)


def apply_rotary_pos_emb(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    """Drop-in for ``apply_rotary_pos_emb`` of Hugging Face transformers' Llama code.

    Computes what transformers computes, ``q * cos + rotate_half(q) * sin`` with ``cos`` and
    ``sin`` unsqueezed at ``unsqueeze_dim`` and broadcast against q (and the same for k), in one
    fused pass where the shapes allow it.

    Args:
        q, k: ``(B, H, N, D)`` for ``unsqueeze_dim=1`` or ``(B, N, H, D)`` for ``unsqueeze_dim=2``.
        cos, sin: ``(B, N, D)`` or ``(1, N, D)`` as the transformers rotary modules return them
            (already at each token's position): the fused path. Any other shape that broadcasts
            as transformers broadcasts it (a 2-D ``(H, D)`` table lines up with the heads, not the
            tokens) takes the plain-PyTorch path with a one-time warning.
        position_ids: the deprecated argument of transformers 4.x's signature, unused there and
            here; an ``int`` in its place is transformers 5's ``unsqueeze_dim``.
        unsqueeze_dim: the dim of q/k that cos/sin broadcast over (the heads).

    Returns:
        ``(q_embed, k_embed)`` of q's and k's shapes, in the dtype transformers' arithmetic
        promotes to: ``promote_types(q.dtype, cos.dtype)`` (float16 q with float32 cos gives
        float32). Math in float32 or wider; where transformers computes in a low precision the
        results differ by at most its rounding.
    """
    if isinstance(position_ids, int) and not isinstance(position_ids, bool):
        unsqueeze_dim = position_ids
    _check_tensors(q, k, cos, sin)
    refuse_untransformable("rotary", q, k, cos, sin)
    _check_broadcast(q, k, cos, unsqueeze_dim)
    layout = _fused_layout(q, k, cos, unsqueeze_dim)
    if layout is None or _needs_reference(cos, sin):
        _warn_reference_once(f"apply_rotary_pos_emb with cos {tuple(cos.shape)} against q "
                             f"{tuple(q.shape)} (unsqueeze_dim={unsqueeze_dim}, "
                             f"requires_grad={cos.requires_grad})")
        return reference.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    dtype = torch.promote_types(q.dtype, cos.dtype)
    to_bnhd = (lambda t: t.to(dtype)) if layout == "bnhd" else (lambda t: t.to(dtype).transpose(1, 2))
    qc, kc = to_bnhd(q), to_bnhd(k)
    q_out, k_out = _rotate_pair(qc, kc, cos, sin, None, 0, q.shape[-1], False, False)
    if layout == "bhnd":
        q_out, k_out = q_out.transpose(1, 2), k_out.transpose(1, 2)
    return q_out, k_out


def _check_broadcast(q, k, cos, unsqueeze_dim):
    if not isinstance(unsqueeze_dim, int) or not -cos.dim() - 1 <= unsqueeze_dim <= cos.dim():
        _fail(f"unsqueeze_dim must be an int in [{-cos.dim() - 1}, {cos.dim()}] for cos of "
              f"{cos.dim()} dims, got {unsqueeze_dim!r}")
    table = cos.unsqueeze(unsqueeze_dim).shape
    for name, x in (("q", q), ("k", k)):
        if x is None:
            continue
        try:
            shape = torch.broadcast_shapes(x.shape, table)
        except RuntimeError:
            shape = None
        if shape != x.shape:
            _fail(f"cos/sin {tuple(cos.shape)} unsqueezed at dim {unsqueeze_dim} do not broadcast "
                  f"to {name} {tuple(x.shape)}")


def _fused_layout(q, k, cos, unsqueeze_dim) -> str | None:
    """``"bhnd"`` or ``"bnhd"`` when the fused kernel computes exactly this call: 3-D tables of
    one row per token (per batch row or shared) that broadcast over the heads; else ``None``."""
    layout = {1: "bhnd", -3: "bhnd", 2: "bnhd", -2: "bnhd"}.get(unsqueeze_dim)
    if layout is None or cos.dim() != 3 or k is None or k.dtype != q.dtype:
        return None
    batch, seqlen, dim = q.shape[0], q.shape[1 if layout == "bnhd" else 2], q.shape[3]
    tokens_k = k.shape[1 if layout == "bnhd" else 2]
    if (k.shape[0], tokens_k, k.shape[3]) != (batch, seqlen, dim) or dim % 2:
        return None
    if cos.shape[0] not in (1, batch) or cos.shape[1:] != (seqlen, dim):
        return None
    return layout
