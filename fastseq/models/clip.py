"""CLIP (Radford et al. 2021) on fastseq's attention, in transformers' layout.

Two towers of pre-norm Transformer layers: the text tower reads token ids under a causal mask and
is pooled at each sequence's end-of-text token; the image tower is a ViT pooled at its class
token. Each pooled vector is projected into a shared space; the logits of every image-text pair
are their cosine similarity times ``exp(logit_scale)``. Module and parameter names are
transformers' ``CLIPModel``'s, so :meth:`CLIP.from_hf` loads its state dict as it is.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from fastseq.models.inputs import check_images, check_token_ids
from fastseq.nn.functional import scaled_dot_product_attention

ACTIVATIONS = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "gelu": F.gelu}


@dataclasses.dataclass
class TowerConfig:
    """One tower's sizes (transformers' ``CLIPTextConfig`` / ``CLIPVisionConfig`` fields)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int


@dataclasses.dataclass
class CLIPConfig:
    """Sizes of a :class:`CLIP`: the two towers, the text vocabulary and context, the image and
    patch size, and the shared space's width."""

    text: TowerConfig = dataclasses.field(default_factory=lambda: TowerConfig(512, 12, 8, 2048))
    vision: TowerConfig = dataclasses.field(default_factory=lambda: TowerConfig(768, 12, 12, 3072))
    vocab_size: int = 49408
    max_position_embeddings: int = 77
    eos_token_id: int = 49407  # pooling position: the first EOS (2: legacy checkpoints, the argmax id)
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    projection_dim: int = 512
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    logit_scale_init_value: float = 2.6592

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"CLIPConfig: hidden_act must be one of {sorted(ACTIVATIONS)}, got "
                             f"{self.hidden_act!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"CLIPConfig: image_size ({self.image_size}) must be a multiple of "
                             f"patch_size ({self.patch_size})")
        for tower in (self.text, self.vision):
            if tower.hidden_size % tower.num_attention_heads:
                raise ValueError(f"CLIPConfig: hidden_size {tower.hidden_size} must be a multiple of "
                                 f"num_attention_heads {tower.num_attention_heads}")


class CLIPAttention(nn.Module):
    def __init__(self, tower: TowerConfig):
        super().__init__()
        width, self.heads = tower.hidden_size, tower.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x, attn_mask=None, is_causal=False):
        batch, length, width = x.shape

        def heads(projection):
            return projection(x).view(batch, length, self.heads, -1).transpose(1, 2)

        out = scaled_dot_product_attention(heads(self.q_proj), heads(self.k_proj), heads(self.v_proj),
                                           attn_mask=attn_mask, is_causal=is_causal)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class CLIPMLP(nn.Module):
    def __init__(self, tower: TowerConfig, activation):
        super().__init__()
        self.activation = activation
        self.fc1 = nn.Linear(tower.hidden_size, tower.intermediate_size)
        self.fc2 = nn.Linear(tower.intermediate_size, tower.hidden_size)

    def forward(self, x):
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, tower: TowerConfig, config: CLIPConfig):
        super().__init__()
        self.self_attn = CLIPAttention(tower)
        self.layer_norm1 = nn.LayerNorm(tower.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(tower, ACTIVATIONS[config.hidden_act])
        self.layer_norm2 = nn.LayerNorm(tower.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x, attn_mask=None, is_causal=False):
        x = x + self.self_attn(self.layer_norm1(x), attn_mask, is_causal)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, tower: TowerConfig, config: CLIPConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(tower, config) for _ in range(tower.num_hidden_layers))

    def forward(self, x, attn_mask=None, is_causal=False):
        for layer in self.layers:
            x = layer(x, attn_mask, is_causal)
        return x


def check_text(config: CLIPConfig, input_ids, attention_mask) -> None:
    """Refuse ids outside the vocabulary, more tokens than positions, a mask unlike the ids."""
    check_token_ids(input_ids, config.vocab_size, "CLIP")
    if input_ids.shape[1] > config.max_position_embeddings:
        raise ValueError(f"fastseq CLIP: input_ids has {input_ids.shape[1]} tokens, more than the "
                         f"{config.max_position_embeddings} positions of the text tower")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"fastseq CLIP: attention_mask must be {tuple(input_ids.shape)} like "
                         f"input_ids, got {tuple(attention_mask.shape)}")


class TextEmbeddings(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.text.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.text.hidden_size)

    def forward(self, input_ids):
        return self.token_embedding(input_ids) + self.position_embedding.weight[:input_ids.shape[1]]


class TextTransformer(nn.Module):
    """Token ids ``(B, T)`` -> the end-of-text token's final state ``(B, text width)``."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.embeddings = TextEmbeddings(config)
        self.encoder = CLIPEncoder(config.text, config)
        self.final_layer_norm = nn.LayerNorm(config.text.hidden_size, eps=config.layer_norm_eps)

    def token_states(self, input_ids, attention_mask=None):
        """Every token's final state ``(B, T, text width)`` (transformers' ``CLIPTextModel``
        ``last_hidden_state``: the text context of a latent-diffusion U-Net)."""
        check_text(self.config, input_ids, attention_mask)
        x = self.embeddings(input_ids)
        if attention_mask is None:
            x = self.encoder(x, is_causal=True)
        else:  # causal, and padded keys masked: a bool keep-mask (B, 1, T, T)
            length = input_ids.shape[1]
            causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
            x = self.encoder(x, attn_mask=causal & attention_mask.bool()[:, None, None, :])
        return self.final_layer_norm(x)

    def forward(self, input_ids, attention_mask=None):
        x = self.token_states(input_ids, attention_mask)
        if self.config.eos_token_id == 2:  # legacy checkpoints: the EOS has the highest id
            eos = input_ids.argmax(-1)
        else:
            eos = (input_ids == self.config.eos_token_id).int().argmax(-1)
        return x[torch.arange(x.shape[0], device=x.device), eos]

    @classmethod
    def from_hf(cls, model) -> TextTransformer:
        """The text tower equivalent to transformers' ``CLIPTextModel`` ``model`` (Stable
        Diffusion's text encoder), holding its weights."""
        from fastseq.models.clip_weights import text_tower_from_hf

        return text_tower_from_hf(cls, model)


