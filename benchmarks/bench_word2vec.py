"""Word2vec: ``fastseq.models.Word2Vec`` on the fused negative-sampling kernel against the same model
in eager PyTorch (the plain-PyTorch reference: ``nn.Embedding(sparse=True)`` lookups, a batched dot
product, ``softplus``, and autograd's sparse embedding backward).

Cases, float32, a 20 000-word vocabulary of 128-wide vectors, 4096 examples of 5 negatives each:
``train step`` (loss, backward, sparse SGD step) and ``loss`` (the forward alone), for skip-gram
(one centre word per example) and CBOW (a context window of 2 x 5 words, averaged).
"""

from __future__ import annotations

import torch

import fastseq
from fastseq.bench import Case
from fastseq.models import Word2Vec, Word2VecConfig

SUITE = "word2vec"

HEADLINES = ("train step skipgram fp32 B4096", "train step cbow fp32 B4096")
HEADLINE_BASELINES = ("eager",)
SOURCES = ("fastseq/models/word2vec.py", "fastseq/ops/negative_sampling.py",
           "fastseq/reference/negative_sampling.py", "csrc/cpu/negative_sampling.cpp")
VOCAB, DIM, NEGATIVES, WINDOW = 20000, 128, 5, 5


def _model(mode, device):
    torch.manual_seed(0)
    model = Word2Vec(Word2VecConfig(VOCAB, DIM, mode, WINDOW, NEGATIVES)).to(device)
    with torch.no_grad():  # trained-looking output vectors (word2vec starts them at zero)
        model.out_embed.weight.normal_(0, 0.1)
    return model


def _inputs(mode, batch, device):
    generator = torch.Generator().manual_seed(1)
    words = 1 if mode == "skipgram" else 2 * WINDOW
    inputs = torch.randint(0, VOCAB, (batch, words), generator=generator)
    return inputs.to(device), torch.randint(0, VOCAB, (batch, 1 + NEGATIVES), generator=generator).to(device)


def _eager(fn):
    """``fn`` on the plain-PyTorch path: the same model in eager PyTorch."""
    def call():
        with fastseq.use_backend("reference"):
            return fn()
    return call


def _train_step(model, inputs, targets):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.025)

    def step():
        loss = model(inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _case(name, params, fn):
    return Case(suite=SUITE, name=name, params=params, dtype=torch.float32,
                variants={"fastseq": fn, "eager": _eager(fn)})


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    """Training step and loss, skip-gram and CBOW (float32)."""
    batch = 512 if quick else 4096
    out = []
    for mode in ("skipgram", "cbow"):
        model, (inputs, targets) = _model(mode, device), _inputs(mode, batch, device)
        params = {"mode": mode, "batch": batch, "vocab": VOCAB, "dim": DIM, "negatives": NEGATIVES}
        out.append(_case(f"train step {mode} fp32 B{batch}", {**params, "pass": "train"},
                         _train_step(model, inputs, targets)))
        out.append(_case(f"loss {mode} fp32 B{batch}", {**params, "pass": "forward"},
                         torch.no_grad()(lambda m=model, i=inputs, t=targets: m(i, t))))
    return out
