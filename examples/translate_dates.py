"""Translate dates written out in words into ISO dates, with an LSTM or a Transformer seq2seq.

The data is real calendar data every machine has: every day from 1900 to 2099 with its weekday
(``datetime``), written in one of a dozen formats with the names of ``calendar`` and English
ordinals, in random case, e.g. "Tuesday, the 5th of March 1996" or "5 mar 1996" -> "1996-03-05".
The held-out set holds days never seen in training (every 10th day of the calendar). Both sides
are characters.

    python examples/translate_dates.py --model lstm          # fastseq.models.Seq2Seq
    python examples/translate_dates.py --model transformer   # fastseq.models.TransformerSeq2Seq
    python examples/translate_dates.py --model lstm --fast   # a few steps: what the test runs

Prints the held-out exact-match accuracy of greedy and beam-search decoding, writes the training
curve, the accuracies as JSON and an attention heatmap (source characters by output characters)
as PNGs.
"""

from __future__ import annotations

import calendar
import dataclasses
import datetime
import json
import math
import pathlib
import random

import torch
import torch.nn.functional as F
from common import optimizer_step, parse_config, plot_loss_and_accuracy, pyplot, save, warmup_cosine
from tqdm.auto import tqdm

from fastseq.models import Seq2Seq, Seq2SeqConfig, TransformerSeq2Seq, TransformerSeq2SeqConfig

# -- data ----------------------------------------------------------------------------------------

FIRST_DAY, LAST_DAY = datetime.date(1900, 1, 1), datetime.date(2099, 12, 31)
FORMATS = (
    "{weekday}, the {ordinal} of {month} {year}",
    "{weekday}, {month} {day}, {year}",
    "{weekday} {day} {month} {year}",
    "{day} {month} {year}",
    "{month} {day}, {year}",
    "{ordinal} {month} {year}",
    "the {ordinal} of {month}, {year}",
    "{mon} {day} {year}",
    "{day} {mon} {year}",
    "{wd} {day} {mon} {year}",
    "{wd}, {mon} {ordinal} {year}",
    "{month} the {ordinal}, {year}",
)
PAD, BOS, EOS = 0, 1, 2
SPECIALS = ("<pad>", "<bos>", "<eos>")


def ordinal(day: int) -> str:
    suffix = "th" if 10 <= day % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def write_out(day: datetime.date, rng: random.Random) -> str:
    """``day`` in a random format and case."""
    text = rng.choice(FORMATS).format(
        weekday=calendar.day_name[day.weekday()], wd=calendar.day_abbr[day.weekday()],
        month=calendar.month_name[day.month], mon=calendar.month_abbr[day.month],
        day=day.day, ordinal=ordinal(day.day), year=day.year)
    return rng.choice((str.lower, str.upper, str.title, lambda s: s))(text)


def calendar_days(held_out: bool) -> list[datetime.date]:
    """Every day of the range; every 10th one is held out."""
    count = (LAST_DAY - FIRST_DAY).days + 1
    return [FIRST_DAY + datetime.timedelta(n) for n in range(count) if (n % 10 == 0) == held_out]


class Vocabulary:
    """Characters to ids and back, after the three special tokens."""

    def __init__(self, characters):
        self.itos = list(SPECIALS) + sorted(set(characters))
        self.stoi = {c: i for i, c in enumerate(self.itos)}

    def __len__(self):
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        return [self.stoi[c] for c in text]

    def decode(self, ids) -> str:
        out = []
        for i in ids:
            if i == EOS:
                break
            out.append(self.itos[i] if i >= len(SPECIALS) else "")
        return "".join(out)


def vocabularies() -> tuple[Vocabulary, Vocabulary]:
    """Source characters: every name of ``calendar`` in every case, digits and punctuation."""
    names = [*calendar.day_name, *calendar.day_abbr, *calendar.month_name, *calendar.month_abbr,
             "the", "of", "st", "nd", "rd", "th"]
    text = " ".join(names)
    source = text + text.lower() + text.upper() + "0123456789, "
    return Vocabulary(source), Vocabulary("0123456789-")


