"""Drop-in ``torch.nn`` modules built on ``fastseq.ops``."""

from fastseq.nn.rope_scaling import RopeScaling
from fastseq.nn.rotary import RotaryEmbedding

__all__ = ["RopeScaling", "RotaryEmbedding"]
