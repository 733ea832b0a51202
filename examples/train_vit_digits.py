"""Train a Vision Transformer on scikit-learn's bundled handwritten digits.

The data are the 1797 8x8 grey-scale digits of ``sklearn.datasets.load_digits`` (installed with
scikit-learn, no download), a fixed fifth of them held out. Each image is cut into 2x2 patches, so
the model reads 16 tokens after its class token; training shifts each image by up to a pixel.

    python examples/train_vit_digits.py           # a minute or two on 2 CPU cores
    python examples/train_vit_digits.py --fast    # a few steps: what the test runs

Prints the held-out accuracy; writes the training curve, the confusion matrix and the class
token's attention over the patches (last block, heads averaged) as PNGs, and the history as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import torch
import torch.nn.functional as F
from common import digits, optimizer_step, parse_config, plot_loss_and_accuracy, pyplot, save, warmup_cosine
from tqdm.auto import tqdm

from fastseq.models import ViT, ViTConfig


@dataclasses.dataclass
class TrainConfig:
    steps: int = 1500
    batch: int = 128
    lr: float = 2e-3
    eval_every: int = 100
    embed_dim: int = 64
    depth: int = 4
    num_heads: int = 4
    seed: int = 0


FAST = dict(steps=60, batch=64, eval_every=30, embed_dim=32, depth=1, num_heads=2)


def shifted(images, generator):
    """Each image moved by up to one pixel in each direction, zeros coming in."""
    padded = F.pad(images, (1, 1, 1, 1))
    dy, dx = torch.randint(0, 3, (2,), generator=generator).tolist()
    return padded[..., dy:dy + 8, dx:dx + 8]


@torch.no_grad()
def predict(model, images):
    model.eval()
    out = model(images).argmax(-1)
    model.train()
    return out


def train(config: TrainConfig, out: pathlib.Path) -> dict:
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    x_train, y_train, x_test, y_test = digits()
    model = ViT(ViTConfig(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=config.embed_dim,
                          depth=config.depth, num_heads=config.num_heads, mlp_ratio=2.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, config.steps))
    history = {"step": [], "train": [], "eval_step": [], "accuracy": []}
    progress = tqdm(range(config.steps), desc="train")
    for step in progress:
        rows = torch.randint(0, len(y_train), (config.batch,), generator=generator)
        loss = F.cross_entropy(model(shifted(x_train[rows], generator)), y_train[rows])
        optimizer_step(loss, optimizer, schedule)
        history["step"].append(step)
        history["train"].append(loss.item())
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            history["eval_step"].append(step + 1)
            history["accuracy"].append((predict(model, x_test) == y_test).float().mean().item())
            progress.set_postfix(loss=f"{loss.item():.3f}", held_out=f"{history['accuracy'][-1]:.4f}")
    predicted = predict(model, x_test)
    history["confusion"] = torch.zeros(10, 10, dtype=torch.long).index_put_(
        (y_test, predicted), torch.ones_like(y_test), accumulate=True).tolist()
    print(f"held-out accuracy {history['accuracy'][-1]:.2%} on {len(y_test)} digits")
    out.mkdir(parents=True, exist_ok=True)
    (out / "history.json").write_text(json.dumps(history))
    plot_loss_and_accuracy(history, out / "accuracy.png", "ViT on scikit-learn's digits", "accuracy",
                           "held-out accuracy")
    plot_confusion(history["confusion"], out / "confusion.png")
    plot_attention(model, x_test[:6], predicted[:6], out / "attention.png")
    return history


@torch.no_grad()
def class_token_attention(model, images):
    """``(B, 4, 4)``: how much the class token attends to each patch in the last block."""
    model.eval()
    captured = {}
    block = model.blocks[-1]
    hook = block.norm1.register_forward_hook(lambda m, i, o: captured.update(x=o))
    model(images)
    hook.remove()
    q, k, _ = block.attn.heads(captured["x"])
    weights = (q[:, :, :1] @ k.transpose(-1, -2) / math.sqrt(block.attn.head_dim)).softmax(-1)
    prefix = model.config.num_prefix_tokens
    grid = model.config.img_size // model.config.patch_size
    return weights.mean(1)[:, 0, prefix:].view(-1, grid, grid)


def plot_attention(model, images, predicted, path):
    plt = pyplot()
    maps = class_token_attention(model, images)
    fig, axes = plt.subplots(2, len(images), figsize=(1.6 * len(images), 3.4))
    for i in range(len(images)):
        axes[0, i].imshow(images[i, 0], cmap="gray_r")
        axes[0, i].set_title(f"predicted {predicted[i].item()}", fontsize=8)
        axes[1, i].imshow(maps[i], cmap="viridis")
        for ax in axes[:, i]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[1, 0].set_ylabel("class token's\nattention", fontsize=8)
    save(fig, path)


def plot_confusion(confusion, path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(confusion, cmap="Blues")
    for i, row in enumerate(confusion):
        for j, count in enumerate(row):
            if count:
                ax.text(j, i, str(count), ha="center", va="center", fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_xticks(range(10))
    ax.set_yticks(range(10))
    ax.set_title("held-out digits")
    save(fig, path)


def main(argv=None):
    config, args = parse_config(TrainConfig, FAST, argv, description=__doc__.splitlines()[0],
                                out="build/train_vit_digits")
    return train(config, args.out)


if __name__ == "__main__":
    main()
