"""The ops of fastseq: schema, backend choice, autograd, fake (meta) impl and input checks.

Each module registers its op family under ``torch.ops.fastseq`` and is the only place that launches
the kernels of that family.
"""

from fastseq.ops.attention import attention
from fastseq.ops.rotary import apply_rotary, apply_rotary_pos_emb

__all__ = ["apply_rotary", "apply_rotary_pos_emb", "attention"]
