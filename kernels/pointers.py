"""Pointer arithmetic the kernels share."""

import triton
import triton.language as tl  # noqa: F401 (the interpreter looks it up in a kernel's globals)


@triton.jit
def tile_ptrs(base, rows, stride_row, cols, stride_col):
    """Pointers to the ``(rows, cols)`` tile of the matrix at ``base``: ``rows`` and ``cols`` are
    1-D offsets, ``stride_row`` and ``stride_col`` the matrix's strides in elements."""
    return base + rows[:, None] * stride_row + cols[None, :] * stride_col
