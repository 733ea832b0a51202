"""The latent-diffusion U-Net (Rombach et al. 2022) on fastseq's attention, in diffusers' layout.

A noisy latent ``(B, C, H, W)``, its timestep and a text context ``(B, M, context_dim)`` go in; the
predicted noise comes out. The timestep's sinusoidal features pass an MLP into every ResNet block;
the down path halves the resolution level by level, keeping each block's output for the skip
connections of the up path; a mid block works at the lowest resolution. Levels with attention follow
each ResNet block with a ``fastseq.nn.SpatialTransformer``: self-attention over the pixels on the
flash-attention kernels, cross-attention to the text on the short-context kernel.

Module and parameter names are those of diffusers' ``UNet2DConditionModel`` (``CrossAttnDownBlock2D``,
``DownBlock2D``, ``UNetMidBlock2DCrossAttn``, ``UpBlock2D``, ``CrossAttnUpBlock2D``), so
``UNet2DCondition.from_diffusers(model)`` (:mod:`fastseq.models.unet_weights`) loads its state dict
as it is.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from fastseq.models.inputs import check_positive_ints, describe
from fastseq.models.resnet_blocks import (
    Downsample2D,
    ResnetBlock2D,
    TimestepEmbedding,
    Upsample2D,
    timestep_features,
)
from fastseq.nn.spatial_transformer import SpatialTransformer

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")


def _fail(message):
    raise ValueError(f"fastseq UNet2DCondition: {message}")


@dataclasses.dataclass
class UNetConfig:
    """Sizes and options of a :class:`UNet2DCondition` (diffusers' ``UNet2DConditionModel``
    arguments). Per-level options take one value for every level or a tuple with one per level, in
    the down path's order. ``heads`` is what diffusers calls ``attention_head_dim`` (or
    ``num_attention_heads``): the number of heads, each ``channels // heads`` wide."""

    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    mid_block: bool = True  # diffusers' "UNetMidBlock2DCrossAttn" (False: mid_block_type=None)
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    transformer_layers_per_block: int | tuple[int, ...] = 1
    heads: int | tuple[int, ...] = 8
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    downsample_padding: int = 1
    dropout: float = 0.0

    def __post_init__(self):
        levels = len(self.block_out_channels)
        self.block_out_channels = tuple(self.block_out_channels)
        self.down_block_types, self.up_block_types = tuple(self.down_block_types), tuple(self.up_block_types)
        for name, allowed in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
            types = getattr(self, name)
            if len(types) != levels or any(t not in allowed for t in types):
                raise ValueError(f"UNetConfig: {name} must be {levels} of {allowed} (one per entry of "
                                 f"block_out_channels), got {types}")
        for name in ("layers_per_block", "transformer_layers_per_block", "heads"):
            setattr(self, name, self._per_level(name, levels))
        check_positive_ints(self, ("in_channels", "out_channels", "cross_attention_dim", "norm_num_groups"),
                            "UNetConfig")
        for level, (channels, heads) in enumerate(zip(self.block_out_channels, self.heads, strict=True)):
            if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1 \
                    or channels % self.norm_num_groups or channels % heads:
                raise ValueError(f"UNetConfig: block_out_channels[{level}] must be a positive multiple "
                                 f"of norm_num_groups ({self.norm_num_groups}) and of heads ({heads}), "
                                 f"got {channels!r}")

    def _per_level(self, name, levels) -> tuple[int, ...]:
        value = getattr(self, name)
        values = (value,) * levels if isinstance(value, int) else tuple(value)
        if len(values) != levels or any(isinstance(v, bool) or not isinstance(v, int) or v < 1
                                        for v in values):
            raise ValueError(f"UNetConfig: {name} must be a positive int or {levels} of them (one per "
                             f"level), got {value!r}")
        return values


def _spatial_transformer(config: UNetConfig, channels: int, level: int) -> SpatialTransformer:
    heads = config.heads[level]
    return SpatialTransformer(channels, heads, channels // heads, config.transformer_layers_per_block[level],
                              config.cross_attention_dim, config.norm_num_groups, config.dropout,
                              config.use_linear_projection)


