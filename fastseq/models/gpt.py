"""A decoder-only language model on fastseq's modules: GPT-2 and the Llama family in one class.

``GPTConfig`` picks the flavour: GPT-2 (learned positions, LayerNorm, GELU MLP, biases, tied
embeddings) or Llama (RMSNorm, rotary positions with any scaling ``fastseq.nn.RotaryEmbedding``
takes, SwiGLU MLP, grouped-query attention, no biases; Mistral's sliding window and Qwen2's q/k/v
biases are options of it). Attention is ``fastseq.nn.Attention``: the fused attention kernels for
a whole sequence, the split-KV decode kernels over a static KV cache for generation.

``GPT.from_hf`` / ``GPT.from_pretrained`` (:mod:`fastseq.models.gpt_weights`) load the weights
of transformers' ``GPT2LMHeadModel``, ``LlamaForCausalLM``, ``MistralForCausalLM`` and
``Qwen2ForCausalLM``.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from fastseq.models.decoding import next_token
from fastseq.models.inputs import check_positive_ints, describe
from fastseq.nn import Attention, KVCache, Linear, RotaryEmbedding

FLAVOURS = ("gpt2", "llama")
# generate(compile=True) sizes its KV cache in multiples of this: one compiled decode step serves
# every prompt length and token budget up to the same multiple.
COMPILED_CACHE_STEP = 256


@dataclasses.dataclass
class GPTConfig:
    """Sizes and options of a :class:`GPT`.

    ``flavour`` sets the architecture (``"gpt2"`` or ``"llama"``); the fields below it default
    to that flavour's choices when left None.
    """

    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    flavour: str = "gpt2"
    n_kv_head: int | None = None  # grouped-query attention: fewer k/v heads (default n_head)
    head_dim: int | None = None  # default n_embd // n_head
    intermediate_size: int | None = None  # MLP width (default 4 n_embd)
    max_position_embeddings: int = 1024  # GPT-2: the learned positions; Llama: the context
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # a transformers-style rope_scaling dict
    qkv_bias: bool | None = None  # default: True for gpt2, False for llama
    out_bias: bool | None = None  # attention output projection (default: as qkv_bias)
    mlp_bias: bool | None = None  # default: True for gpt2, False for llama
    tie_word_embeddings: bool | None = None  # default: True for gpt2, False for llama
    sliding_window: int | None = None  # each token sees itself and the window - 1 before it
    gelu_approximate: str = "tanh"  # gpt2's GELU ("tanh" is GPT-2's gelu_new, "none" exact)
    dropout: float = 0.0

    def __post_init__(self):
        if self.flavour not in FLAVOURS:
            raise ValueError(f"GPTConfig: flavour must be one of {FLAVOURS}, got {self.flavour!r}")
        gpt2 = self.flavour == "gpt2"
        for name, value in (("qkv_bias", gpt2), ("mlp_bias", gpt2), ("tie_word_embeddings", gpt2)):
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.out_bias is None:
            self.out_bias = self.qkv_bias
        self.n_kv_head = self.n_kv_head or self.n_head
        self.head_dim = self.head_dim or self.n_embd // self.n_head
        self.intermediate_size = self.intermediate_size or 4 * self.n_embd
        check_positive_ints(self, ("vocab_size", "n_layer", "n_head", "n_embd", "max_position_embeddings"),
                            "GPTConfig")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"GPTConfig: n_head ({self.n_head}) must be a multiple of n_kv_head "
                             f"({self.n_kv_head})")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"GPTConfig: sliding_window must be a positive int or None, got "
                             f"{self.sliding_window!r}")


class MLP(nn.Module):
    """GPT-2's ``proj(gelu(fc(x)))`` or Llama's SwiGLU ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        width, inner, bias = config.n_embd, config.intermediate_size, config.mlp_bias
        self.swiglu = config.flavour == "llama"
        self.approximate = config.gelu_approximate
        if self.swiglu:
            self.gate = Linear(width, inner, bias=bias)
        self.up = Linear(width, inner, bias=bias)
        self.down = Linear(inner, width, bias=bias)

    def forward(self, x):
        if self.swiglu:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x), approximate=self.approximate))


def _norm(config: GPTConfig) -> nn.Module:
    if config.flavour == "llama":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, config: GPTConfig, rotary: RotaryEmbedding | None):
        super().__init__()
        self.norm1, self.norm2 = _norm(config), _norm(config)
        self.attn = Attention(config.n_embd, config.n_head, config.n_kv_head, config.head_dim,
                              bias=config.qkv_bias, out_bias=config.out_bias, rotary=rotary,
                              dropout=config.dropout)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, positions, cache, attn_mask):
        x = x + self.dropout(self.attn(self.norm1(x), positions=positions, cache=cache,
                                       attn_mask=attn_mask))
        return x + self.dropout(self.mlp(self.norm2(x)))


