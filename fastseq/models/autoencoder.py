"""The latent-diffusion autoencoder (Rombach et al. 2022), Stable Diffusion's VAE, in diffusers' layout.

The encoder takes an image through levels of ResNet blocks, each level but the last halving its
size, and a mid block (ResNet, self-attention over the pixels on fastseq's attention, ResNet) to
the mean and log-variance of a diagonal Gaussian over latents; the decoder mirrors it back to an
image. Names are diffusers' ``AutoencoderKL``'s, so ``AutoencoderKL.from_diffusers(model)``
(:mod:`fastseq.models.autoencoder_weights`) loads its state dict as it is.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from fastseq.models.inputs import check_positive_ints, describe
from fastseq.models.resnet_blocks import Downsample2D, ResnetBlock2D, Upsample2D
from fastseq.nn import CrossAttention

EPS = 1e-6  # the eps of every GroupNorm in the autoencoder
FLAGS = ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention")


def _fail(message):
    raise ValueError(f"fastseq AutoencoderKL: {message}")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclasses.dataclass
class AutoencoderKLConfig:
    """Sizes and options of an :class:`AutoencoderKL`: diffusers' ``AutoencoderKL`` config fields of
    the same names and defaults. ``sample_size`` (the training image size) is a record only: images
    of any size that is a multiple of :attr:`AutoencoderKL.downscale` are taken."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, int] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    act_fn: str = "silu"

    def __post_init__(self):
        check_positive_ints(self, ("in_channels", "out_channels", "layers_per_block", "latent_channels",
                                   "norm_num_groups"), "AutoencoderKLConfig")
        widths, groups = self.block_out_channels, self.norm_num_groups
        self.block_out_channels = tuple(widths) if isinstance(widths, list) else widths
        sizes = tuple(self.sample_size) if isinstance(self.sample_size, tuple | list) else (self.sample_size,)
        finite = [isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                  for v in (self.scaling_factor, self.shift_factor)]
        checks = {  # field: (valid, what it must be)
            "block_out_channels": (isinstance(widths, tuple | list) and len(widths) > 0 and all(
                _positive_int(c) and c % groups == 0 for c in widths), "a non-empty tuple of positive ints, "
                                                                      f"each a multiple of {groups} groups"),
            "sample_size": (len(sizes) in (1, 2) and all(map(_positive_int, sizes)), "an int > 0 or a pair"),
            "scaling_factor": (finite[0] and self.scaling_factor != 0, "a finite non-zero number"),
            "shift_factor": (self.shift_factor is None or finite[1], "a finite number or None"),
            **{flag: (isinstance(getattr(self, flag), bool), "a bool") for flag in FLAGS},
            "act_fn": (self.act_fn == "silu", "'silu'"),
        }
        for name, (valid, what) in checks.items():
            if not valid:
                raise ValueError(f"AutoencoderKLConfig: {name} must be {what}, got {getattr(self, name)!r}")


class MidBlockAttention(CrossAttention):
    """diffusers' mid-block ``Attention``: GroupNorm, self-attention of the pixels as tokens
    ``(B, H*W, C)`` with ``C // head_dim`` heads, plus the input. ``(B, C, H, W)`` -> same."""

    def __init__(self, channels: int, head_dim: int, groups: int):
        super().__init__(channels, None, channels // head_dim, head_dim, bias=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=EPS)

    def forward(self, x):
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)
        return super().forward(tokens).transpose(1, 2).reshape(x.shape) + x


class MidBlock(nn.Module):
    """ResNet block, self-attention (one head of all ``C`` channels; unless ``attention=False``),
    ResNet block: diffusers' ``UNetMidBlock2D`` as the autoencoder builds it. ``(B, C, H, W)`` -> same."""

    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.attentions = nn.ModuleList([MidBlockAttention(channels, channels, groups)] if attention else [])
        self.resnets = nn.ModuleList(ResnetBlock2D(channels, channels, None, groups, EPS) for _ in range(2))

    def forward(self, x):
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class Level(nn.Module):
    """``layers`` ResNet blocks ``in_channels`` -> ``out_channels``, then a stride-2 convolution
    (``resample="down"``: diffusers' ``DownEncoderBlock2D``) or a x2 upsampling (``"up"``:
    ``UpDecoderBlock2D``) or nothing (``None``, the last level)."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, resample: str | None):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(out_channels if i else in_channels, out_channels, None,
                                                   groups, EPS) for i in range(layers))
        down, up = resample == "down", resample == "up"
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, padding=0)]) if down else None
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if up else None

    def forward(self, x):
        for layer in (*self.resnets, *(self.downsamplers or ()), *(self.upsamplers or ())):
            x = layer(x)
        return x


def _levels(widths, layers: int, groups: int, resample: str) -> nn.ModuleList:
    """One :class:`Level` per width, each from the width before it; all but the last resample."""
    return nn.ModuleList(Level(widths[max(i - 1, 0)], width, layers, groups, resample if i < len(widths) - 1
                               else None) for i, width in enumerate(widths))


class Encoder(nn.Module):
    """Images ``(B, in_channels, H, W)`` -> the posterior's moments ``(B, 2 * latent_channels, H/f,
    W/f)`` (means, then log-variances), ``f = 2 ** (len(block_out_channels) - 1)``."""

    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        widths, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)
        self.down_blocks = _levels(widths, config.layers_per_block, groups, "down")
        self.mid_block = MidBlock(widths[-1], groups, config.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=EPS)
        self.conv_out = nn.Conv2d(widths[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, images):
        x = self.conv_in(images)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    """Latents ``(B, latent_channels, h, w)`` -> images ``(B, out_channels, h*f, w*f)``: the
    encoder's levels in reverse, each one ResNet block deeper, upsampling instead."""

    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        widths, groups = config.block_out_channels[::-1], config.norm_num_groups
        self.conv_in = nn.Conv2d(config.latent_channels, widths[0], 3, padding=1)
        self.mid_block = MidBlock(widths[0], groups, config.mid_block_add_attention)
        self.up_blocks = _levels(widths, config.layers_per_block + 1, groups, "up")
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=EPS)
        self.conv_out = nn.Conv2d(widths[-1], config.out_channels, 3, padding=1)

    def forward(self, latents):
        x = self.mid_block(self.conv_in(latents))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


