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


def out_of_range(low: torch.Tensor, high: torch.Tensor, lowest: int, highest: int) -> bool:
    """True when some value of ``low`` is below ``lowest`` or some value of ``high`` above
    ``highest`` (non-empty integer tensors). One host read: on a GPU, one device sync, not two."""
    return bool((low.min() < lowest) | (high.max() > highest))
