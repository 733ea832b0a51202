"""Tag the tokens of Python source with their role, using a bidirectional LSTM.

The data are the Python standard library's own modules: the first ``files`` ``.py`` files of its
directory in sorted order (on every Python install), every ``held_out_every``-th of them held out.
``tokenize`` cuts each file into tokens and each logical line is a sequence. A token's input is its
text, looked up in a vocabulary of the ``vocab`` most frequent training tokens (the rest are
``<unk>``); its tag is its role, read off ``tokenize``'s token types, the ``keyword`` and ``builtins``
modules and its neighbours:

    keyword      ``def``, ``if``, ``None``, ...
    definition   the name after ``def`` or ``class``
    call         a name followed by ``(``
    attribute    a name after ``.``, not called
    builtin      a builtin's name, not called: ``ValueError``, ``len``
    name         any other name
    operator, number, string, comment

The same text takes several tags (``x.append(y)`` against ``x.append``, ``len(x)`` against ``len``),
and most strings, comments and numbers are ``<unk>``: the tagger has to read the tokens around each
one. The baseline gives each token text its most frequent tag in the training files (a text they lack
gets the most frequent tag of all), so the gap between the two is what the context adds.

    python examples/tag_python_tokens.py          # a minute or two on 2 CPU cores
    python examples/tag_python_tokens.py --fast   # a few steps: what the test runs

It writes the held-out accuracy as ``accuracy.png`` and ``history.json`` and prints it tag by tag.
"""

from __future__ import annotations

import builtins
import collections
import dataclasses
import json
import keyword
import math
import pathlib
import random
import sysconfig
import token
import tokenize

import torch
import torch.nn.functional as F
from common import optimizer_step, parse_config, pyplot, save
from tqdm.auto import tqdm

from fastseq.models import LSTMTagger, LSTMTaggingConfig

TAGS = ("keyword", "definition", "call", "attribute", "builtin", "name", "operator", "number", "string",
        "comment")
PAD, UNK = "<pad>", "<unk>"
IGNORE = -100  # the tag of padding: cross_entropy's default ignore_index
BUILTINS = frozenset(dir(builtins))
# Python 3.12 splits f-strings into parts (and 3.14 t-strings): all of them are string.
STRING_TYPES = frozenset(getattr(token, name) for name in
                         ("STRING", "FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END",
                          "TSTRING_START", "TSTRING_MIDDLE", "TSTRING_END") if hasattr(token, name))


@dataclasses.dataclass
class TrainConfig:
    steps: int = 1500
    files: int = 100  # of the standard library's modules, in sorted order
    held_out_every: int = 5  # every fifth file is held out
    vocab: int = 5000  # most frequent training token texts; the rest are <unk>
    max_len: int = 64  # longer logical lines are cut into pieces of this many tokens
    batch: int = 64
    embed_dim: int = 64
    hidden_size: int = 128  # per direction
    dropout: float = 0.2
    lr: float = 3e-3
    eval_every: int = 100
    seed: int = 0


FAST = dict(steps=40, files=10, vocab=1000, batch=32, embed_dim=32, hidden_size=32, lr=1e-2, eval_every=10)


def tag_of(tokens: list[tokenize.TokenInfo], i: int) -> str | None:
    """The role of ``tokens[i]`` on its logical line (``None``: not tagged, e.g. an error token)."""
    tok = tokens[i]
    if tok.type == token.NAME:
        before = tokens[i - 1].string if i > 0 else ""
        after = tokens[i + 1].string if i + 1 < len(tokens) else ""
        if keyword.iskeyword(tok.string):
            return "keyword"
        if before in ("def", "class"):
            return "definition"
        if after == "(":
            return "call"
        if before == ".":
            return "attribute"
        return "builtin" if tok.string in BUILTINS else "name"
    if tok.type == token.OP:
        return "operator"
    if tok.type == token.NUMBER:
        return "number"
    if tok.type in STRING_TYPES:
        return "string"
    if tok.type == token.COMMENT:
        return "comment"
    return None