def _attentions(config: UNetConfig, channels: int, level: int, count: int, with_attention: bool):
    """``count`` SpatialTransformers of ``level`` (None on a level without attention)."""
    if not with_attention:
        return None
    return nn.ModuleList(_spatial_transformer(config, channels, level) for _ in range(count))


def _resnet(config: UNetConfig, in_channels: int, out_channels: int) -> ResnetBlock2D:
    return ResnetBlock2D(in_channels, out_channels, 4 * config.block_out_channels[0], config.norm_num_groups,
                         config.norm_eps, config.dropout)


class DownBlock(nn.Module):
    """``layers`` ResNet blocks (each followed by a SpatialTransformer on attention levels), then a
    stride-2 convolution except on the last level; returns the output and every intermediate state
    for the skip connections."""

    def __init__(self, config: UNetConfig, level: int, in_channels: int):
        super().__init__()
        channels, layers = config.block_out_channels[level], config.layers_per_block[level]
        self.resnets = nn.ModuleList(_resnet(config, in_channels if i == 0 else channels, channels)
                                     for i in range(layers))
        self.attentions = _attentions(config, channels, level, layers,
                                      config.down_block_types[level] == "CrossAttnDownBlock2D")
        if level < len(config.block_out_channels) - 1:
            self.downsamplers = nn.ModuleList([Downsample2D(channels, config.downsample_padding)])
        else:
            self.downsamplers = None

    def forward(self, x, temb, context, context_lengths, context_mask):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context, context_lengths, context_mask)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """ResNet block, SpatialTransformer, ResNet block at the lowest resolution."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        channels = config.block_out_channels[-1]
        self.resnets = nn.ModuleList(_resnet(config, channels, channels) for _ in range(2))
        self.attentions = nn.ModuleList([_spatial_transformer(config, channels, len(config.heads) - 1)])

    def forward(self, x, temb, context, context_lengths, context_mask):
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context, context_lengths, context_mask)
        return self.resnets[1](x, temb)


class UpBlock(nn.Module):
    """``layers + 1`` ResNet blocks, each taking the previous output concatenated with one skip
    (the latest first), each followed by a SpatialTransformer on attention levels; then
    nearest-neighbour upsampling to the next skip's size and a convolution, except on the last
    level."""

    def __init__(self, config: UNetConfig, up_level: int, prev_channels: int):
        super().__init__()
        levels = len(config.block_out_channels)
        level = levels - 1 - up_level  # the down-path level of the same resolution
        channels, layers = config.block_out_channels[level], config.layers_per_block[level] + 1
        # The last ResNet block takes the skip from the level above's downsampling (or conv_in).
        inputs = [prev_channels] + [channels] * (layers - 1)
        skips = [channels] * (layers - 1) + [config.block_out_channels[max(level - 1, 0)]]
        self.resnets = nn.ModuleList(_resnet(config, x + skip, channels)
                                     for x, skip in zip(inputs, skips, strict=True))
        self.attentions = _attentions(config, channels, level, layers,
                                      config.up_block_types[up_level] == "CrossAttnUpBlock2D")
        self.upsamplers = nn.ModuleList([Upsample2D(channels)]) if up_level < levels - 1 else None

    def forward(self, x, skips, temb, context, context_lengths, context_mask, upsample_size):
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context, context_lengths, context_mask)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class UNet2DCondition(nn.Module):
    """``forward(sample (B, in_channels, H, W), timestep (B,) or scalar, encoder_hidden_states (B, M,
    cross_attention_dim), encoder_attention_mask=None (B, M))`` -> the prediction ``(B, out_channels,
    H, W)``. Any ``H, W`` (diffusers' rounding where they are not multiples of ``2 ** (levels - 1)``).
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        width = config.block_out_channels
        self.conv_in = nn.Conv2d(config.in_channels, width[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(width[0], 4 * width[0])
        self.down_blocks = nn.ModuleList(DownBlock(config, level, width[max(level - 1, 0)])
                                         for level in range(len(width)))
        self.mid_block = MidBlock(config) if config.mid_block else None
        self.up_blocks = nn.ModuleList(UpBlock(config, i, width[-1] if i == 0 else width[-i])
                                       for i in range(len(width)))
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, width[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(width[0], config.out_channels, 3, padding=1)

    def forward(self, sample, timestep, encoder_hidden_states, encoder_attention_mask=None):
        config = self.config
        self._check_inputs(sample, encoder_hidden_states)
        context_lengths, context_mask = context_attention(encoder_attention_mask, encoder_hidden_states)
        timesteps = _timesteps(timestep, sample)
        features = timestep_features(timesteps, config.block_out_channels[0], config.flip_sin_to_cos,
                                     config.freq_shift)
        temb = self.time_embedding(features.to(sample.dtype))
        context = (encoder_hidden_states, context_lengths, context_mask)

        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, *context)
            skips += block_skips
        if self.mid_block is not None:
            x = self.mid_block(x, temb, *context)
        for block in self.up_blocks:
            layers = len(block.resnets)
            x = block(x, skips[-layers:], temb, *context,
                      skips[-layers - 1].shape[-2:] if len(skips) > layers else None)
            del skips[-layers:]
        return self.conv_out(F.silu(self.conv_norm_out(x)))

    def _check_inputs(self, sample, context):
        config = self.config
        if not isinstance(sample, torch.Tensor) or sample.dim() != 4 or sample.shape[1] != config.in_channels:
            _fail(f"sample must be (B, {config.in_channels}, H, W), got {describe(sample)}")
        if not isinstance(context, torch.Tensor) or context.dim() != 3 \
                or context.shape[0] != sample.shape[0] or context.shape[2] != config.cross_attention_dim:
            _fail(f"encoder_hidden_states must be ({sample.shape[0]}, M, {config.cross_attention_dim}), "
                  f"got {describe(context)}")

    @classmethod
    def from_diffusers(cls, model) -> UNet2DCondition:
        """The U-Net equivalent to diffusers' ``UNet2DConditionModel`` ``model``, holding its
        weights, in its dtype and device; refuses a model with options fastseq does not implement."""
        from fastseq.models.unet_weights import from_diffusers

        return from_diffusers(cls, model)


def _timesteps(timestep, sample):
    """``timestep`` (a number, a 0-d or ``(1,)`` tensor, or ``(B,)``) as a ``(B,)`` tensor."""
    batch = sample.shape[0]
    timesteps = torch.as_tensor(timestep, device=sample.device)
    if timesteps.dim() > 1 or timesteps.numel() not in (1, batch) or timesteps.dtype == torch.bool \
            or timesteps.is_complex():
        _fail(f"timestep must be a number or a ({batch},) tensor, got {describe(timesteps)}")
    return timesteps.reshape(-1).expand(batch)


def context_attention(mask, context):
    """diffusers' ``encoder_attention_mask`` ``(B, M)`` (1 = attend, 0 = ignore) as fastseq's
    cross-attention takes it: ``(context_lengths, None)`` when each row keeps a prefix of the
    tokens (the short-context kernel), else ``(None, bool mask)``; ``(None, None)`` for no mask.

    diffusers adds -10000 to the masked tokens' scores, which shifts every score of a row that masks
    all its tokens alike: such a row attends to all of them, here too.
    """
    if mask is None:
        return None, None
    batch, tokens = context.shape[:2]
    if not isinstance(mask, torch.Tensor) or mask.shape != (batch, tokens):
        _fail(f"encoder_attention_mask must be ({batch}, {tokens}) like the context's tokens, got "
              f"{describe(mask)}")
    keep = mask.bool()
    if not torch.equal(keep.to(mask.dtype), mask):
        _fail("encoder_attention_mask must hold only 0s and 1s")
    keep = keep | ~keep.any(-1, keepdim=True)
    lengths = keep.sum(-1)
    if torch.equal(keep, torch.arange(tokens, device=keep.device) < lengths[:, None]):
        return (None if bool((lengths == tokens).all()) else lengths), None
    return None, keep
