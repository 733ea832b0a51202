"""CLIP: ``fastseq.models.CLIP`` against the transformers ``CLIPModel`` it was loaded from.

Both hold the same weights: two towers of width 256, 4 layers and 4 heads, 32x32 images in 4x4
patches, 32-token texts (a third of each batch's texts padded to half length), a 1000-word
vocabulary. Cases, float32, a batch of 32 image-text pairs: ``inference`` (both towers and the
logits under ``no_grad``) and ``train step`` (forward, contrastive loss, backward, AdamW step).
"""

from __future__ import annotations

import torch

from fastseq.bench import Case
from fastseq.benchmarks.training import train_step
from fastseq.models import CLIP

SUITE = "clip"

HEADLINES = ("inference fp32 B32", "train step fp32 B32")
HEADLINE_BASELINES = ("transformers",)
SOURCES = ("benchmarks/training.py", "fastseq/models/clip*.py", "fastseq/models/inputs.py",
           "fastseq/models/checkpoint.py", "fastseq/nn/functional.py", "fastseq/ops/attention*.py",
           "kernels/attention*.py")
MEMORY_SWEEP = "batch"
VOCAB, EOS, LENGTH = 1000, 999, 32


def _models(device):
    """(transformers model, fastseq model) with the same weights, or (None, fastseq model) where
    transformers is not installed (a GPU machine without network, say)."""
    try:
        import transformers
    except ImportError:
        from fastseq.models.clip import CLIPConfig, TowerConfig

        tower = TowerConfig(256, 4, 4, 1024)
        torch.manual_seed(0)
        config = CLIPConfig(text=tower, vision=tower, vocab_size=VOCAB, max_position_embeddings=LENGTH,
                            eos_token_id=EOS, image_size=32, patch_size=4, projection_dim=256)
        return None, CLIP(config).to(device)
    transformers.logging.set_verbosity_error()
    tower = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=VOCAB, max_position_embeddings=LENGTH, eos_token_id=EOS, **tower),
        vision_config=dict(image_size=32, patch_size=4, **tower), projection_dim=256)
    torch.manual_seed(0)
    theirs = transformers.CLIPModel(config).to(device)
    return theirs, CLIP.from_hf(theirs)


def _inputs(device, batch):
    ids = torch.randint(1, EOS, (batch, LENGTH), device=device)
    mask = torch.ones_like(ids)
    short = torch.arange(batch, device=device) % 3 == 0
    mask[short, LENGTH // 2:] = 0
    ids[short, LENGTH // 2 - 1] = EOS
    ids[~short, -1] = EOS
    ids[mask == 0] = 0
    return ids, mask, torch.randn(batch, 3, 32, 32, device=device)


def _case(name, params, variants, theirs):
    skipped = {} if theirs is not None else {"transformers": "transformers is not installed"}
    return Case(suite=SUITE, name=name, params=params, dtype=torch.float32, variants=variants,
                skipped=skipped)


def _inference(device, batch):
    theirs, ours = _models(device)
    ids, mask, images = _inputs(device, batch)
    ours.eval()
    variants = {"fastseq": torch.no_grad()(lambda: ours(ids, images, attention_mask=mask).logits_per_image)}
    if theirs is not None:
        theirs.eval()
        variants["transformers"] = torch.no_grad()(
            lambda: theirs(input_ids=ids, pixel_values=images, attention_mask=mask).logits_per_image)
    return _case(f"inference fp32 B{batch}", {"pass": "inference", "batch": batch}, variants, theirs)


def _train(device, batch):
    theirs, ours = _models(device)
    ids, mask, images = _inputs(device, batch)
    variants = {"fastseq": train_step(ours, lambda m: m(ids, images, attention_mask=mask,
                                                        return_loss=True).loss)}
    if theirs is not None:
        variants["transformers"] = train_step(theirs, lambda m: m(
            input_ids=ids, pixel_values=images, attention_mask=mask, return_loss=True).loss)
    return _case(f"train step fp32 B{batch}", {"pass": "train", "batch": batch}, variants, theirs)


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    """Inference and a training step on 32 image-text pairs (float32)."""
    batch = 8 if quick else 32
    return [_inference(device, batch), _train(device, batch)]


def memory_cases(device: torch.device) -> list[Case]:
    """The training step at growing batch: ``python -m fastseq profile clip``."""
    return [_train(device, batch) for batch in (8, 16, 32, 64)]
