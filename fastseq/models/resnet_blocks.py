"""The convolutional pieces shared by the latent-diffusion U-Net and its autoencoder, in diffusers'
layout (``ResnetBlock2D``, ``Downsample2D``, ``Upsample2D``, sinusoidal timestep features), so
diffusers' parameter names load as they are."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_features(timesteps, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
                      max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features ``(B, dim)`` of ``timesteps`` ``(B,)`` (ints or floats), fp32.

    Frequencies ``max_period ** (-i / (dim / 2 - freq_shift))``; ``[sin, cos]`` halves, swapped
    with ``flip_sin_to_cos``; an odd ``dim`` gets a zero last column (diffusers' ``Timesteps``).
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    angles = timesteps.float()[:, None] * torch.exp(exponent / (half - freq_shift))[None]
    features = torch.cat([torch.cos(angles), torch.sin(angles)] if flip_sin_to_cos
                         else [torch.sin(angles), torch.cos(angles)], dim=-1)
    return F.pad(features, (0, dim % 2))


class TimestepEmbedding(nn.Module):
    """Timestep features ``(B, in_dim)`` -> ``(B, dim)``: Linear, SiLU, Linear."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(in_dim, dim), nn.Linear(dim, dim)

    def forward(self, features):
        return self.linear_2(F.silu(self.linear_1(features)))


class ResnetBlock2D(nn.Module):
    """GroupNorm, SiLU, 3x3 conv, (+ projected timestep embedding), GroupNorm, SiLU, dropout, 3x3
    conv, plus the input (through a 1x1 conv where the channel count changes).

    ``temb_channels=None`` gives the autoencoder's block, which takes no timestep.
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None, groups: int = 32,
                 eps: float = 1e-5, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = None if temb_channels is None else nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x, temb=None):
        """``x`` ``(B, in_channels, H, W)``, ``temb`` ``(B, temb_channels)`` -> ``(B, out_channels,
        H, W)``."""
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h + (x if self.conv_shortcut is None else self.conv_shortcut(x))


class Downsample2D(nn.Module):
    """A 3x3 convolution of stride 2. ``padding=0`` pads right and bottom by one first (the
    autoencoder's), ``padding=1`` pads every side (the U-Net's)."""

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.padding == 0 else x)


class Upsample2D(nn.Module):
    """Nearest-neighbour upsampling (x2, or to ``size``), then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size=None):
        if size is None:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=size, mode="nearest"))