class GPT(nn.Module):
    """A GPT-2 or Llama-family causal language model (see :class:`GPTConfig`)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = (nn.Embedding(config.max_position_embeddings, config.n_embd)
                    if config.flavour == "gpt2" else None)
        rotary = None
        if config.flavour == "llama":
            scaling = config.rope_scaling
            if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "default":
                scaling = None
            rotary = RotaryEmbedding(config.head_dim, base=config.rope_theta, scaling=scaling)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, rotary) for _ in range(config.n_layer))
        self.norm_f = _norm(config)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.wte.weight
        self._compiled_step = None  # generate(compile=True)'s decode step, compiled on first use
        self.apply(self._init_weights)
        for name, param in self.named_parameters():  # GPT-2's scaled residual projections
            if name.endswith(("o_proj.weight", "mlp.down.weight")):
                nn.init.normal_(param, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # -- the forward pass ------------------------------------------------------------------------

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None):
        """Logits ``(B, T, vocab)``, in the parameters' dtype (autocast's under autocast).

        Args:
            input_ids: ``(B, T)`` token ids in ``[0, vocab_size)``.
            attention_mask: optional ``(B, T)`` of 1 (token) and 0 (padding), left or right
                padding: each token's logits are those of its sequence without the padding
                (positions count the tokens only). Not with ``cache``.
            position_ids: optional ``(B, T)`` or ``(T,)`` positions (default ``0 .. T-1``, or
                counted over the tokens of ``attention_mask``, or from each cache's length).
            cache: a list of one :class:`fastseq.nn.KVCache` per layer (:meth:`new_cache`): the
                tokens are appended to it and attend to everything cached before them.
        """
        self._check_inputs(input_ids, attention_mask, position_ids, cache)
        return self._logits(input_ids, attention_mask, position_ids, cache)

    def _logits(self, input_ids, attention_mask, position_ids, cache):
        """:meth:`forward` after its checks (``generate`` makes them once, not per token)."""
        batch, length = input_ids.shape
        attn_mask = None
        if attention_mask is not None and (torch.compiler.is_compiling()
                                           or not bool(attention_mask.all())):
            keep = attention_mask.bool()
            attn_mask = keep[:, None, None, :]
            if position_ids is None:  # positions count the tokens, not the padding
                position_ids = (keep.long().cumsum(1) - 1).clamp(min=0)
        attn_mask = self._with_window(attn_mask, length, input_ids.device, cache)
        x = self.wte(input_ids)
        if self.wpe is not None:
            if position_ids is None:
                start = cache[0].lengths[:, None] if cache is not None else 0
                position_ids = start + torch.arange(length, device=input_ids.device)
            x = x + self.wpe(position_ids.expand(batch, length))
            position_ids = None  # GPT-2 has no rotary
        elif position_ids is not None:
            position_ids = position_ids.expand(batch, length)  # (B, T) ids, as rotary takes them
        x = self.drop(x)
        # Rotary positions left None: 0 .. T-1, or each layer's cache length onward.
        for index, block in enumerate(self.blocks):
            x = block(x, position_ids, None if cache is None else cache[index], attn_mask)
        return self.lm_head(self.norm_f(x))

    def _with_window(self, attn_mask, length, device, cache):
        """``attn_mask`` and the sliding window, where the sequence is longer than the window."""
        window = self.config.sliding_window
        if cache is not None:  # (B, 1, T, S) over the cache's slots, from each row's length
            start = cache[0].lengths
            if window is None:
                return attn_mask
            if not torch.compiler.is_compiling() and int(start.max()) + length <= window:
                return attn_mask
            rows = start[:, None] + torch.arange(length, device=device)
            slots = torch.arange(cache[0].k.shape[2], device=device)
            return ((rows[:, :, None] - slots) < window)[:, None]
        if window is None or length <= window:
            return attn_mask
        rows = torch.arange(length, device=device)
        band = (rows[:, None] - rows[None, :]) < window  # the causal flag masks the future
        return band if attn_mask is None else attn_mask & band

    def _check_inputs(self, input_ids, attention_mask, position_ids, cache):
        """``(B, T)`` after checking every argument of :meth:`forward` (values too, except while
        torch.compile traces)."""
        config = self.config
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 \
                or input_ids.is_floating_point() or input_ids.dtype == torch.bool:
            raise ValueError(f"fastseq GPT: input_ids must be a (B, T) integer tensor, got "
                             f"{describe(input_ids)}")
        batch, length = input_ids.shape
        if cache is not None and (len(cache) != config.n_layer or cache[0].k.shape[0] != batch):
            raise ValueError(f"fastseq GPT: cache must hold {config.n_layer} layers of batch "
                             f"{batch} (see new_cache)")
        if attention_mask is not None:
            if cache is not None:
                raise ValueError("fastseq GPT: attention_mask with a cache is not supported; "
                                 "generate() takes padded prompts")
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
                raise ValueError(f"fastseq GPT: attention_mask must be (B, T) = "
                                 f"{tuple(input_ids.shape)}, got {describe(attention_mask)}")
        if position_ids is not None and (not isinstance(position_ids, torch.Tensor)
                                         or position_ids.shape[-1] != length):
            raise ValueError(f"fastseq GPT: position_ids must be (B, {length}) or ({length},), got "
                             f"{describe(position_ids)}")
        if torch.compiler.is_compiling() or not input_ids.numel():
            return batch, length
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= config.vocab_size:
            raise ValueError(f"fastseq GPT: input_ids must lie in [0, {config.vocab_size}), got "
                             f"{int(input_ids.min())}..{int(input_ids.max())}")
        past = 0 if cache is None else int(cache[0].lengths.max())
        if self.wpe is not None and past + length > config.max_position_embeddings:
            raise ValueError(f"fastseq GPT: {past + length} positions exceed the "
                             f"{config.max_position_embeddings} learned positions")
        return batch, length

    # -- generation --------------------------------------------------------------------------------

    def new_cache(self, batch: int, max_len: int, *, device=None, dtype=None) -> list[KVCache]:
        """An empty static KV cache for ``batch`` sequences of up to ``max_len`` tokens."""
        return [block.attn.new_cache(batch, max_len, device=device, dtype=dtype)
                for block in self.blocks]

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None,
                 eos_token_id=None, attention_mask=None, generator=None, compile=False):
        """Continue each prompt by up to ``max_new_tokens`` tokens.

        Args:
            input_ids: ``(B, T)`` prompts, padded (left or right) where ``attention_mask`` is 0.
            temperature: 0 for greedy decoding, else sampling from ``softmax(logits / t)``,
                restricted to the ``top_k`` likeliest tokens and to the smallest set whose
                probability reaches ``top_p``.
            eos_token_id: a row that produces it stops; its later tokens are ``eos_token_id``.
            generator: the ``torch.Generator`` sampling draws from.
            compile: run each decode step through ``torch.compile(fullgraph=True)``, compiled on
                the first call for each batch size and cache size (the cache is then sized in
                multiples of ``COMPILED_CACHE_STEP`` positions, so that other prompt lengths
                reuse the compiled step). The prefill stays eager.

        Returns ``(B, T + n)``: the prompts as given followed by the ``n <= max_new_tokens``
        new tokens (fewer when every row has stopped). The prompts are prefilled in one pass
        into a static cache; each new token is one decode step over it.
        """
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"fastseq GPT: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if temperature < 0:
            raise ValueError(f"fastseq GPT: temperature must be >= 0, got {temperature!r}")
        self._check_inputs(input_ids, attention_mask, None, None)
        batch, width = input_ids.shape
        if max_new_tokens == 0 or batch == 0:
            return input_ids
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        keep = attention_mask.bool()
        lengths = keep.sum(1)
        if bool((lengths == 0).any()):
            raise ValueError("fastseq GPT: every prompt needs at least one token")
        longest = int(lengths.max()) + max_new_tokens
        if self.wpe is not None and longest > self.config.max_position_embeddings:
            raise ValueError(f"fastseq GPT: prompts and new tokens reach {longest} positions, past "
                             f"the {self.config.max_position_embeddings} learned positions")
        # Tokens first, padding after: each row's tokens at cache positions 0 .. length - 1.
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
        packed = input_ids.gather(1, order)
        slots = width + max_new_tokens
        if compile:
            slots = -(-slots // COMPILED_CACHE_STEP) * COMPILED_CACHE_STEP
        cache = self.new_cache(batch, slots, device=input_ids.device, dtype=self.lm_head.weight.dtype)
        decode = self._compiled_decode_step() if compile else self._decode_step
        logits = self(packed, cache=cache)
        for layer in cache:
            layer.lengths = lengths.clone()
        logits = logits[torch.arange(batch, device=logits.device), lengths - 1]
        new, done = [], torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            token = next_token(logits, temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                token = token.masked_fill(done, eos_token_id)
                done |= token == eos_token_id
            new.append(token)
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            logits = decode(token, cache)
        return torch.cat([input_ids, torch.stack(new, dim=1)], dim=1)

    def _decode_step(self, token, cache):
        """Logits ``(B, vocab)`` of one new token per sequence ``(B,)``, appended to ``cache``."""
        return self._logits(token[:, None], None, None, cache)[:, -1]

    def _compiled_decode_step(self):
        if self._compiled_step is None:
            self._compiled_step = torch.compile(self._decode_step, fullgraph=True, dynamic=False)
        return self._compiled_step

    # -- weights of other libraries ----------------------------------------------------------------

    @classmethod
    def from_hf(cls, model) -> GPT:
        """The fastseq model equal to a transformers ``GPT2LMHeadModel``, ``LlamaForCausalLM``,
        ``MistralForCausalLM`` or ``Qwen2ForCausalLM`` (same weights, dtype and device)."""
        from fastseq.models import gpt_weights

        return gpt_weights.from_hf(cls, model)

    @classmethod
    def from_pretrained(cls, path) -> GPT:
        """Load a local Hugging Face checkpoint folder (``config.json`` and safetensors)."""
        from fastseq.models import gpt_weights

        return gpt_weights.from_pretrained(cls, path)
