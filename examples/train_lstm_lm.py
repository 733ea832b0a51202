"""Train an LSTM language model on the text of Python's bundled documentation.

The corpus is ``pydoc_data.topics`` (about 0.47 million characters, on every Python install), split
90/10 into training and held-out text, read as characters (``--level char``, the default) or as words
(``--level word``: the ``vocab`` most frequent words and punctuation marks of the training text, the
rest ``<unk>``). The model is ``fastseq.models.LSTMLanguageModel``, trained by truncated
backpropagation through time: the training text is cut into ``batch`` contiguous streams that are read
``bptt`` tokens at a time, the LSTM's state carried from one window to the next with its history cut.
Every ``eval_every`` steps the held-out perplexity is measured the same way over the first
``eval_tokens`` held-out tokens. The baseline to beat is the unigram perplexity of those tokens: each
token predicted by its frequency in the training text, whatever came before it.

    python examples/train_lstm_lm.py                  # characters, a few minutes on 2 CPU cores
    python examples/train_lstm_lm.py --level word     # words
    python examples/train_lstm_lm.py --optimizer sgd --lr 20 --clip 0.25     # Zaremba et al.'s recipe
    python examples/train_lstm_lm.py --fast           # a few steps: what the test runs

It writes the perplexities as ``perplexity.png`` and ``history.json`` and ends with a few samples.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import pathlib
import pydoc_data.topics
import re

import torch
import torch.nn.functional as F
from common import optimizer_step, parse_config, pyplot, save
from tqdm.auto import tqdm

from fastseq.models import LSTMLanguageModel, LSTMLMConfig, detach_state

UNK = "<unk>"


@dataclasses.dataclass
class TrainConfig:
    steps: int = 1500
    level: str = "char"
    vocab: int = 2000  # words kept at --level word (of about 4000; characters are all kept)
    batch: int = 32  # contiguous streams, each carrying its own LSTM state
    bptt: int = 64  # tokens per window: how far back the gradients reach
    width: int = 256  # embedding and hidden size, equal so that the output layer is tied to the embedding
    num_layers: int = 2
    dropout: float = 0.2
    optimizer: str = "adamw"
    lr: float = 2e-3
    clip: float = 0.5  # gradient norm: LSTMs' gradients occasionally explode
    eval_every: int = 100
    eval_tokens: int = 16384
    seed: int = 0


FAST = dict(steps=30, batch=8, bptt=32, width=64, num_layers=1, lr=1e-2, eval_every=10, eval_tokens=2048)
CHOICES = dict(level=("char", "word"), optimizer=("adamw", "sgd"))


def split_tokens(text: str, level: str) -> list[str]:
    """Characters, or words and punctuation marks (newlines kept: they shape the documentation)."""
    return list(text) if level == "char" else re.findall(r"\w+|[^\w\s]|\n", text)


def join_tokens(tokens: list[str], level: str) -> str:
    return "".join(tokens) if level == "char" else " ".join(tokens).replace(" \n ", "\n")


def corpus(level: str, vocab_size: int):
    """(vocabulary, training ids, held-out ids); the vocabulary is ``<unk>`` then the training tokens,
    most frequent first (at the word level only the ``vocab_size`` most frequent)."""
    text = "\n\n".join(pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics))
    split = int(0.9 * len(text))
    train_tokens, held_out_tokens = split_tokens(text[:split], level), split_tokens(text[split:], level)
    counts = collections.Counter(train_tokens)
    vocab = [UNK] + [token for token, _ in counts.most_common(None if level == "char" else vocab_size)]
    return vocab, encode(train_tokens, vocab), encode(held_out_tokens, vocab)


def encode(tokens: list[str], vocab: list[str]) -> torch.Tensor:
    index = {token: i for i, token in enumerate(vocab)}
    return torch.tensor([index.get(token, 0) for token in tokens], dtype=torch.long)


def streams(ids: torch.Tensor, batch: int) -> torch.Tensor:
    """``ids`` cut into ``batch`` contiguous rows ``(batch, len(ids) // batch)``; the remainder is dropped."""
    length = len(ids) // batch
    return ids[:batch * length].view(batch, length)


def windows(rows: torch.Tensor, bptt: int):
    """Consecutive windows of ``bptt`` columns, left to right: (inputs, next-token targets)."""
    for start in range(0, rows.shape[1] - 1, bptt):
        end = min(start + bptt, rows.shape[1] - 1)
        yield rows[:, start:end], rows[:, start + 1:end + 1]


def training_windows(rows: torch.Tensor, bptt: int):
    """Windows over ``rows`` again and again: (first of a pass?, inputs, targets)."""
    while True:
        for i, (x, y) in enumerate(windows(rows, bptt)):
            yield i == 0, x, y


def unigram_perplexity(train_ids: torch.Tensor, rows: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of the targets of ``rows`` under the training tokens' frequencies; add-one smoothed,
    so that a token the training text lacks costs a finite amount."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1
    log_probs = (counts / counts.sum()).log()
    return math.exp(-log_probs[rows[:, 1:].cpu()].mean().item())


@torch.no_grad()
def perplexity(model, rows: torch.Tensor, bptt: int) -> float:
    """exp of the mean cross-entropy of every target in ``rows``, read as in training (state carried)."""
    model.eval()
    total, count, state = 0.0, 0, None
    for x, y in windows(rows, bptt):
        logits, state = model(x, state)
        total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train()
    return math.exp(total / count)


def make_optimizer(model, config: TrainConfig):
    """AdamW or plain SGD, with the learning rate decayed to zero along a cosine."""
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step / config.steps, 1.0))))
    return optimizer, schedule