def logical_lines(path: pathlib.Path):
    """The tokens of each logical line of a module, layout tokens (newlines, indents) left out; a
    comment on a line of its own goes with the logical line that follows it."""
    layout = {token.NEWLINE, token.NL, token.INDENT, token.DEDENT, token.ENDMARKER, token.ENCODING}
    line = []
    with tokenize.open(path) as file:
        for tok in tokenize.generate_tokens(file.readline):
            if tok.type == token.NEWLINE and line:
                yield line
                line = []
            elif tok.type not in layout:
                line.append(tok)
    if line:
        yield line


def tagged_sequences(paths, max_len: int):
    """(token texts, tags) for each logical line of the modules, cut to at most ``max_len`` tokens."""
    sequences = []
    for path in paths:
        try:
            lines = list(logical_lines(path))
        except (SyntaxError, tokenize.TokenError):  # a module this Python cannot tokenize
            continue
        for line in lines:
            pairs = [(tok.string, tag) for i, tok in enumerate(line) if (tag := tag_of(line, i))]
            for start in range(0, len(pairs), max_len):
                texts, tags = zip(*pairs[start:start + max_len], strict=True)
                sequences.append((list(texts), list(tags)))
    return sequences


def corpus(config: TrainConfig):
    """(training, held-out) tagged sequences of the first ``files`` standard-library modules."""
    paths = sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:config.files]
    held_out = {i for i in range(len(paths)) if i % config.held_out_every == config.held_out_every - 1}
    train = tagged_sequences([p for i, p in enumerate(paths) if i not in held_out], config.max_len)
    test = tagged_sequences([p for i, p in enumerate(paths) if i in held_out], config.max_len)
    return train, test


def encode(sequences, vocab: list[str]):
    """Each sequence as (token ids, tag ids), two int64 tensors."""
    index = {text: i for i, text in enumerate(vocab)}
    return [(torch.tensor([index.get(text, 1) for text in texts]),
             torch.tensor([TAGS.index(tag) for tag in tags])) for texts, tags in sequences]


def pad(examples, device):
    """A padded batch: (ids (B, T), tags (B, T) with ``IGNORE`` past each end, lengths (B,))."""
    ids = torch.nn.utils.rnn.pad_sequence([x for x, _ in examples], batch_first=True, padding_value=0)
    tags = torch.nn.utils.rnn.pad_sequence([y for _, y in examples], batch_first=True, padding_value=IGNORE)
    lengths = torch.tensor([len(x) for x, _ in examples])
    return ids.to(device), tags.to(device), lengths.to(device)


def baseline_predictions(train, test) -> list[list[str]]:
    """Each held-out token's most frequent tag in the training files, by its text alone."""
    by_text = collections.defaultdict(collections.Counter)
    for texts, tags in train:
        for text, tag in zip(texts, tags, strict=True):
            by_text[text][tag] += 1
    overall = collections.Counter(tag for _, tags in train for tag in tags).most_common(1)[0][0]
    return [[by_text[text].most_common(1)[0][0] if text in by_text else overall for text in texts]
            for texts, _ in test]


@torch.no_grad()
def predict(model, examples, device, batch: int = 256) -> list[list[str]]:
    """The tagger's tags of each sequence; batches of similar lengths, to pad little."""
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    predicted = [None] * len(examples)
    for start in range(0, len(order), batch):
        chunk = order[start:start + batch]
        ids, _, lengths = pad([examples[i] for i in chunk], device)
        best = model(ids, lengths).argmax(-1).cpu()
        for row, i in enumerate(chunk):
            predicted[i] = [TAGS[t] for t in best[row, :lengths[row]].tolist()]
    model.train()
    return predicted


