"""An attention processor for diffusers' ``Attention`` modules that runs fastseq's kernels.

Install it with ``fastseq.integrations.diffusers.install(unet)``, which replaces diffusers' default
processors and leaves the ones that do more (added key/value projections, joint attention,
IP-adapters) in place; ``unet.set_attn_processor(AttnProcessor())`` would replace those too.
It follows diffusers' default ``AttnProcessor2_0`` step for step (spatial and group norms, 4-D
inputs, attention masks, cross-attention norms, residual connection, output rescaling) and only
replaces the attention itself: cross-attention to a short context takes the short-context kernel,
everything else the flash-attention kernels.
"""

from __future__ import annotations

import torch

from fastseq.ops.attention import attention
from fastseq.ops.cross_attention import MAX_CONTEXT, cross_attention


class AttnProcessor:
    """diffusers attention processor on fastseq kernels (same call signature as diffusers')."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        batch, length, _ = (hidden_states if encoder_hidden_states is None
                            else encoder_hidden_states).shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        is_cross = encoder_hidden_states is not None
        if not is_cross:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads

        def heads(t):
            return t.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = heads(query), heads(key), heads(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        scale = attn.scale if getattr(attn, "scale_qk", True) else 1.0
        if is_cross and attention_mask is None and key.shape[2] <= MAX_CONTEXT:
            hidden_states = cross_attention(query, key, value, scale=scale)
        else:
            hidden_states = attention(query, key, value, attn_mask=attention_mask, scale=scale)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.to(query.dtype)))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


# The processors whose computation AttnProcessor reproduces. Others (added key/value projections
# as in DeepFloyd IF / UnCLIP, joint attention, IP-adapters...) do more, and are left in place.
_DEFAULT_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0")


def install(model: torch.nn.Module) -> torch.nn.Module:
    """Set :class:`AttnProcessor` on every diffusers ``Attention`` module inside ``model`` (a U-Net,
    a ``Transformer2DModel``, a single block...) that runs diffusers' default processor; modules
    with other processors keep theirs. Returns ``model``."""
    processor = AttnProcessor()
    attention_modules = [m for m in model.modules()
                         if hasattr(m, "set_processor") and hasattr(m, "processor")]
    if not attention_modules:
        raise ValueError(f"fastseq install: no diffusers Attention module inside {type(model).__name__}")
    for module in attention_modules:
        if type(module.processor).__name__ in _DEFAULT_PROCESSORS:
            module.set_processor(processor)
    return model
