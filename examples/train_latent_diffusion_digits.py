"""Train a text-to-image latent-diffusion model on scikit-learn's digits, then draw digits from captions.

The images are the 8x8 digits of ``sklearn.datasets.load_digits`` upscaled to 16x16, each paired with
a caption written from its label ("a photo of the number seven", "a handwritten 7", ...). Two
stages, as Stable Diffusion is trained:

1. ``fastseq.models.AutoencoderKL`` learns to compress the images to 8x8x2 latents (reconstruction
   error plus a small KL term); its latents are then scaled to unit variance.
2. ``fastseq.models.UNet2DCondition`` learns the DDPM objective in that latent space, conditioned
   through cross-attention on a CLIP text tower that reads the captions (trained with it, from
   scratch). One caption in ten is replaced by the empty one, so that the same model also predicts
   unconditionally: classifier-free guidance needs both.

Sampling runs DDIM with guidance from the caption alone and decodes the latents. A classifier fitted
on the real training digits (scikit-learn's logistic regression on the 8x8 pixels) then reads every
generated digit: the share it reads as the digit its caption names is the score.

    python examples/train_latent_diffusion_digits.py           # about 10 minutes on 2 CPU cores
    python examples/train_latent_diffusion_digits.py --fast    # a few steps: what the test runs

Writes ``samples.png`` (one row per digit), ``reconstructions.png``, ``training.png`` and the
history as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import torch
import torch.nn.functional as F
from common import digits, optimizer_step, parse_config, pyplot, save, warmup_cosine
from digit_captions import EOS, NAMES, TEMPLATES, Captions
from tqdm.auto import tqdm

from fastseq.models import (
    AutoencoderKL,
    AutoencoderKLConfig,
    LatentDiffusion,
    NoiseSchedule,
    UNet2DCondition,
    UNetConfig,
)
from fastseq.models.clip import CLIPConfig, TextTransformer, TowerConfig

SIZE = 16  # image side after upscaling; the latents are SIZE // 2


@dataclasses.dataclass
class TrainConfig:
    vae_steps: int = 400
    steps: int = 2500  # U-Net steps
    batch: int = 64
    lr: float = 1e-3
    width: int = 32
    kl_weight: float = 1e-5
    uncond_prob: float = 0.1  # the share of captions replaced by the empty one
    sample_steps: int = 50
    guidance: float = 3.0
    samples_per_digit: int = 12
    seed: int = 0


FAST = dict(vae_steps=4, steps=4, batch=16, sample_steps=2, samples_per_digit=2)


def upscale(images):
    """``(N, 1, 8, 8)`` digits in ``[0, 1]`` -> ``(N, 1, SIZE, SIZE)`` in ``[-1, 1]``."""
    return F.interpolate(images, size=(SIZE, SIZE), mode="bilinear", align_corners=False) * 2 - 1


def build(config: TrainConfig, captions: Captions) -> LatentDiffusion:
    """A small text tower, U-Net and autoencoder, untrained."""
    width = config.width
    text = TextTransformer(CLIPConfig(text=TowerConfig(width, 2, 4, 2 * width), vocab_size=len(captions.itos),
                                      max_position_embeddings=captions.length, eos_token_id=EOS))
    vae = AutoencoderKL(AutoencoderKLConfig(in_channels=1, out_channels=1, block_out_channels=(32, 64),
                                            latent_channels=2, norm_num_groups=8, sample_size=SIZE))
    unet = UNet2DCondition(UNetConfig(
        in_channels=2, out_channels=2, block_out_channels=(width, 2 * width), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2, heads=4,
        cross_attention_dim=width, norm_num_groups=8))
    return LatentDiffusion(text, unet, vae, NoiseSchedule())


def random_batches(total: int, count: int, size: int, generator):
    """``count`` batches of ``size`` indices drawn from ``range(total)``."""
    return (torch.randint(0, total, (size,), generator=generator) for _ in range(count))


def train_autoencoder(vae, images, config, generator, history):
    """Stage 1: reconstruction error plus ``kl_weight`` x KL; then scale the latents to unit variance."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.lr)
    steps = config.vae_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, steps))
    progress = tqdm(random_batches(len(images), steps, config.batch, generator), total=steps,
                    desc="autoencoder")
    for rows in progress:
        posterior = vae.encode(images[rows])
        reconstruction = vae.decode(posterior.sample(generator=generator))
        loss = F.mse_loss(reconstruction, images[rows]) + config.kl_weight * posterior.kl().mean()
        optimizer_step(loss, optimizer, schedule)
        history["vae_loss"].append(loss.item())
        progress.set_postfix(loss=f"{loss.item():.4f}")
    with torch.no_grad():  # Stable Diffusion's scaling_factor: latents of unit variance
        vae.config.scaling_factor = 1.0 / vae.encode(images).mode().std().item()
    vae.requires_grad_(False)