def _noise(like, generator):
    """Standard normal noise shaped as ``like``, drawn as diffusers' ``randn_tensor`` draws it: on the
    generator's device, and from a list of ``B`` generators one sample each."""
    if isinstance(generator, list | tuple) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, list | tuple):
        if len(generator) != like.shape[0]:
            _fail(f"generator must be one generator or a list of {like.shape[0]}, got {len(generator)}")
        return torch.cat([_noise(like[i:i + 1], g) for i, g in enumerate(generator)])
    device = like.device if generator is None else generator.device
    return torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


class DiagonalGaussian:
    """The posterior over latents, from the encoder's moments ``(B, 2 * latent_channels, h, w)``:
    ``mean``, ``logvar`` (clamped to [-30, 20]), ``std``, ``var``, each ``(B, latent_channels, h, w)``."""

    def __init__(self, moments):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std, self.var = torch.exp(0.5 * self.logvar), torch.exp(self.logvar)

    def sample(self, noise=None, generator=None):
        """``mean + std * noise``, ``noise`` shaped as ``mean``, drawn with ``generator`` (a
        ``torch.Generator`` or a list of one per sample) unless given."""
        if noise is None:
            noise = _noise(self.mean, generator)
        elif not isinstance(noise, torch.Tensor) or noise.shape != self.mean.shape:
            _fail(f"noise must be {tuple(self.mean.shape)}, got {describe(noise)}")
        return self.mean + self.std * noise

    def mode(self):
        """The most likely latents: ``mean``."""
        return self.mean

    def kl(self):
        """The KL divergence to the standard normal, summed over C, H, W: ``(B,)``."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))


def _check_maps(x, name: str, channels: int, multiple: int) -> None:
    """Refuse anything but a floating-point ``(B, channels, H, W)`` with H, W positive multiples."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != channels or not x.is_floating_point():
        _fail(f"{name} must be a floating-point (B, {channels}, H, W) tensor, got {describe(x)}")
    height, width = x.shape[2:]
    if min(height, width) < 1 or height % multiple or width % multiple:
        _fail(f"{name} height and width must be positive multiples of {multiple}, got {height}x{width}")


class AutoencoderKL(nn.Module):
    """``encode(images (B, in_channels, H, W))`` -> :class:`DiagonalGaussian` over latents
    ``(B, latent_channels, H/f, W/f)``; ``decode(latents)`` -> images ``(B, out_channels, H, W)``;
    ``forward`` does both. ``f`` is :attr:`downscale`; H and W must be multiples of it."""

    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        self.config = config
        latent = config.latent_channels
        self.encoder, self.decoder = Encoder(config), Decoder(config)
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent, latent, 1) if config.use_post_quant_conv else None

    @property
    def downscale(self) -> int:
        """Image pixels per latent along each side: ``2 ** (len(block_out_channels) - 1)``."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def encode(self, images) -> DiagonalGaussian:
        """The posterior over the latents of ``images`` ``(B, in_channels, H, W)``."""
        _check_maps(images, "images", self.config.in_channels, self.downscale)
        moments = self.encoder(images)
        return DiagonalGaussian(moments if self.quant_conv is None else self.quant_conv(moments))

    def decode(self, latents):
        """``latents`` ``(B, latent_channels, h, w)`` -> images ``(B, out_channels, h*f, w*f)``."""
        _check_maps(latents, "latents", self.config.latent_channels, 1)
        return self.decoder(latents if self.post_quant_conv is None else self.post_quant_conv(latents))

    def forward(self, images, sample_posterior: bool = False, generator=None):
        """The reconstruction ``(B, out_channels, H, W)`` of ``images`` from the posterior's mode, or
        from a sample of it drawn with ``generator``."""
        posterior = self.encode(images)
        return self.decode(posterior.sample(generator=generator) if sample_posterior else posterior.mode())

    def images_to_latents(self, images, generator=None, sample_posterior: bool = True):
        """What a diffusion model works on, as Stable Diffusion pipelines make it: ``(z - shift_factor)
        * scaling_factor``, ``z`` sampled from the posterior of ``images`` (or its mode)."""
        posterior = self.encode(images)
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return (z - (self.config.shift_factor or 0.0)) * self.config.scaling_factor

    def latents_to_images(self, latents):
        """:meth:`decode` of ``latents / scaling_factor + shift_factor`` (the inverse scaling)."""
        return self.decode(latents / self.config.scaling_factor + (self.config.shift_factor or 0.0))

    @classmethod
    def from_diffusers(cls, model) -> AutoencoderKL:
        """The AutoencoderKL equivalent to diffusers' ``AutoencoderKL`` ``model``, holding its weights."""
        from fastseq.models.autoencoder_weights import from_diffusers

        return from_diffusers(cls, model)
