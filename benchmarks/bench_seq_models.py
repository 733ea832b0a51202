"""The recurrent and encoder-decoder models against their torch.nn builds.

Each baseline is the same model holding the same weights on torch.nn's modules
(``fastseq.nn.to_torch_nn``: ``nn.LSTM`` fed a ``PackedSequence`` where fastseq takes
``lengths=``, ``nn.LSTMCell``, ``nn.Transformer``). Cases, float32:

* ``train step``: forward, cross-entropy, backward and an AdamW step, for the LSTM language
  model, the bidirectional tagger on a ragged batch, the LSTM seq2seq with Luong attention and the
  Transformer seq2seq;
* ``tagger inference``: the tagger's forward on a ragged batch (``lengths=`` against packing);
* ``lm generate`` and ``seq2seq decode``: sampling from the language model and greedy translation
  with the LSTM seq2seq, a step at a time in both builds (the carried state is their cache);
* ``transformer decode 64 tokens``: greedy translation of 64 tokens, fastseq's over the decoder's
  KV cache against torch.nn's decoder rerun over the whole prefix at every step (what
  ``nn.Transformer`` offers), and fastseq's own decoder rerun the same way (``rerun``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastseq.bench import Case
from fastseq.benchmarks.training import train_step
from fastseq.models import (
    LSTMLanguageModel,
    LSTMLMConfig,
    LSTMTagger,
    LSTMTaggingConfig,
    Seq2Seq,
    Seq2SeqConfig,
    TransformerSeq2Seq,
    TransformerSeq2SeqConfig,
)
from fastseq.nn import to_torch_nn

SUITE = "seq_models"

HEADLINES = ("lm train step fp32 B32 T64", "tagger train step fp32 B32 T48 ragged",
             "tagger inference fp32 B32 T48 ragged", "seq2seq train step fp32 B32 S32 T16",
             "seq2seq decode fp32 B8 32 tokens",
             "transformer train step fp32 B32 S32 T16", "transformer decode fp32 B8 64 tokens")
HEADLINE_BASELINES = ("torch.nn",)
SOURCES = ("benchmarks/training.py", "fastseq/models/lstm_*.py", "fastseq/models/seq2seq.py",
           "fastseq/models/transformer_seq2seq.py", "fastseq/models/decoding.py", "fastseq/models/inputs.py",
           "fastseq/nn/*.py", "fastseq/ops/*.py", "kernels/lstm*.py", "kernels/attention*.py",
           "csrc/cpu/lstm*", "csrc/cpu/linear.h", "csrc/cpu/attention*")
MEMORY_SWEEP = "batch"

VOCAB = 2000


def _pair(model, train: bool = True):
    """``{"fastseq": model, "torch.nn": its torch.nn build}``, both in training or eval mode."""
    return {"fastseq": model.train(train), "torch.nn": to_torch_nn(model).train(train)}


def _inference(model, *inputs):
    return torch.no_grad()(lambda: model(*inputs))


def _case(name, params, variants):
    return Case(suite=SUITE, name=name, params=params, dtype=torch.float32, variants=variants)


def _ragged_lengths(batch, length, device):
    """Lengths spread over ``[length / 4, length]``, the longest first (as a real batch's)."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(length // 4, length + 1, (batch,), generator=generator)
    lengths[0] = length
    return lengths.to(device)


def _lm(device, batch, length):
    torch.manual_seed(0)
    model = LSTMLanguageModel(LSTMLMConfig(VOCAB, 256, 256, 2, dropout=0.0)).to(device)
    ids = torch.randint(0, VOCAB, (batch, length + 1), device=device)

    def loss_of(m):
        logits, _ = m(ids[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())

    return _case(f"lm train step fp32 B{batch} T{length}",
                 {"model": "lm", "pass": "train", "batch": batch, "length": length},
                 {name: train_step(m, loss_of) for name, m in _pair(model).items()})


def _tagger(device, batch, length, train: bool):
    torch.manual_seed(0)
    model = LSTMTagger(LSTMTaggingConfig(VOCAB, 20, 128, 128)).to(device)
    ids = torch.randint(1, VOCAB, (batch, length), device=device)
    lengths = _ragged_lengths(batch, length, device)
    tags = torch.randint(0, 20, (batch, length), device=device)
    tags[torch.arange(length, device=device) >= lengths[:, None]] = -100

    def loss_of(m):
        return F.cross_entropy(m(ids, lengths).flatten(0, 1), tags.flatten(), ignore_index=-100)

    pair = _pair(model, train)
    if train:
        variants = {name: train_step(m, loss_of) for name, m in pair.items()}
    else:
        variants = {name: _inference(m, ids, lengths) for name, m in pair.items()}
    kind = "train step" if train else "inference"
    return _case(f"tagger {kind} fp32 B{batch} T{length} ragged",
                 {"model": "tagger", "pass": "train" if train else "inference", "batch": batch,
                  "length": length}, variants)


def _lm_generate(device, batch, steps):
    torch.manual_seed(0)
    model = LSTMLanguageModel(LSTMLMConfig(VOCAB, 256, 256, 2, dropout=0.0)).to(device)
    prompt = torch.randint(0, VOCAB, (batch, 16), device=device)
    variants = {name: lambda m=m: m.generate(prompt, steps, temperature=1.0, top_k=50,
                                             generator=torch.Generator(device).manual_seed(0))
                for name, m in _pair(model, train=False).items()}
    return _case(f"lm generate fp32 B{batch} {steps} tokens",
                 {"model": "lm", "pass": "decode", "batch": batch, "new_tokens": steps}, variants)


def _translation_batch(device, batch, source, target):
    src = torch.randint(3, VOCAB, (batch, source), device=device)
    lengths = _ragged_lengths(batch, source, device)
    src[torch.arange(source, device=device) >= lengths[:, None]] = 0
    tgt = torch.randint(3, VOCAB, (batch, target + 1), device=device)
    return src, lengths, tgt


def _translation_loss(src, lengths, tgt):
    def loss_of(m):
        out = m(src, tgt[:, :-1], src_lengths=lengths)
        logits = out[0] if isinstance(out, tuple) else out
        return F.cross_entropy(logits.flatten(0, 1), tgt[:, 1:].flatten())

    return loss_of


def _transformer(device):
    torch.manual_seed(0)
    return TransformerSeq2Seq(TransformerSeq2SeqConfig(VOCAB, VOCAB, 256, 8, 3, 3, 1024, dropout=0.0,
                                                       max_len=128)).to(device)


def _translation_train(device, kind, batch, source, target):
    torch.manual_seed(0)
    if kind == "seq2seq":
        model = Seq2Seq(Seq2SeqConfig(VOCAB, VOCAB, 128, 256)).to(device)
    else:
        model = _transformer(device)
    loss_of = _translation_loss(*_translation_batch(device, batch, source, target))
    return _case(f"{kind} train step fp32 B{batch} S{source} T{target}",
                 {"model": kind, "pass": "train", "batch": batch, "source": source, "target": target},
                 {name: train_step(m, loss_of) for name, m in _pair(model).items()})


@torch.no_grad()
def greedy_by_rerunning(model, src, lengths, steps):
    """Greedy decoding as ``nn.Transformer`` allows it: encode once, then run the decoder over the
    whole prefix at every step and keep the last position's argmax."""
    memory, padding = model.encode(src, lengths)
    tokens = torch.full((src.shape[0], 1), model.config.bos_id, device=src.device)
    for _ in range(steps):
        causal = torch.nn.Transformer.generate_square_subsequent_mask(tokens.shape[1], device=src.device)
        out = model.transformer.decoder(model._embed(model.tgt_embedding, tokens), memory,
                                        tgt_mask=causal, memory_key_padding_mask=padding,
                                        tgt_is_causal=True)
        tokens = torch.cat([tokens, model.head(out[:, -1]).argmax(-1, keepdim=True)], 1)
    return tokens[:, 1:]


def _seq2seq_decode(device, batch, source, steps):
    torch.manual_seed(0)
    model = Seq2Seq(Seq2SeqConfig(VOCAB, VOCAB, 128, 256)).to(device)
    src, lengths, _ = _translation_batch(device, batch, source, 0)
    variants = {name: lambda m=m: m.generate(src, lengths, max_len=steps, stop_at_eos=False)
                for name, m in _pair(model, train=False).items()}
    return _case(f"seq2seq decode fp32 B{batch} {steps} tokens",
                 {"model": "seq2seq", "pass": "decode", "batch": batch, "source": source,
                  "new_tokens": steps}, variants)


def _decode(device, batch, source, steps):
    model, twin = _pair(_transformer(device), train=False).values()
    src, lengths, _ = _translation_batch(device, batch, source, 0)
    return _case(f"transformer decode fp32 B{batch} {steps} tokens",
                 {"model": "transformer", "pass": "decode", "batch": batch, "source": source,
                  "new_tokens": steps}, {
                     "fastseq": lambda: model.generate(src, lengths, max_len=steps, stop_at_eos=False),
                     "torch.nn": lambda: greedy_by_rerunning(twin, src, lengths, steps),
                     "rerun": lambda: greedy_by_rerunning(model, src, lengths, steps),
                 })


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    """A training step of each model, the tagger's inference and Transformer decoding (float32)."""
    steps = 8 if quick else 64
    return [_lm(device, 32, 64), _lm_generate(device, 8, steps), _tagger(device, 32, 48, train=True),
            _tagger(device, 32, 48, train=False), _translation_train(device, "seq2seq", 32, 32, 16),
            _seq2seq_decode(device, 8, 32, steps // 2),
            _translation_train(device, "transformer", 32, 32, 16), _decode(device, 8, 32, steps)]


def memory_cases(device: torch.device) -> list[Case]:
    """The training steps at growing batch: ``python -m fastseq profile seq_models``."""
    return [case(device, batch) for batch in (8, 16, 32, 64) for case in (
        lambda d, b: _lm(d, b, 64),
        lambda d, b: _tagger(d, b, 48, train=True),
        lambda d, b: _translation_train(d, "seq2seq", b, 32, 16),
        lambda d, b: _translation_train(d, "transformer", b, 32, 16))]
