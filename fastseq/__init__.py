"""fastseq: fused Triton and CUDA/C++ kernels for sequence models, as drop-in PyTorch ops and modules.

Quick start::

    import torch, fastseq
    rope = fastseq.nn.RotaryEmbedding(128)
    q, k = rope(q, k)                       # q, k: (B, N, H, 128)
    with fastseq.use_backend("reference"):  # force a backend for a block of code
        ...
"""

from fastseq import nn
from fastseq._backend import available_backends, use_backend
from fastseq.ops.attention import attention
from fastseq.ops.attention_decode import attention_decode, kv_cache_append
from fastseq.ops.cross_attention import cross_attention, feature_map_heads
from fastseq.ops.negative_sampling import negative_sampling_loss
from fastseq.ops.rotary import apply_rotary, apply_rotary_pos_emb

__version__ = "0.1.0"

__all__ = [
    "attention",
    "attention_decode",
    "cross_attention",
    "feature_map_heads",
    "apply_rotary",
    "apply_rotary_pos_emb",
    "available_backends",
    "kv_cache_append",
    "negative_sampling_loss",
    "nn",
    "use_backend",
]