class VisionEmbeddings(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        width = config.vision.hidden_size
        self.class_embedding = nn.Parameter(torch.randn(width))
        self.patch_embedding = nn.Conv2d(config.num_channels, width, config.patch_size, config.patch_size,
                                         bias=False)
        self.position_embedding = nn.Embedding((config.image_size // config.patch_size) ** 2 + 1, width)

    def forward(self, pixel_values):
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], 1) + self.position_embedding.weight


class VisionTransformer(nn.Module):
    """Images ``(B, C, H, W)`` -> the class token's final state ``(B, vision width)``."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        width = config.vision.hidden_size
        self.embeddings = VisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config.vision, config)
        self.post_layernorm = nn.LayerNorm(width, eps=config.layer_norm_eps)

    def forward(self, pixel_values):
        x = self.encoder(self.pre_layrnorm(self.embeddings(pixel_values)))
        return self.post_layernorm(x[:, 0])


@dataclasses.dataclass
class CLIPOutput:
    """What :meth:`CLIP.forward` returns (transformers' ``CLIPOutput`` fields)."""

    logits_per_image: torch.Tensor  # (images, texts)
    logits_per_text: torch.Tensor  # (texts, images)
    text_embeds: torch.Tensor  # (texts, projection_dim), unit length
    image_embeds: torch.Tensor  # (images, projection_dim), unit length
    loss: torch.Tensor | None = None


def contrastive_loss(logits_per_text) -> torch.Tensor:
    """CLIP's symmetric cross-entropy: text ``i`` belongs with image ``i``, and image ``i`` with
    text ``i``."""
    targets = torch.arange(logits_per_text.shape[0], device=logits_per_text.device)
    return (F.cross_entropy(logits_per_text, targets) + F.cross_entropy(logits_per_text.t(), targets)) / 2


class CLIP(nn.Module):
    """``forward(input_ids (T, L), pixel_values (I, C, H, W), attention_mask=None,
    return_loss=False)`` -> :class:`CLIPOutput`."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.text_model = TextTransformer(config)
        self.vision_model = VisionTransformer(config)
        self.visual_projection = nn.Linear(config.vision.hidden_size, config.projection_dim, bias=False)
        self.text_projection = nn.Linear(config.text.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))

    def encode_text(self, input_ids, attention_mask=None):
        """Token ids ``(T, L)`` (1s in ``attention_mask`` for real tokens) -> ``(T, projection_dim)``,
        not normalised."""
        return self.text_projection(self.text_model(input_ids, attention_mask))

    def encode_image(self, pixel_values):
        """Images ``(I, C, H, W)`` -> ``(I, projection_dim)``, not normalised."""
        config = self.config
        check_images(pixel_values, config.num_channels, config.image_size, "CLIP", "pixel_values")
        return self.visual_projection(self.vision_model(pixel_values))

    def forward(self, input_ids, pixel_values, attention_mask=None, return_loss=False) -> CLIPOutput:
        # The image tower first, as transformers runs it: the backward then goes through the text
        # tower while the image tower's activations are held, which peaks lower for these sizes
        # (benchmarks/results/cpu/clip_memory.json).
        image = F.normalize(self.encode_image(pixel_values), dim=-1)
        text = F.normalize(self.encode_text(input_ids, attention_mask), dim=-1)
        logits_per_text = self.logit_scale.exp() * text @ image.t()
        loss = contrastive_loss(logits_per_text) if return_loss else None
        return CLIPOutput(logits_per_text.t(), logits_per_text, text, image, loss)

    @torch.no_grad()
    def zero_shot_logits(self, pixel_values, class_input_ids, class_attention_mask=None):
        """Each image's logits ``(I, classes)`` over classes described by prompts: ``class_input_ids``
        ``(classes, prompts, L)``; a class's embedding is the normalised mean of its prompts'."""
        classes, prompts, length = class_input_ids.shape
        mask = None if class_attention_mask is None else class_attention_mask.reshape(-1, length)
        text = F.normalize(self.encode_text(class_input_ids.reshape(-1, length), mask), dim=-1)
        text = F.normalize(text.view(classes, prompts, -1).mean(1), dim=-1)
        image = F.normalize(self.encode_image(pixel_values), dim=-1)
        return self.logit_scale.exp() * image @ text.t()

    @classmethod
    def from_hf(cls, model) -> CLIP:
        """The CLIP equivalent to transformers' ``CLIPModel`` ``model``, holding its weights."""
        from fastseq.models.clip_weights import from_hf

        return from_hf(cls, model)