def train_diffusion(model, images, labels, captions, config, generator, history):
    """Stage 2: the DDPM objective for the U-Net and the text tower, captions dropped at random."""
    params = [*model.unet.parameters(), *model.text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, config.steps))
    progress = tqdm(random_batches(len(images), config.steps, config.batch, generator), total=config.steps,
                    desc="diffusion")
    for rows in progress:
        templates = torch.randint(0, len(TEMPLATES), (len(rows),), generator=generator).tolist()
        ids, _ = captions.encode(labels[rows].tolist(), templates)
        dropped = torch.rand(len(rows), generator=generator) < config.uncond_prob
        ids[dropped] = captions.empty(int(dropped.sum()))
        loss = model.loss(images[rows], ids, generator=generator)
        optimizer_step(loss, optimizer, schedule, clip=1.0)
        history["step"].append(len(history["step"]))
        history["train"].append(loss.item())
        progress.set_postfix(loss=f"{loss.item():.4f}")


def generate_digits(model, captions, config, generator):
    """``(images (10 * n, 1, SIZE, SIZE) in [0, 1], labels)``: ``n`` per digit, digit by digit, the
    captions cycling through the templates."""
    labels = torch.arange(10).repeat_interleave(config.samples_per_digit)
    ids, _ = captions.encode(labels.tolist(), [i % len(TEMPLATES) for i in range(len(labels))])
    model.eval()
    images = model.generate(ids, captions.empty(1), image_size=SIZE, steps=config.sample_steps,
                            guidance_scale=config.guidance, generator=generator)
    return images, labels


def fit_judge(x_train, y_train):
    """A logistic-regression classifier of the real 8x8 training digits."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=3000).fit(x_train.flatten(1).numpy(), y_train.numpy())


def judged_accuracy(judge, images, labels) -> tuple[float, list[float]]:
    """The share of ``images`` (in ``[0, 1]``, any size) the judge reads as ``labels``, overall and
    per digit."""
    pixels = F.adaptive_avg_pool2d(images, 8).flatten(1).numpy()
    correct = torch.tensor(judge.predict(pixels)) == labels
    return correct.float().mean().item(), [correct[labels == d].float().mean().item() for d in range(10)]


def train(config: TrainConfig, out: pathlib.Path) -> dict:
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    x_train, y_train, x_test, y_test = digits()
    captions = Captions()
    model = build(config, captions)
    images = upscale(x_train)
    history = {"vae_loss": [], "step": [], "train": []}
    train_autoencoder(model.autoencoder, images, config, generator, history)
    train_diffusion(model, images, y_train, captions, config, generator, history)

    judge = fit_judge(x_train, y_train)
    history["judge_on_real"], _ = judged_accuracy(judge, x_test, y_test)
    samples, labels = generate_digits(model, captions, config, generator)
    history["judged_accuracy"], history["judged_per_digit"] = judged_accuracy(judge, samples, labels)
    print(f"generated digits read as their caption's digit: {history['judged_accuracy']:.2%} of "
          f"{len(labels)} (the judge reads {history['judge_on_real']:.2%} of the real held-out digits)")

    out.mkdir(parents=True, exist_ok=True)
    (out / "history.json").write_text(json.dumps(history))
    plot_training(history, out / "training.png")
    plot_grid(samples, config.samples_per_digit, [f"\"{NAMES[d]}\"" for d in range(10)],
              f"generated from captions (DDIM, guidance {config.guidance:.1f})", out / "samples.png")
    with torch.no_grad():
        model.autoencoder.eval()
        real = upscale(x_test[:10])
        pair = torch.cat([real, model.autoencoder(real)])
    plot_grid((pair + 1) / 2, 10, ["held out", "reconstructed"], "autoencoder", out / "reconstructions.png")
    return history


def plot_training(history, path):
    plt = pyplot()
    fig, (vae_axis, unet_axis) = plt.subplots(1, 2, figsize=(9, 3.5))
    vae_axis.plot(history["vae_loss"])
    vae_axis.set_title("autoencoder: MSE + KL")
    unet_axis.plot(history["train"], alpha=0.6)
    unet_axis.set_title("U-Net: DDPM noise-prediction MSE")
    for axis in (vae_axis, unet_axis):
        axis.set_yscale("log")
        axis.set_xlabel("step")
    save(fig, path)


def plot_grid(images, columns, row_labels, title, path):
    """``images`` ``(rows * columns, 1, H, W)`` in ``[0, 1]`` as a grid, one labelled row each."""
    rows = len(images) // columns
    height, width = images.shape[-2:]
    grid = images[:, 0].reshape(rows, columns, height, width).permute(0, 2, 1, 3).reshape(rows * height, -1)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(0.5 * columns + 1.2, 0.5 * rows + 0.6))
    ax.imshow(grid.numpy(), cmap="gray_r", vmin=0, vmax=1)
    ax.set_yticks([(r + 0.5) * height for r in range(rows)], row_labels, fontsize=7)
    ax.set_xticks([])
    ax.set_title(title, fontsize=8)
    save(fig, path)


def main(argv=None):
    config, args = parse_config(TrainConfig, FAST, argv, description=__doc__.splitlines()[0],
                                out="build/train_latent_diffusion_digits")
    return train(config, args.out)


if __name__ == "__main__":
    main()
