"""The latent-diffusion transformer block: ``CrossAttention`` and ``SpatialTransformer``.

``SpatialTransformer`` is the block of Stable Diffusion's U-Net: GroupNorm -> proj_in -> depth x
[LayerNorm -> self-attention -> LayerNorm -> cross-attention -> LayerNorm -> GEGLU feed-forward]
(each with a residual) -> proj_out -> + input. Self-attention runs the flash-attention kernels;
cross-attention to a short text context runs the short-context kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastseq.ops.attention import attention
from fastseq.ops.cross_attention import MAX_CONTEXT, cross_attention


def _fail(module, message):
    raise ValueError(f"fastseq {module}: {message}")


def _check_tokens(module, name, t, width):
    """``t`` is a (B, L, width) tensor of tokens; errors name ``module``."""
    if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[-1] != width:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        _fail(module, f"{name} must be (B, L, {width}) tokens, got {shape}")


class CrossAttention(nn.Module):
    """Multi-head attention of ``x`` (B, N, query_dim) over ``context`` (B, M, context_dim).

    With ``context=None`` it is self-attention. Parameter names follow latent-diffusion and
    diffusers (``to_q``, ``to_k``, ``to_v``, ``to_out``); ``bias`` gives the q/k/v projections
    biases (the autoencoder's attention has them, the U-Net's do not).
    """

    def __init__(self, query_dim, context_dim=None, heads=8, head_dim=64, dropout=0.0, bias=False):
        super().__init__()
        for name, value in (("query_dim", query_dim), ("heads", heads), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                _fail("CrossAttention", f"{name} must be a positive int, got {value!r}")
        inner = heads * head_dim
        context_dim = context_dim or query_dim
        self.heads, self.head_dim = heads, head_dim
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim, inner, bias=bias)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def _heads(self, t):
        return t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def forward(self, x, context=None, context_lengths=None, context_mask=None):
        """Returns (B, N, query_dim). ``context_lengths`` (B,) marks padded context tokens at the
        end; ``context_mask`` (B, M) bool (True = attend) masks any of them."""
        _check_tokens("CrossAttention", "x", x, self.to_q.in_features)
        if context is not None:
            _check_tokens("CrossAttention", "context", context, self.to_k.in_features)
            if context.shape[0] != x.shape[0]:
                _fail("CrossAttention", f"context batch {context.shape[0]} must match x batch "
                                        f"{x.shape[0]}")
        q = self._heads(self.to_q(x))
        source = x if context is None else context
        k, v = self._heads(self.to_k(source)), self._heads(self.to_v(source))
        if context_mask is not None:
            out = attention(q, k, v, attn_mask=context_mask[:, None, None, :])
        elif context is not None and k.shape[2] <= MAX_CONTEXT:
            out = cross_attention(q, k, v, context_lengths=context_lengths)
        else:
            out = attention(q, k, v, key_lengths=context_lengths)
        return self.to_out(out.transpose(1, 2).flatten(2))


class GEGLU(nn.Module):
    """``x W1 * gelu(x W2)``: the gated feed-forward input projection of latent diffusion."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU up-projection, dropout, down-projection (``net.0.proj``, ``net.2``, as latent-diffusion
    and diffusers name them)."""

    def __init__(self, dim, mult=4, dropout=0.0):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class TransformerBlock(nn.Module):
    """LayerNorm -> self-attention -> LayerNorm -> cross-attention -> LayerNorm -> GEGLU FF."""

    def __init__(self, dim, heads, head_dim, context_dim, dropout=0.0, ff_mult=4):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1 = CrossAttention(dim, None, heads, head_dim, dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads, head_dim, dropout)
        self.ff = FeedForward(dim, ff_mult, dropout)

    def forward(self, x, context, context_lengths=None, context_mask=None):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context, context_lengths, context_mask) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """The latent-diffusion transformer over a feature map (B, C, H, W) with a text context.

    Args:
        in_channels: C. heads, head_dim: attention heads (inner width ``heads * head_dim``).
        depth: transformer blocks. context_dim: width of the context tokens.
        num_groups: GroupNorm groups. use_linear: proj_in/out as Linear (SD 2.x, SDXL) instead
            of 1x1 convolutions (SD 1.x).

    Parameter names are latent-diffusion's and diffusers' ``Transformer2DModel``'s.
    """

    def __init__(self, in_channels, heads, head_dim, depth=1, context_dim=768, num_groups=32,
                 dropout=0.0, use_linear=False):
        super().__init__()
        inner = heads * head_dim
        self.use_linear, self.context_dim = use_linear, context_dim
        self.norm = nn.GroupNorm(num_groups, in_channels, eps=1e-6)
        if use_linear:
            self.proj_in, self.proj_out = nn.Linear(in_channels, inner), nn.Linear(inner, in_channels)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner, 1)
            self.proj_out = nn.Conv2d(inner, in_channels, 1)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(inner, heads, head_dim, context_dim, dropout) for _ in range(depth))

    def forward(self, x, context, context_lengths=None, context_mask=None):
        """x (B, C, H, W), context (B, M, context_dim) -> (B, C, H, W); ``context_lengths`` /
        ``context_mask`` as :meth:`CrossAttention.forward` takes them."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.norm.num_channels:
            _fail("SpatialTransformer", f"x must be a (B, {self.norm.num_channels}, H, W) feature "
                  f"map, got {tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        _check_tokens("SpatialTransformer", "context", context, self.context_dim)
        batch, _, height, width = x.shape
        h = self.norm(x)
        if self.use_linear:
            h = self.proj_in(h.flatten(2).transpose(1, 2))
        else:
            h = self.proj_in(h).flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            h = block(h, context, context_lengths, context_mask)
        # Back to a contiguous (B, C, H, W) map, as diffusers does: the tokens' layout is
        # channels-last, which every later convolution would follow, converting its weights to
        # that format on each call.
        if self.use_linear:
            h = self.proj_out(h).transpose(1, 2).unflatten(2, (height, width)).contiguous()
        else:
            h = self.proj_out(h.transpose(1, 2).unflatten(2, (height, width)).contiguous())
        return h + x
