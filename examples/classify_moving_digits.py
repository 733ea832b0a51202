"""Recognise what moves and which way: a frame CNN and an LSTM over short clips of a moving digit.

Each clip is 8 to 12 frames of 16x16 in which one of scikit-learn's 8x8 digits (``load_digits``, no
download) slides across the frame, left, right, up or down, from near one edge to near the other,
at a random height (or column); its label is the direction and the digit, 40 classes. Clips of one
batch differ in length and are padded: ``fastseq.models.VideoClassifier`` embeds every frame with a
small CNN, runs its LSTM over each clip's own frames (``lengths=``) and classifies the last one's
state. Training clips are drawn afresh at each step from the training digits; the held-out clips are
every held-out digit (a fixed fifth of them, never trained on) moving each of the four ways.

    python examples/classify_moving_digits.py                          # about a minute on 2 CPU cores
    python examples/classify_moving_digits.py --temporal transformer   # a Transformer over the frames
    python examples/classify_moving_digits.py --frame-encoder vit      # fastseq's ViT per frame
    python examples/classify_moving_digits.py --fast                   # a few steps: what the test runs

Prints the held-out accuracy (and that of the direction and the digit alone); writes the training
curve, the confusion matrix, a few held-out clips and the history as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import torch
import torch.nn.functional as F
from common import digits, optimizer_step, parse_config, plot_loss_and_accuracy, pyplot, save, warmup_cosine
from tqdm.auto import tqdm

from fastseq.models import VideoClassifier, VideoClassifierConfig

DIRECTIONS = ("left", "right", "up", "down")
SIZE, DIGIT = 16, 8  # the frame's side and the digit's
TRAVEL = SIZE - DIGIT  # the digit's top-left corner moves within [0, TRAVEL]


@dataclasses.dataclass
class TrainConfig:
    steps: int = 1500
    batch: int = 64
    lr: float = 3e-3
    eval_every: int = 100
    min_frames: int = 8
    max_frames: int = 12
    embed_dim: int = 64
    hidden_size: int = 64
    frame_encoder: str = "cnn"
    temporal: str = "lstm"
    pooling: str = "last"
    seed: int = 0


FAST = dict(steps=60, lr=1e-2, eval_every=60)  # the full model, briefly: it learns the direction
CHOICES = dict(frame_encoder=("cnn", "vit"), temporal=("lstm", "transformer"),
               pooling=("last", "mean", "max"))


def moving_clips(images, labels, directions, generator, min_frames, max_frames):
    """Clips ``(N, max_frames, 1, 16, 16)`` of ``images`` ``(N, 1, 8, 8)`` moving in ``directions``
    ``(N,)`` (indices into :data:`DIRECTIONS`), their ``lengths`` ``(N,)`` and labels
    ``direction * 10 + digit``. Frames past a clip's length are zeros."""
    count = len(images)
    lengths = torch.randint(min_frames, max_frames + 1, (count,), generator=generator)
    start = torch.randint(0, 3, (count,), generator=generator)  # near one edge ...
    end = TRAVEL - torch.randint(0, 3, (count,), generator=generator)  # ... to near the other
    across = torch.randint(0, TRAVEL + 1, (count,), generator=generator)  # the other coordinate, fixed
    clips = torch.zeros(count, max_frames, 1, SIZE, SIZE)
    for i in range(count):
        frames, direction = int(lengths[i]), int(directions[i])
        steps = torch.linspace(float(start[i]), float(end[i]), frames).round().long().tolist()
        if direction in (0, 2):  # left and up run the other way
            steps = [TRAVEL - s for s in steps]
        for t, along in enumerate(steps):
            row, col = (across[i], along) if direction < 2 else (along, across[i])
            clips[i, t, :, row:row + DIGIT, col:col + DIGIT] = images[i]
    return clips, lengths, directions * 10 + labels


