"""fastseq inside transformers: an attention backend, and a Liger-style ``apply``.

``register()`` adds ``"fastseq"`` to transformers' ``AttentionInterface`` (with the mask function
of ``"sdpa"`` in ``AttentionMaskInterface``: a boolean keep-mask, or None where causality alone
describes it), so that any model that goes through the interface runs
``attn_implementation="fastseq"``: causal and bidirectional models, padding, sliding windows
(through the mask), grouped-query heads as they come (never repeated), dropout in training.

``apply(model)`` registers, switches the model to it, and swaps the rotary embedding function of
Llama-family modelling files for :func:`fastseq.apply_rotary_pos_emb` (module-wide, as Liger-Kernel
patches), and returns the model.
"""

from __future__ import annotations

import importlib

from fastseq.ops.attention import attention
from fastseq.ops.rotary import apply_rotary_pos_emb

NAME = "fastseq"
UNSUPPORTED = ("softcap", "sliding_window_size", "sinks", "s_aux", "position_bias")


def fastseq_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                              is_causal=None, **kwargs):
    """transformers' attention-function signature: ``query`` ``(B, H, L, D)``, ``key``/``value``
    ``(B, Hk, S, D)``; returns ``(out (B, L, H, D), None)`` (no attention weights)."""
    for option in UNSUPPORTED:
        if kwargs.get(option) is not None:
            raise ValueError(f"fastseq attention backend: {option} is not supported")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q_length, kv_length = query.shape[2], key.shape[2]
    if attention_mask is not None:
        causal = False  # the mask says everything, causality included
    elif causal and q_length > 1 and kv_length > q_length:
        # A prefill into an empty static cache: the slots after the prompt are not filled yet.
        key, value = key[:, :, :q_length], value[:, :, :q_length]
    causal = causal and q_length > 1  # one new token sees every cached key
    out = attention(query, key, value, causal=causal, attn_mask=attention_mask,
                    dropout_p=dropout if module.training else 0.0, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make ``attn_implementation="fastseq"`` available to every transformers model. Idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, fastseq_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


ROTARY_MODULES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3")


def apply(model):
    """Run ``model`` (a transformers ``PreTrainedModel``) on fastseq, in place: its attention
    through the ``"fastseq"`` backend and, in Llama-family modelling files, rotary embeddings
    through :func:`fastseq.apply_rotary_pos_emb`. Returns ``model``."""
    register()
    model.set_attn_implementation(NAME)
    family = type(model).__module__.split(".")
    if len(family) >= 3 and family[-2] in ROTARY_MODULES:
        modelling = importlib.import_module(type(model).__module__)
        if hasattr(modelling, "apply_rotary_pos_emb"):
            modelling.apply_rotary_pos_emb = apply_rotary_pos_emb
    return model


def is_registered() -> bool:
    """Whether ``"fastseq"`` is in transformers' attention interface."""
    from transformers import AttentionInterface

    return NAME in AttentionInterface._global_mapping


__all__ = ["apply", "fastseq_attention_forward", "is_registered", "register"]
