"""The Vision Transformer (Dosovitskiy et al. 2021) on fastseq's attention, in timm's layout.

An image is cut into patches, each patch projected to a token; a class token and register tokens
(Darcet et al. 2024) go in front, learned positions are added, and pre-norm Transformer blocks
(optionally with QK-norm and LayerScale) run over the sequence; the class token or the mean of the
patch tokens is classified. Module and parameter names are timm's ``VisionTransformer``'s, so
``ViT.from_timm(model)`` (:mod:`fastseq.models.vit_weights`) loads its state dict as it is.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from fastseq.models.inputs import check_images, check_positive_ints
from fastseq.nn.functional import scaled_dot_product_attention

POOLS = ("token", "avg")


@dataclasses.dataclass
class ViTConfig:
    """Sizes and options of a :class:`ViT` (timm's ``VisionTransformer`` arguments of the same
    names)."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    proj_bias: bool = True
    qk_norm: bool = False
    init_values: float | None = None  # LayerScale's initial value (None: no LayerScale)
    class_token: bool = True
    reg_tokens: int = 0
    no_embed_class: bool = False  # positions for the patches only, not the prefix tokens
    pre_norm: bool = False  # a LayerNorm before the blocks (and no bias in the patch projection)
    final_norm: bool = True
    global_pool: str = "token"  # "token": the class token; "avg": the mean of the patch tokens
    fc_norm: bool | None = None  # a LayerNorm after pooling (default: with "avg" pooling)
    norm_eps: float = 1e-6
    dropout: float = 0.0  # attention-probability dropout

    def __post_init__(self):
        check_positive_ints(self, ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads"),
                            "ViTConfig")
        if self.img_size % self.patch_size:
            raise ValueError(f"ViTConfig: img_size ({self.img_size}) must be a multiple of patch_size "
                             f"({self.patch_size})")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"ViTConfig: embed_dim ({self.embed_dim}) must be a multiple of num_heads "
                             f"({self.num_heads})")
        if self.global_pool not in POOLS:
            raise ValueError(f"ViTConfig: global_pool must be one of {POOLS}, got {self.global_pool!r}")
        if self.global_pool == "token" and not self.class_token:
            raise ValueError("ViTConfig: global_pool='token' needs class_token=True")
        if self.fc_norm is None:
            self.fc_norm = self.global_pool == "avg"

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.reg_tokens


class PatchEmbed(nn.Module):
    """``(B, C, H, W)`` images -> ``(B, patches, embed_dim)`` tokens, one per ``patch_size``
    square, row by row."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(config.in_chans, config.embed_dim, config.patch_size, config.patch_size,
                              bias=not config.pre_norm)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention over all tokens, with optional LayerNorm on queries and keys."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        dim, self.num_heads = config.embed_dim, config.num_heads
        self.head_dim = dim // config.num_heads
        self.dropout = config.dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=config.qkv_bias)
        norm = (lambda: nn.LayerNorm(self.head_dim, eps=config.norm_eps)) if config.qk_norm else nn.Identity
        self.q_norm, self.k_norm = norm(), norm()
        self.proj = nn.Linear(dim, dim, bias=config.proj_bias)

    def heads(self, x):
        """``(B, N, dim)`` -> queries and keys after their norms, values: ``(B, heads, N, head_dim)``."""
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return self.q_norm(q), self.k_norm(k), v

    def forward(self, x):
        q, k, v = self.heads(x)
        out = scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).flatten(2))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x):
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        hidden = int(config.embed_dim * config.mlp_ratio)
        self.fc1 = nn.Linear(config.embed_dim, hidden)
        self.fc2 = nn.Linear(hidden, config.embed_dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm: ``x + ls1(attn(norm1(x)))``, then ``x + ls2(mlp(norm2(x)))``."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        dim = config.embed_dim

        def layer_scale():
            return nn.Identity() if config.init_values is None else LayerScale(dim, config.init_values)

        self.norm1 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.attn = Attention(config)
        self.ls1 = layer_scale()
        self.norm2 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.mlp = Mlp(config)
        self.ls2 = layer_scale()

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    """``forward(images (B, in_chans, img_size, img_size))`` -> logits ``(B, num_classes)``;
    :meth:`forward_features` gives the tokens ``(B, prefix + patches, embed_dim)``."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if config.class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, config.reg_tokens, dim)) if config.reg_tokens else None
        positions = config.num_patches + (0 if config.no_embed_class else config.num_prefix_tokens)
        self.pos_embed = nn.Parameter(torch.randn(1, positions, dim) * 0.02)
        self.norm_pre = nn.LayerNorm(dim, eps=config.norm_eps) if config.pre_norm else nn.Identity()
        self.blocks = nn.Sequential(*(Block(config) for _ in range(config.depth)))
        final = config.final_norm and not config.fc_norm
        self.norm = nn.LayerNorm(dim, eps=config.norm_eps) if final else nn.Identity()
        self.fc_norm = nn.LayerNorm(dim, eps=config.norm_eps) if config.fc_norm else nn.Identity()
        self.head = nn.Linear(dim, config.num_classes) if config.num_classes else nn.Identity()
        for token in (self.cls_token, self.reg_token):
            if token is not None:
                nn.init.normal_(token, std=1e-6)

    def forward_features(self, images):
        """The tokens after the blocks and the final norm: ``(B, prefix + patches, embed_dim)``."""
        config = self.config
        check_images(images, config.in_chans, config.img_size, "ViT")
        x = self.patch_embed(images)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.config.no_embed_class:
            x = torch.cat([*prefix, x + self.pos_embed], 1)
        else:
            x = torch.cat([*prefix, x], 1) + self.pos_embed
        return self.norm(self.blocks(self.norm_pre(x)))

    def forward(self, images):
        x = self.forward_features(images)
        if self.config.global_pool == "token":
            x = x[:, 0]
        else:
            x = x[:, self.config.num_prefix_tokens:].mean(1)
        return self.head(self.fc_norm(x))

    @classmethod
    def from_timm(cls, model) -> ViT:
        """The ViT equivalent to timm's ``VisionTransformer`` ``model``, holding its weights."""
        from fastseq.models.vit_weights import from_timm

        return from_timm(cls, model)