def held_out_clips(images, labels, config, seed=1):
    """Every held-out digit moving each of the four ways (positions and lengths drawn once)."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.arange(4).repeat_interleave(len(images))
    return moving_clips(images.repeat(4, 1, 1, 1), labels.repeat(4), directions, generator,
                        config.min_frames, config.max_frames)


@torch.no_grad()
def predict(model, clips, lengths, batch=512):
    model.eval()
    out = torch.cat([model(clips[i:i + batch], lengths[i:i + batch]).argmax(-1)
                     for i in range(0, len(clips), batch)])
    model.train()
    return out


def train(config: TrainConfig, out: pathlib.Path) -> dict:
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    x_train, y_train, x_test, y_test = digits()
    test_clips, test_lengths, test_labels = held_out_clips(x_test, y_test, config)
    model = VideoClassifier(VideoClassifierConfig(
        num_classes=40, image_size=SIZE, in_chans=1, frame_encoder=config.frame_encoder,
        embed_dim=config.embed_dim, temporal=config.temporal, hidden_size=config.hidden_size,
        num_heads=4, dim_feedforward=2 * config.embed_dim, max_frames=config.max_frames,
        pooling=config.pooling))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, config.steps))
    history = {"step": [], "train": [], "eval_step": [], "accuracy": [], "held_out_clips": len(test_labels)}
    progress = tqdm(range(config.steps), desc="train")
    for step in progress:
        rows = torch.randint(0, len(y_train), (config.batch,), generator=generator)
        directions = torch.randint(0, 4, (config.batch,), generator=generator)
        clips, lengths, labels = moving_clips(x_train[rows], y_train[rows], directions, generator,
                                              config.min_frames, config.max_frames)
        loss = F.cross_entropy(model(clips, lengths), labels)
        optimizer_step(loss, optimizer, schedule)
        history["step"].append(step)
        history["train"].append(loss.item())
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            predicted = predict(model, test_clips, test_lengths)
            history["eval_step"].append(step + 1)
            history["accuracy"].append((predicted == test_labels).float().mean().item())
            progress.set_postfix(loss=f"{loss.item():.3f}", held_out=f"{history['accuracy'][-1]:.4f}")
    # `predicted`: the last evaluation's, at the last step
    history["direction_accuracy"] = (predicted // 10 == test_labels // 10).float().mean().item()
    history["digit_accuracy"] = (predicted % 10 == test_labels % 10).float().mean().item()
    history["confusion"] = torch.zeros(40, 40, dtype=torch.long).index_put_(
        (test_labels, predicted), torch.ones_like(test_labels), accumulate=True).tolist()
    print(f"held-out accuracy {history['accuracy'][-1]:.2%} on {len(test_labels)} clips (direction "
          f"{history['direction_accuracy']:.2%}, digit {history['digit_accuracy']:.2%}; chance 2.5%)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "history.json").write_text(json.dumps(history))
    names = {"cnn": "CNN", "vit": "ViT", "lstm": "LSTM", "transformer": "Transformer"}
    plot_loss_and_accuracy(history, out / "accuracy.png", f"{names[config.frame_encoder]} frames + "
                           f"{names[config.temporal]} on moving digits (40 classes)", "accuracy",
                           "held-out accuracy")
    plot_confusion(history["confusion"], out / "confusion.png")
    shown = torch.arange(4) * len(y_test)  # the first held-out digit, each way
    plot_clips(test_clips[shown], test_lengths[shown], test_labels[shown], predicted[shown],
               out / "clips.png")
    return history


def label_name(label: int) -> str:
    return f"{label % 10} {DIRECTIONS[label // 10]}"


def plot_confusion(confusion, path):
    """The 40x40 matrix, a block per (true, predicted) pair of directions, digits inside each."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 6))
    counts = torch.tensor(confusion, dtype=torch.float32)
    ax.imshow(counts.log1p(), cmap="Blues")
    for edge in (9.5, 19.5, 29.5):
        ax.axhline(edge, color="grey", linewidth=0.5)
        ax.axvline(edge, color="grey", linewidth=0.5)
    for i, j in torch.nonzero((counts > 0) & ~torch.eye(40, dtype=torch.bool)).tolist():
        ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=5, color="tab:red")
    ticks = [4.5 + 10 * d for d in range(4)]
    ax.set_xticks(ticks, [f"{d}\n(digits 0-9)" for d in DIRECTIONS], fontsize=8)
    ax.set_yticks(ticks, DIRECTIONS, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("held-out clips (log counts; mistakes in red)")
    save(fig, path)


def plot_clips(clips, lengths, labels, predicted, path):
    plt = pyplot()
    frames = clips.shape[1]
    fig, axes = plt.subplots(len(clips), frames, figsize=(0.9 * frames, 1.1 * len(clips)))
    for i in range(len(clips)):
        for t in range(frames):
            ax = axes[i, t]
            ax.imshow(clips[i, t, 0], cmap="gray_r", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if t >= lengths[i]:
                ax.set_facecolor("0.85")
                ax.images[0].set_alpha(0.0)
        caption = f"true: {label_name(int(labels[i]))}\npredicted: {label_name(int(predicted[i]))}"
        axes[i, 0].set_ylabel(caption, fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle("held-out clips (grey: padding past the clip's length)", fontsize=9)
    save(fig, path)


def main(argv=None):
    config, args = parse_config(TrainConfig, FAST, argv, description=__doc__.splitlines()[0],
                                out="build/classify_moving_digits", choices=CHOICES)
    return train(config, args.out)


if __name__ == "__main__":
    main()
