"""Drop-in ``torch.nn`` modules built on ``fastseq.ops``."""

from fastseq.nn import functional
from fastseq.nn.multihead_attention import MultiheadAttention
from fastseq.nn.rope_scaling import RopeScaling
from fastseq.nn.rotary import RotaryEmbedding

__all__ = ["MultiheadAttention", "RopeScaling", "RotaryEmbedding", "functional"]
