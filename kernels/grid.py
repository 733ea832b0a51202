"""Launch grids: program ids on a flat grid, and the host's launch arithmetic.

CUDA caps a grid's second and third axes at 65535 programs; batch x heads passes that (a ViT at
batch 8192 has 98304 heads to run). The kernels therefore launch ``blocks x (batch heads)``
programs on axis 0 alone (up to 2^31 - 1) and split the id here, blocks varying fastest: the
order in which programs start is the same as on a ``(blocks, batch heads)`` grid.

``cdiv`` and ``next_power_of_2`` are plain-Python twins of Triton's, for launchers: Triton's
are ConstexprFunctions, slow to call from Python, and a launch makes several.
"""

import triton
import triton.language as tl


@triton.jit
def flat_program(BLOCKS):
    """``(block, group)`` of this program on a flat axis-0 grid of ``BLOCKS`` per group."""
    pid = tl.program_id(0)
    return pid % BLOCKS, pid // BLOCKS


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for launch sizes on the host."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (0 for 0, as ``triton.next_power_of_2``), on the host."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def flat_grid(blocks: int, groups: int, *rest: int) -> tuple[int, ...]:
    """The launch grid matching :func:`flat_program`: ``(blocks * groups, *rest)``."""
    return (blocks * groups, *rest)
