"""Loading of the compiled extension ``fastseq._C`` (C++ CPU kernels, and CUDA kernels when built).

Importing it registers the C++ ops under ``torch.ops.fastseq``. The package still works without it:
ops fall back to Triton or plain PyTorch.
"""

from __future__ import annotations

import functools
import importlib


@functools.cache
def load():
    """Import ``fastseq._C`` and return it, or ``None`` when the extension was not built."""
    try:
        return importlib.import_module("fastseq._C")
    except ImportError:
        return None


def cpu_built() -> bool:
    """True when the C++ CPU kernels are available."""
    return load() is not None


def cuda_built() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    ext = load()
    return ext is not None and bool(ext.cuda_built())


@functools.cache
def has_op(name: str) -> bool:
    """True when the extension registers ``torch.ops.fastseq.<name>`` (looked up once: ops ask on
    every call)."""
    import torch

    return load() is not None and hasattr(torch.ops.fastseq, name)