def accuracy_by_tag(predicted, sequences) -> dict:
    """{tag: [correct, count]} over every token, with the total under ``"all"``."""
    scores = collections.defaultdict(lambda: [0, 0])
    for guesses, (_, tags) in zip(predicted, sequences, strict=True):
        for guess, tag in zip(guesses, tags, strict=True):
            for key in (tag, "all"):
                scores[key][0] += guess == tag
                scores[key][1] += 1
    return dict(scores)


def accuracy(predicted, sequences) -> float:
    correct, count = accuracy_by_tag(predicted, sequences)["all"]
    return correct / count


def train(config: TrainConfig, out: pathlib.Path) -> dict:
    """Train, evaluate every ``eval_every`` steps; returns the accuracies (and writes them)."""
    torch.manual_seed(config.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train_sequences, test_sequences = corpus(config)
    counts = collections.Counter(text for texts, _ in train_sequences for text in texts)
    vocab = [PAD, UNK] + [text for text, _ in counts.most_common(config.vocab)]
    train_examples, test_examples = encode(train_sequences, vocab), encode(test_sequences, vocab)
    baseline = baseline_predictions(train_sequences, test_sequences)
    model = LSTMTagger(LSTMTaggingConfig(
        vocab_size=len(vocab), num_labels=len(TAGS), embed_dim=config.embed_dim,
        hidden_size=config.hidden_size, dropout=config.dropout, padding_idx=0)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step / config.steps, 1.0))))
    history = {"train_tokens": sum(len(x) for x, _ in train_examples),
               "held_out_tokens": sum(len(x) for x, _ in test_examples),
               "baseline": accuracy(baseline, test_sequences),
               "step": [], "train": [], "eval_step": [], "eval": []}
    sampler = random.Random(config.seed)
    progress = tqdm(range(config.steps), desc="train")
    for step in progress:
        ids, tags, lengths = pad(sampler.sample(train_examples, config.batch), device)
        logits = model(ids, lengths)  # lengths: the backward direction starts at each line's own end
        loss = F.cross_entropy(logits.flatten(0, 1), tags.flatten(), ignore_index=IGNORE)
        optimizer_step(loss, optimizer, schedule)
        history["step"].append(step)
        history["train"].append(loss.item())
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            history["eval_step"].append(step + 1)
            history["eval"].append(accuracy(predict(model, test_examples, device), test_sequences))
            progress.set_postfix(loss=f"{history['train'][-1]:.3f}", held_out=f"{history['eval'][-1]:.4f}")
    history["by_tag"] = report(predict(model, test_examples, device), baseline, test_sequences)
    out.mkdir(parents=True, exist_ok=True)
    (out / "history.json").write_text(json.dumps(history))
    plot(history, out / "accuracy.png")
    return history


def report(predicted, baseline, sequences) -> dict:
    """Print and return the held-out accuracy of the tagger and of the baseline, tag by tag."""
    model_scores = accuracy_by_tag(predicted, sequences)
    baseline_scores = accuracy_by_tag(baseline, sequences)
    by_tag = {}
    print(f"{'held-out tag':>14} {'tokens':>7} {'LSTM':>7} {'baseline':>9}")
    for tag in (*TAGS, "all"):
        count = model_scores.get(tag, [0, 0])[1]
        if count:
            by_tag[tag] = {"tokens": count, "lstm": model_scores[tag][0] / count,
                           "baseline": baseline_scores[tag][0] / count}
            print(f"{tag:>14} {count:>7} {by_tag[tag]['lstm']:>7.2%} {by_tag[tag]['baseline']:>9.2%}")
    return by_tag


def plot(history, path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(history["eval_step"], history["eval"], label="bidirectional LSTM", marker="o")
    ax.axhline(history["baseline"], color="grey", linestyle="--", label="most frequent tag of the text")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out token accuracy")
    ax.set_title("tagging the tokens of Python's standard library")
    ax.legend()
    save(fig, path)


def main(argv=None):
    config, _args = parse_config(TrainConfig, FAST, argv, description=__doc__.splitlines()[0],
                                 out="build/tag_python_tokens")
    return train(config, _args.out)


if __name__ == "__main__":
    main()