def batch_of(pairs, src_vocab, tgt_vocab):
    """Padded ``src (B, S)``, ``src_lengths (B,)``, ``tgt (B, T + 2)`` with BOS and EOS."""
    sources = [src_vocab.encode(s) for s, _ in pairs]
    targets = [[BOS, *tgt_vocab.encode(t), EOS] for _, t in pairs]
    width = max(map(len, sources))
    src = torch.tensor([s + [PAD] * (width - len(s)) for s in sources])
    return src, torch.tensor([len(s) for s in sources]), torch.tensor(targets)


def sample_pairs(days, count, rng):
    return [(write_out(day, rng), day.isoformat()) for day in rng.choices(days, k=count)]


# -- training ------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainConfig:
    model: str = "lstm"  # "lstm" (Seq2Seq) or "transformer" (TransformerSeq2Seq)
    attention: str = "luong"  # the LSTM's: "luong" or "bahdanau"
    steps: int = 2000
    batch: int = 64
    lr: float = 3e-3
    eval_every: int = 250
    eval_size: int = 1000
    beam_size: int = 4
    seed: int = 0


CHOICES = dict(model=("lstm", "transformer"), attention=("luong", "bahdanau"))
FAST = dict(steps=30, batch=16, eval_every=15, eval_size=32, beam_size=2)


def build_model(config: TrainConfig, src_vocab, tgt_vocab, fast: bool):
    if config.model == "lstm":
        sizes = dict(embed_dim=16, hidden_size=32) if fast else dict(embed_dim=64, hidden_size=128)
        return Seq2Seq(Seq2SeqConfig(len(src_vocab), len(tgt_vocab), attention=config.attention,
                                     pad_id=PAD, bos_id=BOS, eos_id=EOS, **sizes))
    if config.model == "transformer":
        sizes = dict(d_model=32, dim_feedforward=64) if fast else dict(d_model=128, dim_feedforward=256)
        return TransformerSeq2Seq(TransformerSeq2SeqConfig(
            len(src_vocab), len(tgt_vocab), nhead=4, num_encoder_layers=2, num_decoder_layers=2,
            dropout=0.0, max_len=64, pad_id=PAD, bos_id=BOS, eos_id=EOS, **sizes))
    raise ValueError(f"--model must be 'lstm' or 'transformer', got {config.model!r}")


def logits_of(model, src, lengths, tgt_in):
    out = model(src, tgt_in, src_lengths=lengths)
    return out[0] if isinstance(out, tuple) else out  # Seq2Seq also returns its attention


@torch.no_grad()
def exact_match(model, pairs, src_vocab, tgt_vocab, beam_size=1, batch=250) -> float:
    """The share of ``pairs`` whose translation is exactly right."""
    model.eval()
    right = 0
    for start in range(0, len(pairs), batch):
        chunk = pairs[start:start + batch]
        src, lengths, _ = batch_of(chunk, src_vocab, tgt_vocab)
        tokens = model.generate(src, lengths, max_len=12, beam_size=beam_size)
        right += sum(tgt_vocab.decode(row) == want for row, (_, want) in zip(tokens.tolist(), chunk,
                                                                             strict=True))
    model.train()
    return right / len(pairs)


