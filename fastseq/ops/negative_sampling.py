"""Word2vec's negative-sampling loss as a torch op: ``torch.ops.fastseq.negative_sampling``.

The C++ CPU kernel (``csrc/cpu/negative_sampling.cpp``) gathers each example's rows and forms the
mean input vector, its dot products with the true word and the sampled negatives, the loss and what
the backward needs in one pass; the backward writes the gradient of every row the forward touched
without reading the tables again. The weights' gradients are built
from those rows as sparse tensors (as ``nn.Embedding(sparse=True)`` gives them, for
``torch.optim.SGD`` / ``SparseAdam``) or dense ones. Other devices and dtypes take the
plain-PyTorch reference (``fastseq/reference/negative_sampling.py``).
"""

from __future__ import annotations

import functools

import torch

from fastseq import _backend, _extension
from fastseq.ops.checks import describe, fail, out_of_range, values_known
from fastseq.reference import negative_sampling as reference

REDUCTIONS = ("mean", "sum", "none")
KERNEL_DTYPES = (torch.float32, torch.float64)

_fail = functools.partial(fail, "negative_sampling_loss")


def _unsupported(weight: torch.Tensor) -> dict[str, str]:
    reasons = {"triton": "no Triton kernel", "cuda": "no CUDA kernel"}
    if weight.dtype not in KERNEL_DTYPES:
        reasons["cpu"] = f"dtype {weight.dtype} (the kernel takes float32 and float64)"
    return reasons


def _gradient(rows, ids, weight, sparse: bool):
    """The ``(V, D)`` gradient of ``weight`` from one gradient row per entry of ``ids``."""
    ids = ids.reshape(-1)
    if sparse:
        return torch.sparse_coo_tensor(ids[None], rows, weight.shape, check_invariants=False)
    return torch.zeros_like(weight).index_add_(0, ids, rows)


@torch.library.custom_op("fastseq::negative_sampling", mutates_args=())
def negative_sampling_op(
    in_weight: torch.Tensor, out_weight: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor,
    sparse: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss (B,), hidden (B, D), slopes (B, N), error (B, D))`` on the C++ kernel; see the module
    docstring."""
    _extension.load()
    return torch.ops.fastseq.negative_sampling_forward(in_weight, out_weight, inputs, targets)


@negative_sampling_op.register_fake
def _(in_weight, out_weight, inputs, targets, sparse):
    batch, dim = inputs.shape[0], in_weight.shape[1]
    return (in_weight.new_empty(batch), in_weight.new_empty(batch, dim),
            in_weight.new_empty(batch, targets.shape[1]), in_weight.new_empty(batch, dim))


def _setup(ctx, inputs, output):
    in_weight, out_weight, ids, targets, sparse = inputs
    _, hidden, slopes, error = output
    ctx.save_for_backward(in_weight, out_weight, ids, targets, hidden, slopes, error)
    ctx.sparse = sparse


def _backward(ctx, grad_loss, grad_hidden, grad_slopes, grad_error):
    in_weight, out_weight, ids, targets, hidden, slopes, error = ctx.saved_tensors
    in_rows, out_rows = torch.ops.fastseq.negative_sampling_backward(grad_loss, ids, targets, hidden,
                                                                     slopes, error)
    return (_gradient(in_rows, ids, in_weight, ctx.sparse),
            _gradient(out_rows, targets, out_weight, ctx.sparse), None, None, None)


negative_sampling_op.register_autograd(_backward, setup_context=_setup)


def _register_fake() -> None:
    """Shapes of the C++ backward, which autograd calls directly (traced backwards need them)."""
    if not _extension.has_op("negative_sampling_backward"):
        return

    @torch.library.register_fake("fastseq::negative_sampling_backward")
    def _(grad_loss, inputs, targets, hidden, slopes, error):
        dim = hidden.shape[1]
        return hidden.new_empty(inputs.numel(), dim), hidden.new_empty(targets.numel(), dim)


_register_fake()


def _check(in_weight, out_weight, inputs, targets, reduction):
    for name, weight in (("in_weight", in_weight), ("out_weight", out_weight)):
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
            _fail(f"{name} must be a floating-point (V, D) tensor, got {describe(weight)}")
    if out_weight.shape[1] != in_weight.shape[1] or out_weight.dtype != in_weight.dtype \
            or out_weight.device != in_weight.device:
        _fail(f"out_weight must match in_weight's width {in_weight.shape[1]}, dtype {in_weight.dtype} and "
              f"device, got {out_weight.shape[1]}, {out_weight.dtype}, {out_weight.device}")
    if reduction not in REDUCTIONS:
        _fail(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    for name, ids, weight, what in (("inputs", inputs, in_weight, "(B, W)"), ("targets", targets, out_weight,
                                                                             "(B, N)")):
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            _fail(f"{name} must be a {what} int64 or int32 tensor of word ids, got {describe(ids)}")
        if ids.device != weight.device:
            _fail(f"{name} must be on the weights' device {weight.device}, got {ids.device}")
        if ids.shape[1] == 0:
            _fail(f"{name} must hold at least one id per example, got shape {tuple(ids.shape)}")
        if ids.numel() and values_known(ids) and out_of_range(ids, ids, 0, weight.shape[0] - 1):
            _fail(f"{name} must lie in [0, {weight.shape[0]}), got {int(ids.min())}..{int(ids.max())}")
    if inputs.shape[0] != targets.shape[0]:
        _fail(f"inputs and targets must hold the same number of examples, got {inputs.shape[0]} and "
              f"{targets.shape[0]}")


def negative_sampling_loss(in_weight, out_weight, inputs, targets, *, sparse: bool = True,
                           reduction: str = "mean"):
    """Word2vec's negative-sampling loss (Mikolov et al. 2013).

    Args:
        in_weight: ``(V, D)`` input ("centre") vectors; out_weight: ``(V', D)`` output vectors, the
            same dtype (float32 / float64 on the fused kernel) and device.
        inputs: ``(B, W)`` ids whose in_weight rows are averaged (W = 1: skip-gram's centre word;
            W > 1: CBOW's context window).
        targets: ``(B, N)`` ids of out_weight rows: the true word first, then N - 1 negatives.
        sparse: the weights' gradients as sparse COO tensors (``nn.Embedding(sparse=True)``'s).
        reduction: "mean" (default), "sum" or "none" (the ``(B,)`` per-example losses).

    Returns the loss: ``-log sigmoid(h . u_0) - sum_{j>=1} log sigmoid(-h . u_j)`` per example.
    """
    _check(in_weight, out_weight, inputs, targets, reduction)
    inputs, targets = inputs.long(), targets.long()
    if _backend.choose("negative_sampling_loss", in_weight.device, _unsupported(in_weight)) == "cpu":
        loss = negative_sampling_op(in_weight, out_weight, inputs, targets, sparse)[0]
    else:
        loss = reference.negative_sampling_loss(in_weight, out_weight, inputs, targets, sparse)
    if reduction == "mean":
        return loss.mean()
    return loss.sum() if reduction == "sum" else loss
