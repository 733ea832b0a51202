"""Train word2vec on the words of Python's bundled documentation, then query the vectors.

The corpus is ``pydoc_data.topics`` (about 64 thousand words on every Python install), lowercased
and cut into words; words seen fewer than ``--min-count`` times are dropped. ``fastseq.models.Word2Vec``
learns skip-gram (or CBOW) vectors with negative sampling and subsampling of frequent words, by
sparse SGD with a linearly decaying learning rate, as word2vec's own code trains. Its loss and the
loss's backward run in fastseq's fused negative-sampling kernel.

The vectors are judged by pairs of words the documentation uses alike (true / false, list / tuple,
read / write, ...): for each, the rank of one word among the other's nearest neighbours, against
the vocabulary's size (a random embedding ranks it in the middle).

    python examples/train_word2vec.py                # seconds on 2 CPU cores
    python examples/train_word2vec.py --mode cbow
    python examples/train_word2vec.py --fast         # a few steps: what the test runs

Prints the nearest neighbours of a few words, an analogy and the pairs' ranks; writes a 2-D
projection of the vectors of frequent words, the loss curve and the history as JSON.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import pathlib
import pydoc_data.topics
import re

import torch
from common import parse_config, pyplot, save
from tqdm.auto import tqdm

from fastseq.models import Word2Vec, Word2VecConfig, Word2VecSampler

PAIRS = (("true", "false"), ("list", "tuple"), ("int", "float"), ("key", "value"), ("read", "write"),
         ("get", "set"), ("first", "last"), ("upper", "lower"), ("positional", "keyword"),
         ("start", "stop"), ("left", "right"), ("minimum", "maximum"), ("import", "module"),
         ("class", "instance"), ("exception", "raised"), ("loop", "iteration"))
QUERIES = ("list", "exception", "class", "true", "string", "loop")


@dataclasses.dataclass
class TrainConfig:
    mode: str = "skipgram"
    epochs: int = 10
    batch: int = 1024
    dim: int = 100
    window: int = 5
    negatives: int = 5
    min_count: int = 5
    lr: float = 0.025  # word2vec's starting rate for skip-gram (its CBOW default is 0.05)
    seed: int = 0


FAST = dict(epochs=1, batch=4096, dim=16)


def corpus(min_count: int):
    """``(ids (L,), vocabulary, counts (V,))``: the documentation's words, those seen fewer than
    ``min_count`` times left out, the vocabulary most frequent first."""
    text = " ".join(pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics)).lower()
    words = re.findall(r"[a-z][a-z0-9_]*", text)
    counts = collections.Counter(words)
    vocabulary = [w for w, n in counts.most_common() if n >= min_count]
    index = {w: i for i, w in enumerate(vocabulary)}
    ids = torch.tensor([index[w] for w in words if w in index])
    return ids, vocabulary, torch.tensor([counts[w] for w in vocabulary])


def pair_ranks(model, index) -> dict[str, int]:
    """For each of PAIRS in the vocabulary, the rank (1 = nearest) of the second word among the
    first's neighbours."""
    vectors = model.vectors()
    ranks = {}
    for a, b in PAIRS:
        if a in index and b in index:
            cosines = vectors @ vectors[index[a]]
            cosines[index[a]] = -2.0
            ranks[f"{a}/{b}"] = int((cosines > cosines[index[b]]).sum()) + 1
    return ranks


def train(config: TrainConfig, out: pathlib.Path) -> dict:
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    ids, vocabulary, counts = corpus(config.min_count)
    index = {w: i for i, w in enumerate(vocabulary)}
    model_config = Word2VecConfig(len(vocabulary), config.dim, config.mode, config.window, config.negatives)
    model, sampler = Word2Vec(model_config), Word2VecSampler(counts, model_config)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
    history = {"step": [], "train": [], "ranks_before": pair_ranks(model, index)}
    epochs = tqdm(range(config.epochs), desc="epochs")
    for epoch in epochs:
        inputs, targets = sampler.examples(ids, generator)
        order = torch.randperm(len(inputs), generator=generator)
        for start in range(0, len(order), config.batch):
            rows = order[start:start + config.batch]
            done = (epoch + start / len(order)) / config.epochs
            for group in optimizer.param_groups:  # word2vec's schedule: linear decay to 0.01%
                group["lr"] = config.lr * max(1e-4, 1 - done)
            # Summed: word2vec's SGD moves each example's rows at the full rate.
            loss = model(inputs[rows], targets[rows], reduction="sum")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            history["step"].append(len(history["step"]))
            history["train"].append(loss.item() / len(rows))
        epochs.set_postfix(loss=f"{history['train'][-1]:.3f}", examples=len(inputs))
    history["ranks"] = pair_ranks(model, index)
    report(model, vocabulary, index, history)
    out.mkdir(parents=True, exist_ok=True)
    (out / "history.json").write_text(json.dumps(history))
    plot_loss(history, out / "training.png")
    plot_projection(model, vocabulary, out / "projection.png")
    return history


def report(model, vocabulary, index, history):
    for word in QUERIES:
        if word in index:
            neighbours, _ = model.most_similar(index[word], k=6)
            print(f"{word:>10}: {', '.join(vocabulary[i] for i in neighbours.tolist())}")
    if all(w in index for w in ("tuple", "list", "immutable")):
        best, _ = model.analogy(index["tuple"], index["immutable"], index["list"], k=3)
        print(f"tuple : immutable :: list : {', '.join(vocabulary[i] for i in best.tolist())}")
    ranks = history["ranks"]
    median = sorted(ranks.values())[len(ranks) // 2]
    before = sorted(history["ranks_before"].values())[len(ranks) // 2]
    print(f"median rank of a word's partner among its neighbours: {median} of {len(vocabulary)} words "
          f"(untrained: {before}); " + ", ".join(f"{pair} {rank}" for pair, rank in ranks.items()))


def plot_loss(history, path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(history["step"], history["train"], alpha=0.6)
    ax.set_xlabel("step")
    ax.set_ylabel("negative-sampling loss")
    ax.set_title("word2vec on the Python documentation")
    save(fig, path)


def plot_projection(model, vocabulary, path, skip: int = 40, count: int = 150):
    """The vectors of the ``count`` most frequent words after the ``skip`` most frequent, projected
    on their first two principal components."""
    vectors = model.vectors()[skip:skip + count]
    _, _, components = torch.pca_lowrank(vectors, q=2)
    points = (vectors - vectors.mean(0)) @ components
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 9))
    ax.scatter(points[:, 0], points[:, 1], s=4, alpha=0.4)
    for (x, y), word in zip(points.tolist(), vocabulary[skip:skip + count], strict=True):
        ax.annotate(word, (x, y), fontsize=6)
    ax.set_title("word vectors, first two principal components")
    save(fig, path)


def main(argv=None):
    config, args = parse_config(TrainConfig, FAST, argv, description=__doc__.splitlines()[0],
                                out="build/train_word2vec", choices={"mode": ("skipgram", "cbow")})
    return train(config, args.out)


if __name__ == "__main__":
    main()