def train(config: TrainConfig, out: pathlib.Path, fast: bool = False) -> dict:
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    src_vocab, tgt_vocab = vocabularies()
    train_days, held_out = calendar_days(False), sample_pairs(calendar_days(True), config.eval_size,
                                                             random.Random(1234))
    model = build_model(config, src_vocab, tgt_vocab, fast)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, config.steps))
    history = {"model": config.model, "step": [], "train": [], "eval_step": [], "exact_match": []}
    progress = tqdm(range(config.steps), desc=f"train {config.model}")
    for step in progress:
        src, lengths, tgt = batch_of(sample_pairs(train_days, config.batch, rng), src_vocab, tgt_vocab)
        logits = logits_of(model, src, lengths, tgt[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tgt[:, 1:].flatten())
        optimizer_step(loss, optimizer, schedule, clip=1.0)
        history["step"].append(step)
        history["train"].append(loss.item())
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            history["eval_step"].append(step + 1)
            history["exact_match"].append(exact_match(model, held_out, src_vocab, tgt_vocab))
            progress.set_postfix(loss=f"{loss.item():.3f}", exact=f"{history['exact_match'][-1]:.3f}")
    history["greedy"] = history["exact_match"][-1]
    history["beam"] = exact_match(model, held_out, src_vocab, tgt_vocab, beam_size=config.beam_size)
    print(f"{config.model}: held-out exact match {history['greedy']:.2%} greedy, "
          f"{history['beam']:.2%} with beam size {config.beam_size} ({len(held_out)} dates never seen "
          f"in training)")
    for text, want in held_out[:5]:
        src, lengths, _ = batch_of([(text, want)], src_vocab, tgt_vocab)
        print(f"  {text!r:44} -> {tgt_vocab.decode(model.generate(src, lengths, max_len=12)[0].tolist())}")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{config.model}.json").write_text(json.dumps(history))
    plot_loss_and_accuracy(history, out / f"{config.model}_training.png", f"dates to ISO: {config.model}",
                           "exact_match", "held-out exact match")
    plot_attention(model, held_out[:3], src_vocab, tgt_vocab, out / f"{config.model}_attention.png")
    return history


# -- plots ---------------------------------------------------------------------------------------


@torch.no_grad()
def attention_weights(model, src, lengths, tgt_in):
    """``(T, S)`` attention of each output character over the source: the LSTM's attention, or the
    Transformer's last cross-attention averaged over its heads."""
    model.eval()
    if isinstance(model, Seq2Seq):
        return model(src, tgt_in, src_lengths=lengths)[1][0]
    layer = model.transformer.decoder.layers[-1]
    captured = {}
    # Pre-norm: the cross-attention reads norm2's output; the memory is the encoder's output.
    hooks = [layer.norm2.register_forward_hook(lambda m, i, o: captured.update(query=o)),
             model.transformer.encoder.register_forward_hook(lambda m, i, o: captured.update(memory=o))]
    model(src, tgt_in, src_lengths=lengths)
    for hook in hooks:
        hook.remove()
    attn = layer.multihead_attn
    q = attn.query_heads(captured["query"])
    k, _ = attn.key_value_heads(captured["memory"])
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(attn.head_dim)
    valid = torch.arange(src.shape[1]) < lengths[:, None]
    return scores.masked_fill(~valid[:, None, None], float("-inf")).softmax(-1).mean(1)[0]


def plot_attention(model, pairs, src_vocab, tgt_vocab, path):
    plt = pyplot()
    fig, axes = plt.subplots(len(pairs), 1, figsize=(8, 2.2 * len(pairs)))
    for ax, (text, want) in zip(axes, pairs, strict=True):
        src, lengths, tgt = batch_of([(text, want)], src_vocab, tgt_vocab)
        weights = attention_weights(model, src, lengths, tgt[:, :-1])
        # Row t reads target token t (BOS first) and predicts character t + 1; the last row
        # predicts EOS.
        ax.imshow(weights[:-1].numpy(), cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(text)), list(text), fontsize=7)
        ax.set_yticks(range(len(want)), list(want), fontsize=7)
    fig.suptitle(f"{type(model).__name__}: attention of each output character over the source")
    save(fig, path)


def main(argv=None):
    config, args = parse_config(TrainConfig, FAST, argv, description=__doc__.splitlines()[0],
                                out="build/translate_dates", choices=CHOICES)
    return train(config, args.out, fast=args.fast)


if __name__ == "__main__":
    main()
