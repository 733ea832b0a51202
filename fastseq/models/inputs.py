"""The checks every model runs on its inputs and its config, before any kernel: each error names the
model, the argument, what was expected and what came."""

from __future__ import annotations

import torch


def describe(x) -> str:
    """``"torch.int64 (2, 5)"`` for a tensor, the type's name for anything else (for errors)."""
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} {tuple(x.shape)}"
    return type(x).__name__


def check_token_ids(ids, vocab_size: int, model: str, name: str = "input_ids") -> None:
    """Refuse anything but a ``(B, T)`` integer tensor of ids in ``[0, vocab_size)``."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point() \
            or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"fastseq {model}: {name} must be a (B, T) integer tensor, got {describe(ids)}")
    if ids.numel() and not torch.compiler.is_compiling():
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(f"fastseq {model}: {name} must lie in [0, {vocab_size}), got {low}..{high}")


def check_lengths(lengths, batch: int, length: int, model: str, name: str = "lengths"):
    """``lengths`` ``(B,)`` ints in ``[1, length]`` as int64, or None."""
    if lengths is None:
        return None
    if not isinstance(lengths, torch.Tensor) or lengths.shape != (batch,) or lengths.is_floating_point():
        raise ValueError(f"fastseq {model}: {name} must be a ({batch},) integer tensor, got "
                         f"{describe(lengths)}")
    if batch and not torch.compiler.is_compiling():
        low, high = int(lengths.min()), int(lengths.max())
        if low < 1 or high > length:
            raise ValueError(f"fastseq {model}: {name} must lie in [1, {length}], got {low}..{high}")
    return lengths.long()


def check_decoding(max_len, beam_size, model: str) -> None:
    """Refuse a ``max_len`` or ``beam_size`` that is not a positive int."""
    for name, value in (("max_len", max_len), ("beam_size", beam_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"fastseq {model}: {name} must be a positive int, got {value!r}")


def check_images(images, channels: int, size: int, model: str, name: str = "images") -> None:
    """Refuse anything but a ``(B, channels, size, size)`` tensor."""
    want = (channels, size, size)
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != want:
        raise ValueError(f"fastseq {model}: {name} must be (B, {', '.join(map(str, want))}), got "
                         f"{describe(images)}")


def check_positive_ints(config, names, what: str) -> None:
    """Refuse a dataclass ``config`` whose fields ``names`` are not all positive ints."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{what}: {name} must be a positive int, got {value!r}")
