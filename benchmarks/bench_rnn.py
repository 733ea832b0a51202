"""Elman RNN: ``fastseq.nn.RNN`` against ``torch.nn.RNN`` and the eager loop.

All hold the same weights. Passes: ``fwd`` (inference, no graph) and ``fwd+bwd`` (one backward
with a fixed upstream gradient, to the input and every weight, as a training step of an inner
layer needs). Padding cases (``padded:lengths``) compare three ways to run a batch of unequal
lengths, drawn uniformly from [T/8, T] (a fixed draw): fastseq with ``lengths=``, torch on a
``PackedSequence``, and torch on the padded batch. On a GPU ``fastseq`` is the default backend
(the Triton steps), ``fastseq_cuda`` the persistent CUDA recurrence, ``torch`` cuDNN.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fastseq
from fastseq.bench import Case
from fastseq.benchmarks.training import timed_pass
from fastseq.reference import rnn as reference

SUITE = "rnn"

# The README's results table: these cases (CPU).
HEADLINES = (
    "fwd fp32 B32 T128 I256 H256",
    "fwd+bwd fp32 B32 T128 I256 H256",
    "fwd+bwd fp32 B64 T128 I512 H512",
    "fwd+bwd fp32 B32 T128 I256 H256 L2",
    "fwd fp32 B32 T128 I256 H256 padded:lengths",
    "fwd+bwd fp32 B32 T128 I256 H256 padded:lengths",
)
HEADLINE_BASELINES = ("torch", "torch_packed")
# The layer shares the LSTM's packed recurrent GEMMs, its linear and parallel-steps helpers, its
# vector tanh, its input checks, and the eager autograd path.
SOURCES = (
    "csrc/cpu/*gemm*", "csrc/cpu/linear.h", "csrc/cpu/register_tiles.h", "csrc/cpu/lstm_common.h",
    "csrc/cpu/lstm_cell_simd.h", "csrc/cpu/parallel_steps.h", "fastseq/ops/eager.py",
    "fastseq/ops/lstm.py",
)
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


@dataclasses.dataclass(frozen=True)
class Shape:
    dtype: torch.dtype
    batch: int
    steps: int
    input_size: int
    hidden: int
    layers: int = 1
    bidirectional: bool = False
    nonlinearity: str = "tanh"
    padding: str | None = None  # None, "lengths" (fastseq lengths= vs torch packed and padded)

    def label(self):
        parts = [_DTYPE_NAMES[self.dtype], f"B{self.batch}", f"T{self.steps}", f"I{self.input_size}",
                 f"H{self.hidden}"]
        if self.layers > 1:
            parts.append(f"L{self.layers}")
        if self.bidirectional:
            parts.append("bidir")
        if self.nonlinearity != "tanh":
            parts.append(self.nonlinearity)
        if self.padding:
            parts.append(f"padded:{self.padding}")
        return " ".join(parts)


def _modules(shape, device):
    kwargs = dict(num_layers=shape.layers, bidirectional=shape.bidirectional,
                  nonlinearity=shape.nonlinearity)
    theirs = torch.nn.RNN(shape.input_size, shape.hidden, **kwargs).to(device, shape.dtype)
    ours = fastseq.nn.RNN(shape.input_size, shape.hidden, **kwargs).to(device, shape.dtype)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _eager(module, x):
    """torch.nn.RNN's weights run through the plain-PyTorch reference loop (1 layer, 1 direction)."""
    zeros = x.new_zeros(x.shape[1], module.hidden_size)
    return reference.rnn_layer(x, zeros, module.weight_ih_l0, module.weight_hh_l0,
                               module.bias_ih_l0 + module.bias_hh_l0,
                               nonlinearity=module.nonlinearity)[0]


def _lengths(shape):
    """Lengths uniform in [T/8, T], the same draw every run."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(shape.steps // 8, shape.steps + 1, (shape.batch,), generator=g)


def _forced(module, backend, **kwargs):
    def run(t):
        with fastseq.use_backend(backend):
            return module(t, **kwargs)[0]
    return run


def _variants(shape, pass_, device):
    ours, theirs = _modules(shape, device)
    x = torch.randn(shape.steps, shape.batch, shape.input_size, device=device, dtype=shape.dtype,
                    requires_grad=pass_ != "fwd")
    variants = {}
    if shape.padding:
        lengths = _lengths(shape)
        on_device = lengths.to(device)
        variants["fastseq"] = timed_pass(lambda t: ours(t, lengths=on_device)[0], pass_, x, ours)
        if device.type == "cuda":
            variants["fastseq_cuda"] = timed_pass(_forced(ours, "cuda", lengths=on_device), pass_,
                                                  x, ours)
        variants["torch_packed"] = timed_pass(
            lambda t: theirs(pack_padded_sequence(t, lengths, enforce_sorted=False))[0].data,
            pass_, x, theirs)
        variants["torch_padded"] = timed_pass(lambda t: theirs(t)[0], pass_, x, theirs)
    else:
        variants["fastseq"] = timed_pass(lambda t: ours(t)[0], pass_, x, ours)
        if device.type == "cuda":
            variants["fastseq_cuda"] = timed_pass(_forced(ours, "cuda"), pass_, x, ours)
        variants["torch"] = timed_pass(lambda t: theirs(t)[0], pass_, x, theirs)
        if shape.layers == 1 and not shape.bidirectional and shape.steps * shape.batch <= 4096:
            variants["eager_loop"] = timed_pass(lambda t: _eager(theirs, t), pass_, x, theirs)
    return variants


def _case(shape, pass_, device):
    return Case(suite=SUITE, name=f"{pass_} {shape.label()}",
                params={"pass": pass_, **{f.name: str(getattr(shape, f.name))
                                          for f in dataclasses.fields(shape)}},
                dtype=shape.dtype, variants=_variants(shape, pass_, device))


def _shapes(device, quick):
    headline = Shape(torch.float32, batch=32, steps=128, input_size=256, hidden=256)
    if quick:
        small = dataclasses.replace(headline, batch=4, steps=16, input_size=32, hidden=64)
        return [small, dataclasses.replace(small, padding="lengths")]
    if device.type == "cuda":
        return [headline, dataclasses.replace(headline, batch=64, input_size=1024, hidden=1024),
                dataclasses.replace(headline, dtype=torch.bfloat16),
                dataclasses.replace(headline, padding="lengths")]
    wide = dataclasses.replace(headline, input_size=512, hidden=512)
    return [
        headline,
        dataclasses.replace(headline, batch=64),
        wide,
        dataclasses.replace(wide, batch=64),
        dataclasses.replace(headline, nonlinearity="relu"),
        dataclasses.replace(headline, layers=2),
        dataclasses.replace(wide, layers=2),
        dataclasses.replace(headline, layers=2, bidirectional=True),
        dataclasses.replace(headline, batch=1),  # latency-bound: one row per step
        dataclasses.replace(headline, dtype=torch.bfloat16),
        dataclasses.replace(headline, padding="lengths"),
        dataclasses.replace(headline, batch=64, padding="lengths"),
        dataclasses.replace(wide, batch=64, padding="lengths"),
        dataclasses.replace(headline, layers=2, padding="lengths"),
    ]


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    """fwd and fwd+bwd over the shape sweep of ``device``."""
    return [_case(shape, pass_, device) for shape in _shapes(device, quick)
            for pass_ in ("fwd", "fwd+bwd")]
