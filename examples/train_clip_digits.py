"""Train CLIP on scikit-learn's digits paired with captions, then classify held-out digits zero-shot.

The images are the 8x8 digits of ``sklearn.datasets.load_digits`` (a fixed fifth held out); each is
paired with a caption written from its label in one of several templates ("a photo of the number
seven", "a handwritten 7", ...). ``fastseq.models.CLIP`` learns both towers with its symmetric
contrastive loss, each batch holding one image of every digit (two images of one digit in a batch
would be each other's false negatives). Zero-shot classification then embeds every template for
every digit, averages each digit's prompts, and picks the digit whose text is nearest the image:
no classifier is trained.

    python examples/train_clip_digits.py           # a minute or two on 2 CPU cores
    python examples/train_clip_digits.py --fast    # a few steps: what the test runs

Prints the held-out zero-shot accuracy; writes the training curve, the image-text similarity of a
few held-out digits against every digit's prompts, and the history as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import torch
from common import digits, optimizer_step, parse_config, plot_loss_and_accuracy, pyplot, save, warmup_cosine
from digit_captions import EOS, NAMES, TEMPLATES, Captions
from tqdm.auto import tqdm

from fastseq.models import CLIP, CLIPConfig
from fastseq.models.clip import TowerConfig


@dataclasses.dataclass
class TrainConfig:
    steps: int = 1500
    groups: int = 3  # a batch holds `groups` images of every digit, in separate contrastive blocks
    lr: float = 1e-3
    eval_every: int = 100
    width: int = 64
    layers: int = 2
    seed: int = 0


FAST = dict(steps=30, groups=1, eval_every=15, width=32, layers=1)


def one_of_each_digit(labels, generator):
    """Indices of one random image of every digit, in digit order."""
    return torch.stack([torch.nonzero(labels == d)[torch.randint(0, int((labels == d).sum()), (1,),
                                                                 generator=generator)].squeeze()
                        for d in range(10)])


def zero_shot_accuracy(model, images, labels, prompts):
    model.eval()
    predicted = model.zero_shot_logits(images, *prompts).argmax(-1)
    model.train()
    return (predicted == labels).float().mean().item()


def train(config: TrainConfig, out: pathlib.Path) -> dict:
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    x_train, y_train, x_test, y_test = digits()
    captions = Captions()
    tower = TowerConfig(config.width, config.layers, 4, 2 * config.width)
    model = CLIP(CLIPConfig(text=tower, vision=tower, vocab_size=len(captions.itos),
                            max_position_embeddings=captions.length, eos_token_id=EOS, image_size=8,
                            patch_size=2, num_channels=1, projection_dim=config.width))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, config.steps))
    prompts = captions.prompts()
    history = {"step": [], "train": [], "eval_step": [], "zero_shot": []}
    progress = tqdm(range(config.steps), desc="train")
    for step in progress:
        loss = 0.0
        for _ in range(config.groups):
            rows = one_of_each_digit(y_train, generator)
            templates = torch.randint(0, len(TEMPLATES), (10,), generator=generator).tolist()
            ids, mask = captions.encode(y_train[rows].tolist(), templates)
            loss = loss + model(ids, x_train[rows], attention_mask=mask, return_loss=True).loss
        loss = loss / config.groups
        optimizer_step(loss, optimizer, schedule)
        history["step"].append(step)
        history["train"].append(loss.item())
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            history["eval_step"].append(step + 1)
            history["zero_shot"].append(zero_shot_accuracy(model, x_test, y_test, prompts))
            progress.set_postfix(loss=f"{loss.item():.3f}", zero_shot=f"{history['zero_shot'][-1]:.4f}")
    print(f"held-out zero-shot accuracy {history['zero_shot'][-1]:.2%} on {len(y_test)} digits "
          f"({len(TEMPLATES)} prompts per digit, no classifier trained)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "history.json").write_text(json.dumps(history))
    plot_loss_and_accuracy(history, out / "training.png", "CLIP on digits and captions", "zero_shot",
                           "held-out zero-shot accuracy")
    plot_similarity(model, x_test[:10], y_test[:10], prompts, out / "similarity.png")
    return history


def plot_similarity(model, images, labels, prompts, path):
    model.eval()
    logits = model.zero_shot_logits(images, *prompts)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.imshow(logits.softmax(-1).numpy(), cmap="viridis")
    ax.set_xticks(range(10), NAMES, rotation=45, fontsize=7)
    ax.set_yticks(range(len(labels)), [f"image of a {d}" for d in labels.tolist()], fontsize=7)
    ax.set_title("probability of each digit's prompts, held-out images")
    save(fig, path)


def main(argv=None):
    config, args = parse_config(TrainConfig, FAST, argv, description=__doc__.splitlines()[0],
                                out="build/train_clip_digits")
    return train(config, args.out)


if __name__ == "__main__":
    main()
