"""Program ids on a flat grid.

CUDA caps a grid's second and third axes at 65535 programs; batch x heads passes that (a ViT at
batch 8192 has 98304 heads to run). The kernels therefore launch ``blocks x (batch heads)``
programs on axis 0 alone (up to 2^31 - 1) and split the id here, blocks varying fastest: the
order in which programs start is the same as on a ``(blocks, batch heads)`` grid.
"""

import triton
import triton.language as tl


@triton.jit
def flat_program(BLOCKS):
    """``(block, group)`` of this program on a flat axis-0 grid of ``BLOCKS`` per group."""
    pid = tl.program_id(0)
    return pid % BLOCKS, pid // BLOCKS


def flat_grid(blocks: int, groups: int, *rest: int) -> tuple[int, ...]:
    """The launch grid matching :func:`flat_program`: ``(blocks * groups, *rest)``."""
    return (blocks * groups, *rest)
