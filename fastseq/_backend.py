"""Backend choice: which implementation runs an op.

Backends are ``"triton"``, ``"cuda"``, ``"cpu"`` (the C++ extension) and ``"reference"`` (plain
PyTorch). By default each op picks the fastest backend that supports its inputs. A backend can be
forced for a block of code with :func:`use_backend`, or for the whole process with the environment
variable ``FASTSEQ_BACKEND``. A forced backend that cannot take some input falls back to another
one with a one-time warning, never to a wrong answer.

The chosen backend is the only process-wide mutable state of the library; it lives in a
``ContextVar`` so that threads and async tasks each see their own choice.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import warnings

import torch

from fastseq import _extension

BACKENDS = ("triton", "cuda", "cpu", "reference")

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastseq_backend", default=None)


def _validate(name: str | None) -> str | None:
    if name is None or name == "" or name == "auto":
        return None
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or 'auto', got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str | None):
    """Force backend ``name`` (``"triton"``, ``"cuda"``, ``"cpu"``, ``"reference"``) inside the block.

    ``None`` or ``"auto"`` restores automatic choice. Nested blocks restore the outer choice on exit.
    """
    token = _forced.set(_validate(name))
    try:
        yield
    finally:
        _forced.reset(token)


def forced_backend() -> str | None:
    """The backend forced by :func:`use_backend` or ``FASTSEQ_BACKEND``, or ``None`` for automatic."""
    forced = _forced.get()
    if forced is not None:
        return forced
    return _validate(os.environ.get("FASTSEQ_BACKEND"))


def triton_interpreted() -> bool:
    """True when Triton kernels run under the interpreter (``TRITON_INTERPRET=1``), e.g. on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_importable() -> bool:
    """True when ``import triton`` works in this process."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def backend_supports_device(name: str, device: torch.device) -> bool:
    """Whether backend ``name`` can run at all on ``device`` in this process (ignoring op specifics)."""
    if name == "reference":
        return True
    if name == "cpu":
        return device.type == "cpu" and _extension.cpu_built()
    if name == "cuda":
        return device.type == "cuda" and _extension.cuda_built()
    if name == "triton":
        if not triton_importable():
            return False
        return device.type == "cuda" or (device.type == "cpu" and triton_interpreted())
    return False


def available_backends(device: torch.device | str) -> list[str]:
    """Backends that can run on ``device`` here, fastest first."""
    return list(_available(torch.device(device).type, triton_interpreted()))


@functools.cache
def _available(device_type: str, interpreted: bool) -> tuple[str, ...]:
    # Fixed for a process but for the interpreter switch (read again inside, and part of the key
    # only so that flipping it is seen): computed once, as every op call asks, and asking took
    # a few microseconds, which small calls notice.
    device = torch.device(device_type)
    return tuple(b for b in _preference(device_type) if backend_supports_device(b, device))


def _preference(device_type: str) -> tuple[str, ...]:
    if device_type == "cuda":
        return ("triton", "cuda", "reference")
    return ("cpu", "triton", "reference")


@functools.cache
def _warn_once(op: str, wanted: str, used: str, reason: str) -> None:
    warnings.warn(
        f"fastseq.{op}: backend {wanted!r} cannot take these inputs ({reason}); using {used!r}",
        stacklevel=4,
    )


def choose(op: str, device: torch.device, unsupported: dict[str, str] | None = None,
           prefer: str | None = None) -> str:
    """Pick the backend for one call of ``op`` on ``device``.

    ``unsupported`` maps backend names to the reason they cannot take this call's inputs. A forced
    backend that is unavailable or unsupported falls back, warning once per (op, backend, reason).
    ``prefer`` names a backend that goes first for this op when it can run (one measured faster
    for it than the device's usual order).
    """
    unsupported = unsupported or {}
    candidates = [b for b in _available(device.type, triton_interpreted()) if b not in unsupported]
    if prefer in candidates:
        candidates.insert(0, candidates.pop(candidates.index(prefer)))
    forced = forced_backend()
    if forced is not None:
        if forced in candidates:
            return forced
        reason = unsupported.get(forced, f"not available on {device.type}")
        _warn_once(op, forced, candidates[0], reason)
    return candidates[0]
