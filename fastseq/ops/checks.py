"""Checks shared by the ops."""

import torch


def out_of_range(low: torch.Tensor, high: torch.Tensor, lowest: int, highest: int) -> bool:
    """True when some value of ``low`` is below ``lowest`` or some value of ``high`` above
    ``highest`` (non-empty integer tensors). One host read: on a GPU, one device sync, not two."""
    return bool((low.min() < lowest) | (high.max() > highest))
