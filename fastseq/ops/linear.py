"""A linear layer for products of a few rows: ``torch.ops.fastseq.linear``.

``y = x @ weight.T + bias``, as ``torch.nn.functional.linear``. A decoding step multiplies one
row per sequence by each weight matrix: a matrix-vector product, bound by reading the weights.
ATen's float32 GEMM reads them there at a fraction of the memory bandwidth (MKL's AVX2 code on
AMD CPUs, or oneDNN's fixed cost per call), while the C++ op (csrc/cpu/linear.cpp: unpacked
AVX-512 tiles, the columns split between threads) streams them at close to a copy's speed.

:func:`linear` sends a call to the op when it is one the op is for: float32 CPU tensors, at
most ``FEW_ROWS`` rows, no gradient needed, no autocast. Everything else (training, prefill,
other dtypes and devices) runs ``F.linear``, which is what the op computes. The op carries a
fake implementation (here) and autograd (in C++, where a call that needs no gradient pays no
Python for it), so that a direct call traces and differentiates too.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from fastseq import _backend, _extension
from fastseq.ops.checks import describe, fail

# Rows up to which the C++ op takes a product (csrc/cpu/linear.cpp's kFewRows): beyond, the
# weights are reused often enough for a packed GEMM to win.
FEW_ROWS = 16

_fail = functools.partial(fail, "linear")
_NOT_HERE = {"triton": "no Triton linear kernel", "cuda": "no CUDA linear kernel"}


def _takes_kernel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether this call runs the C++ op (see the module docstring)."""
    if not x.is_cpu or x.dtype != torch.float32 or weight.dtype != torch.float32 \
            or x.numel() > FEW_ROWS * x.shape[-1]:
        return False
    if bias is not None and bias.dtype != torch.float32:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return False
    return not torch.is_autocast_enabled("cpu") and _kernel_chosen()


# torch.compile runs the choice while tracing and keeps its answer.
@torch.compiler.assume_constant_result
def _kernel_chosen() -> bool:
    """Whether the C++ op is built and the backend choice (``fastseq.use_backend``) lets it run."""
    if not _extension.has_op("linear"):
        return False
    return _backend.forced_backend() is None \
        or _backend.choose("linear", torch.device("cpu"), _NOT_HERE) == "cpu"


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias``: x ``(..., K)``, weight ``(N, K)``, bias ``(N,)`` or None; returns
    ``(..., N)`` in x's dtype. Differentiable. Raises ValueError, naming the argument, when the
    shapes do not fit."""
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or not isinstance(weight, torch.Tensor) \
            or weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        _fail(f"x (..., K) and weight (N, K) must agree on K, got x {describe(x)} and weight "
              f"{describe(weight)}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != weight.shape[:1]):
        _fail(f"bias must be ({weight.shape[0]},) or None, got {describe(bias)}")
    if _takes_kernel(x, weight, bias):
        return torch.ops.fastseq.linear(x, weight, bias)
    return F.linear(x, weight, bias)


def _register_fake() -> None:
    """The op's fake implementation (shapes for torch.compile), where the extension has it."""
    if _extension.has_op("linear"):
        torch.library.register_fake("fastseq::linear")(
            lambda x, weight, bias: x.new_empty((*x.shape[:-1], weight.shape[0])))


_register_fake()
