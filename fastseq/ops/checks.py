"""What every op family shares for checking its inputs and saying what it does.

Errors name the op (``fastseq rotary: ...``), the argument, what was expected and what came; a
fallback to another path is announced once per reason. Each op module binds the op's name once,
``_fail = functools.partial(fail, "rotary")``, and uses these.
"""

from __future__ import annotations

import functools
import warnings
from typing import NoReturn

import torch

# The dtypes the fused kernels take; others take the reference path.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fail(op: str, message: str) -> NoReturn:
    """Raise ``ValueError("fastseq <op>: <message>")``."""
    raise ValueError(f"fastseq {op}: {message}")


@functools.cache
def warn_once(op: str, reason: str, fallback: str = "the plain-PyTorch path") -> None:
    """Warn, once per ``(op, reason)``, that ``op`` takes ``fallback`` because of ``reason``."""
    warnings.warn(f"fastseq {op}: {reason}; using {fallback}", stacklevel=4)


def describe(x) -> str:
    """A short description of an argument for an error message: a tensor's dims and shape, or
    the type of anything else."""
    if isinstance(x, torch.Tensor):
        return f"a {x.dim()}-D tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def values_known(*tensors: torch.Tensor) -> bool:
    """Whether a check may read the values of ``tensors``: not while ``torch.compile`` traces
    (they are symbolic there) and not on the meta device (shapes without data)."""
    return not torch.compiler.is_compiling() and all(t.device.type != "meta" for t in tensors)


def out_of_range(low: torch.Tensor, high: torch.Tensor, lowest: int, highest: int) -> bool:
    """True when some value of ``low`` is below ``lowest`` or some value of ``high`` above
    ``highest`` (non-empty integer tensors). One host read: on a GPU, one device sync, not two."""
    return bool((low.min() < lowest) | (high.max() > highest))


def refuse_untransformable(op: str, *tensors) -> None:
    """Raise where ``op``, which has no forward-mode rule and whose autograd torch.func's
    transforms do not take, would run under one of them: forward-mode AD (``torch.func.jvp``,
    dual tensors of ``torch.autograd.forward_ad``) would otherwise see a zero tangent, and
    ``torch.func.grad`` / ``jacrev`` an error of torch's internals."""
    if torch.compiler.is_compiling():
        return
    if torch._C._are_functorch_transforms_active():
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

        kinds = torch._C._functorch.TransformType
        active = {interpreter.key() for interpreter in retrieve_all_functorch_interpreters()}
        if kinds.Jvp in active:
            fail(op, "torch.func.jvp (forward-mode AD) is not supported; use reverse mode "
                     "(loss.backward(), torch.autograd.grad)")
        if kinds.Grad in active:
            fail(op, "torch.func.grad / vjp / jacrev are not supported; use loss.backward() or "
                     "torch.autograd.grad")
    if torch.autograd.forward_ad._current_level >= 0:
        from torch.autograd import forward_ad

        if any(isinstance(t, torch.Tensor) and forward_ad.unpack_dual(t).tangent is not None
               for t in tensors):
            fail(op, "forward-mode AD (dual tensors) is not supported; use reverse mode "
                     "(loss.backward(), torch.autograd.grad)")
