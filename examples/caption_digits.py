"""Caption images of two to four handwritten digits ("three then seven then one") with attention.

Each image is an 8x32 canvas holding two to four of scikit-learn's 8x8 digits (``load_digits``, no
download) left to right, with blank columns spread at random around and between them; its caption
is written from the labels. Held-out canvases are built only from the held-out fifth of the digits
(``common.digits``), so no digit drawing seen in training is ever captioned. The captioner
(``fastseq.models.ImageCaptioner``) reads the canvas as 4x4 patches (a ViT, or a small CNN) and
writes the caption with a Transformer decoder (or an LSTM with Luong / Bahdanau attention)
attending over them.

    python examples/caption_digits.py                    # ViT + Transformer: a minute or two on 2 CPU cores
    python examples/caption_digits.py --decoder lstm     # ViT + LSTM with attention
    python examples/caption_digits.py --fast             # a few steps: what the test runs

Prints the held-out exact-caption accuracy of greedy and beam-search decoding; writes the training
curve, the history as JSON and, for a few held-out canvases, the attention over the image of each
generated word as PNGs.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import torch
import torch.nn.functional as F
from common import digits, optimizer_step, parse_config, plot_loss_and_accuracy, pyplot, save, warmup_cosine
from digit_captions import NAMES
from tqdm.auto import tqdm

from fastseq.models import ImageCaptioner, ImageCaptionerConfig

# -- data ----------------------------------------------------------------------------------------

SPECIALS = ("<pad>", "<bos>", "<eos>")
PAD, BOS, EOS = 0, 1, 2
WORDS = (*SPECIALS, *NAMES, "then")
DIGIT_SIZE, HEIGHT, WIDTH = 8, 8, 32
MIN_DIGITS, MAX_DIGITS = 2, 4
CAPTION_LEN = 2 * MAX_DIGITS + 1  # BOS, digit, then, ..., digit, EOS


def caption(labels) -> str:
    return " then ".join(NAMES[label] for label in labels)


def tokens_of(labels) -> list[int]:
    """``[BOS, word ids..., EOS]`` of the caption of ``labels``."""
    return [BOS, *(WORDS.index(word) for word in caption(labels).split()), EOS]


def decode(ids) -> str:
    """The caption of token ids (up to the first EOS)."""
    words = []
    for i in ids:
        if i == EOS:
            break
        words.append(WORDS[i] if i >= len(SPECIALS) else "?")
    return " ".join(words)


def canvases(images, labels, count: int, generator):
    """``count`` canvases ``(count, 1, 8, 32)`` of 2 to 4 digits drawn from ``images``, their
    captions' tokens ``(count, CAPTION_LEN + 1)`` (padded) and the digits' labels."""
    out = torch.zeros(count, 1, HEIGHT, WIDTH)
    tokens = torch.full((count, CAPTION_LEN + 1), PAD)
    drawn = []
    for row in range(count):
        n = int(torch.randint(MIN_DIGITS, MAX_DIGITS + 1, (1,), generator=generator))
        picks = torch.randint(0, len(labels), (n,), generator=generator)
        # The blank columns, cut at random into n + 1 gaps: before, between and after the digits.
        cuts = torch.randint(0, WIDTH - n * DIGIT_SIZE + 1, (n,), generator=generator).sort().values
        for i, (pick, cut) in enumerate(zip(picks.tolist(), cuts.tolist(), strict=True)):
            left = cut + i * DIGIT_SIZE
            out[row, :, :, left:left + DIGIT_SIZE] = images[pick]
        ids = tokens_of(labels[picks].tolist())
        tokens[row, :len(ids)] = torch.tensor(ids)
        drawn.append(labels[picks].tolist())
    return out, tokens, drawn


# -- training ------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainConfig:
    encoder: str = "vit"  # "vit" or "cnn"
    decoder: str = "transformer"  # "transformer" or "lstm"
    attention: str = "luong"  # the LSTM's: "luong" or "bahdanau"
    steps: int = 2000
    batch: int = 64
    lr: float = 2e-3
    eval_every: int = 250
    eval_size: int = 1000
    beam_size: int = 4
    width: int = 64
    layers: int = 2
    patch_size: int = 4
    dropout: float = 0.1
    seed: int = 0


CHOICES = dict(encoder=("vit", "cnn"), decoder=("transformer", "lstm"), attention=("luong", "bahdanau"))
# No dropout in the fast mode: under the Triton interpreter (the tests) attention dropout runs the
# interpreted Triton kernel: seconds a step.
FAST = dict(steps=30, batch=16, eval_every=15, eval_size=32, beam_size=2, width=32, layers=1, dropout=0.0)


def build_model(config: TrainConfig) -> ImageCaptioner:
    return ImageCaptioner(ImageCaptionerConfig(
        len(WORDS), image_height=HEIGHT, image_width=WIDTH, in_chans=1, patch_size=config.patch_size,
        encoder=config.encoder, decoder=config.decoder, width=config.width, encoder_layers=config.layers,
        encoder_heads=4, decoder_layers=config.layers, decoder_heads=4, attention=config.attention,
        dropout=config.dropout, max_len=CAPTION_LEN, pad_id=PAD, bos_id=BOS, eos_id=EOS))


@torch.no_grad()
def exact_captions(model, images, drawn, beam_size=1, batch=500) -> float:
    """The share of ``images`` whose generated caption is exactly right."""
    model.eval()
    right = 0
    for start in range(0, len(drawn), batch):
        tokens = model.generate(images[start:start + batch], max_len=CAPTION_LEN, beam_size=beam_size)
        right += sum(decode(row) == caption(labels)
                     for row, labels in zip(tokens.tolist(), drawn[start:start + batch], strict=True))
    model.train()
    return right / len(drawn)


def train(config: TrainConfig, out: pathlib.Path) -> dict:
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    x_train, y_train, x_test, y_test = digits()
    held_out = canvases(x_test, y_test, config.eval_size, torch.Generator().manual_seed(1234))
    model = build_model(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, config.steps))
    name = f"{config.encoder} + {config.decoder}"
    history = {"encoder": config.encoder, "decoder": config.decoder, "step": [], "train": [],
               "eval_step": [], "exact_match": []}
    progress = tqdm(range(config.steps), desc=f"train {name}")
    for step in progress:
        images, tokens, _ = canvases(x_train, y_train, config.batch, generator)
        logits = model(images, tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), ignore_index=PAD)
        optimizer_step(loss, optimizer, schedule, clip=1.0)
        history["step"].append(step)
        history["train"].append(loss.item())
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            history["eval_step"].append(step + 1)
            history["exact_match"].append(exact_captions(model, held_out[0], held_out[2]))
            progress.set_postfix(loss=f"{loss.item():.3f}", exact=f"{history['exact_match'][-1]:.3f}")
    history["greedy"] = history["exact_match"][-1]
    history["beam"] = exact_captions(model, held_out[0], held_out[2], beam_size=config.beam_size)
    print(f"{name}: held-out exact captions {history['greedy']:.2%} greedy, {history['beam']:.2%} with "
          f"beam size {config.beam_size} ({len(held_out[2])} canvases of held-out digits)")
    model.eval()
    examples = held_out[0][:4]
    generated = model.generate(examples, max_len=CAPTION_LEN)
    for row, labels in zip(generated.tolist(), held_out[2][:4], strict=True):
        print(f"  {caption(labels)!r:44} -> {decode(row)!r}")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{config.decoder}.json").write_text(json.dumps(history))
    plot_loss_and_accuracy(history, out / f"{config.decoder}_training.png", f"captioning digits: {name}",
                           "exact_match", "held-out exact captions")
    plot_attention(model, examples, generated, out / f"{config.decoder}_attention.png", name)
    return history


# -- plots ---------------------------------------------------------------------------------------


def plot_attention(model, images, tokens, path, name: str):
    """A row per image: the canvas, then for each generated word (EOS included) its attention over
    the patches, each patch's weight spread over its pixels and drawn over the canvas."""
    plt = pyplot()
    rows, columns = model.config.grid
    patch = model.config.patch_size
    maps = model.attention_maps(images, tokens).unflatten(-1, (rows, columns))  # (B, T, rows, columns)
    maps = maps.repeat_interleave(patch, -2).repeat_interleave(patch, -1).numpy()  # (B, T, H, W)
    lengths = [row.index(EOS) + 1 if EOS in row else len(row) for row in tokens.tolist()]
    width = 1 + max(lengths)
    fig, axes = plt.subplots(len(images), width, figsize=(2.0 * width, 0.75 * len(images) + 0.6),
                             squeeze=False)
    for i, image in enumerate(images.numpy()):  # numpy arrays: matplotlib warns on tensors
        axes[i, 0].imshow(image[0], cmap="gray_r")
        axes[i, 0].set_title("input", fontsize=7)
        for t in range(lengths[i]):
            axes[i, t + 1].imshow(image[0], cmap="gray_r")
            axes[i, t + 1].imshow(maps[i, t], cmap="Reds", alpha=0.7, vmin=0, vmax=maps[i, t].max())
            axes[i, t + 1].set_title(WORDS[tokens[i, t]], fontsize=7)
        for ax in axes[i]:
            ax.axis("off")
    fig.suptitle(f"{name}: attention over the patches for each generated word", fontsize=9)
    save(fig, path)


def main(argv=None):
    config, args = parse_config(TrainConfig, FAST, argv, description=__doc__.splitlines()[0],
                                out="build/caption_digits", choices=CHOICES)
    return train(config, args.out)


if __name__ == "__main__":
    main()