def train(config: TrainConfig, out: pathlib.Path) -> dict:
    """Train, evaluate every ``eval_every`` steps; returns the perplexities (and writes them)."""
    torch.manual_seed(config.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vocab, train_ids, held_out_ids = corpus(config.level, config.vocab)
    train_rows = streams(train_ids, config.batch).to(device)
    eval_rows = streams(held_out_ids[:config.eval_tokens], config.batch).to(device)
    model = LSTMLanguageModel(LSTMLMConfig(
        vocab_size=len(vocab), embed_dim=config.width, hidden_size=config.width,
        num_layers=config.num_layers, dropout=config.dropout)).to(device)
    optimizer, schedule = make_optimizer(model, config)
    history = {"level": config.level, "vocab_size": len(vocab),
               "unigram": unigram_perplexity(train_ids, eval_rows, len(vocab)),
               "step": [], "train": [], "eval_step": [], "eval": []}
    batches, state = training_windows(train_rows, config.bptt), None
    progress = tqdm(range(config.steps), desc="train")
    for step in progress:
        first, x, y = next(batches)
        # Each stream picks up where its last window stopped, except when a pass over the text
        # begins again: the end of a stream is no context for its start.
        logits, state = model(x, None if first else detach_state(state))
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        optimizer_step(loss, optimizer, schedule, clip=config.clip)
        history["step"].append(step)
        history["train"].append(math.exp(loss.item()))  # with dropout on, so above the held-out one
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            history["eval_step"].append(step + 1)
            history["eval"].append(perplexity(model, eval_rows, config.bptt))
            progress.set_postfix(train=f"{history['train'][-1]:.2f}", held_out=f"{history['eval'][-1]:.2f}")
    print(f"held-out perplexity per {config.level}: {history['eval'][-1]:.2f} "
          f"(unigram baseline {history['unigram']:.2f})")
    out.mkdir(parents=True, exist_ok=True)
    (out / "history.json").write_text(json.dumps(history))
    plot(history, out / "perplexity.png")
    print_samples(model, vocab, config.level, device)
    return history


def plot(history, path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(history["step"], history["train"], label="training window (dropout on)", alpha=0.5)
    ax.plot(history["eval_step"], history["eval"], label="held out", marker="o")
    ax.axhline(history["unigram"], color="grey", linestyle="--", label="unigram, held out")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"perplexity per {history['level']}")
    ax.set_title(f"{history['level']}-level LSTM on Python's documentation")
    ax.legend()
    save(fig, path)


def print_samples(model, vocab, level, device, prompts=("The ", "def ")):
    model.eval()
    generator = torch.Generator(device=device).manual_seed(0)
    length = 200 if level == "char" else 40
    for prompt in prompts:
        ids = encode(split_tokens(prompt, level), vocab)[None].to(device)
        out = model.generate(ids, length, temperature=0.8, top_k=20, generator=generator)
        print(repr(join_tokens([vocab[i] for i in out[0].tolist()], level)))


def main(argv=None):
    config, args = parse_config(TrainConfig, FAST, argv, description=__doc__.splitlines()[0],
                                out="build/train_lstm_lm", choices=CHOICES)
    return train(config, args.out)


if __name__ == "__main__":
    main()
