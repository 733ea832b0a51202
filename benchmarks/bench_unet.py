"""The latent-diffusion U-Net: ``fastseq.models.UNet2DCondition`` against the diffusers
``UNet2DConditionModel`` it was loaded from (diffusers' default attention processor, SDPA).

Both hold the same weights, in Stable Diffusion 1.5's layout (four levels, the first three with
cross-attention, two ResNet blocks per level, 8 heads, 1x1-convolution projections) with a fifth of
its channels (64, 128, 256, 256) and a 256-wide text context of 77 tokens. Cases: ``denoise step``
(one U-Net call under ``no_grad`` on a classifier-free-guidance batch: one image, twice) and
``train step`` (forward, the DDPM noise-prediction loss, backward, AdamW step), float32 at 32x32
latents (256x256 images) here, bfloat16 at 64x64 latents (512x512 images) on a GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastseq.bench import Case
from fastseq.benchmarks.training import train_step
from fastseq.models import UNet2DCondition, UNetConfig

SUITE = "unet"

HEADLINES = ("denoise step fp32 B2 32x32", "train step fp32 B2 32x32")
HEADLINE_BASELINES = ("diffusers",)
SOURCES = ("benchmarks/training.py", "fastseq/models/unet*.py", "fastseq/models/resnet_blocks.py",
           "fastseq/models/inputs.py", "fastseq/models/checkpoint.py", "fastseq/nn/spatial_transformer.py",
           "fastseq/ops/attention*.py", "fastseq/ops/cross_attention.py", "kernels/attention*.py",
           "kernels/cross_attention.py", "csrc/cpu/attention*")
MEMORY_SWEEP = "batch"
CHANNELS, CONTEXT_DIM, TOKENS = (64, 128, 256, 256), 256, 77
DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3


def _models(device, dtype):
    """(diffusers model, fastseq model) with the same weights, or (None, fastseq model) where
    diffusers is not installed (a GPU machine without network, say)."""
    try:
        import diffusers
    except ImportError:
        torch.manual_seed(0)
        config = UNetConfig(block_out_channels=CHANNELS, cross_attention_dim=CONTEXT_DIM)
        return None, UNet2DCondition(config).to(device, dtype)
    torch.manual_seed(0)
    theirs = diffusers.UNet2DConditionModel(block_out_channels=CHANNELS, down_block_types=DOWN,
                                            up_block_types=UP, cross_attention_dim=CONTEXT_DIM)
    theirs = theirs.to(device, dtype)
    return theirs, UNet2DCondition.from_diffusers(theirs)


def _inputs(device, dtype, batch, size):
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(batch, 4, size, size, generator=generator).to(device, dtype)
    context = torch.randn(batch, TOKENS, CONTEXT_DIM, generator=generator).to(device, dtype)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator).to(device)
    return latents, timesteps, context


def _case(name, params, dtype, variants, theirs):
    skipped = {} if theirs is not None else {"diffusers": "diffusers is not installed"}
    return Case(suite=SUITE, name=name, params=params, dtype=dtype, variants=variants, skipped=skipped)


def _label(dtype):
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def _denoise(device, dtype, batch, size):
    theirs, ours = _models(device, dtype)
    latents, timesteps, context = _inputs(device, dtype, batch, size)
    variants = {"fastseq": torch.no_grad()(lambda: ours.eval()(latents, timesteps, context))}
    if theirs is not None:
        variants["diffusers"] = torch.no_grad()(lambda: theirs.eval()(latents, timesteps, context).sample)
    name = f"denoise step {_label(dtype)} B{batch} {size}x{size}"
    return _case(name, {"pass": "denoise", "batch": batch, "latent": size}, dtype, variants, theirs)


def _train(device, dtype, batch, size):
    theirs, ours = _models(device, dtype)
    latents, timesteps, context = _inputs(device, dtype, batch, size)
    noise = torch.randn_like(latents)
    variants = {"fastseq": train_step(ours, lambda m: F.mse_loss(m(latents, timesteps, context), noise))}
    if theirs is not None:
        variants["diffusers"] = train_step(
            theirs, lambda m: F.mse_loss(m(latents, timesteps, context).sample, noise))
    name = f"train step {_label(dtype)} B{batch} {size}x{size}"
    return _case(name, {"pass": "train", "batch": batch, "latent": size}, dtype, variants, theirs)


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    """A denoising step and a training step: float32 on the CPU, bfloat16 at 512x512 on a GPU."""
    if device.type == "cuda":
        return [_denoise(device, torch.bfloat16, 2, 64), _denoise(device, torch.bfloat16, 8, 64),
                _train(device, torch.bfloat16, 8, 64)]
    size = 16 if quick else 32
    return [_denoise(device, torch.float32, 2, size), _train(device, torch.float32, 2, size)]


def memory_cases(device: torch.device) -> list[Case]:
    """The training step at growing batch: ``python -m fastseq profile unet``."""
    return [_train(device, torch.float32, batch, 32) for batch in (1, 2, 4)]
