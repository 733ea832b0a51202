"""ViT: ``fastseq.models.ViT`` against the timm ``VisionTransformer`` it was loaded from.

Both hold the same weights: ViT-Tiny's width (192, 3 heads, 6 blocks here) on 32x32 images in 4x4
patches (64 patch tokens and a class token), 10 classes. Cases, float32: ``inference`` (a forward
under ``no_grad``) and ``train step`` (forward, cross-entropy, backward, AdamW step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastseq.bench import Case
from fastseq.benchmarks.training import train_step
from fastseq.models import ViT

SUITE = "vit"

HEADLINES = ("inference fp32 B64 32x32", "train step fp32 B64 32x32")
HEADLINE_BASELINES = ("timm",)
SOURCES = ("benchmarks/training.py", "fastseq/models/vit*.py", "fastseq/nn/*.py", "fastseq/ops/attention*.py",
           "kernels/attention*.py")
MEMORY_SWEEP = "batch"


def _models(device):
    """(timm model, fastseq model) with the same weights, or (None, fastseq model) without timm."""
    from fastseq.models.vit import ViTConfig

    options = dict(img_size=32, patch_size=4, in_chans=3, num_classes=10, embed_dim=192, depth=6,
                   num_heads=3)
    torch.manual_seed(0)
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        return None, ViT(ViTConfig(**options)).to(device)
    theirs = VisionTransformer(**options).to(device)
    return theirs, ViT.from_timm(theirs)


def _variants(theirs, ours, make):
    variants = {"fastseq": make(ours)}
    skipped = {}
    if theirs is None:
        skipped["timm"] = "timm is not installed"
    else:
        variants["timm"] = make(theirs)
    return variants, skipped


def _inference(device, batch):
    theirs, ours = _models(device)
    images = torch.randn(batch, 3, 32, 32, device=device)

    def make(model):
        model.eval()
        return torch.no_grad()(lambda: model(images))

    variants, skipped = _variants(theirs, ours, make)
    return Case(suite=SUITE, name=f"inference fp32 B{batch} 32x32", params={"pass": "inference",
                "batch": batch}, dtype=torch.float32, variants=variants, skipped=skipped)


def _train(device, batch):
    theirs, ours = _models(device)
    images = torch.randn(batch, 3, 32, 32, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)

    def make(model):
        return train_step(model, lambda m: F.cross_entropy(m(images), labels))

    variants, skipped = _variants(theirs, ours, make)
    return Case(suite=SUITE, name=f"train step fp32 B{batch} 32x32", params={"pass": "train",
                "batch": batch}, dtype=torch.float32, variants=variants, skipped=skipped)


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    """Inference and a training step at batch 64 (float32)."""
    batch = 8 if quick else 64
    return [_inference(device, batch), _train(device, batch)]


def memory_cases(device: torch.device) -> list[Case]:
    """The training step at growing batch: ``python -m fastseq profile vit``."""
    return [_train(device, batch) for batch in (16, 32, 64, 128)]
