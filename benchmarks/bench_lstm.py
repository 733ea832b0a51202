"""LSTM: ``fastseq.nn.LSTM`` against ``torch.nn.LSTM`` (cuDNN / oneDNN) and the eager loop.

All three hold the same weights. Passes: ``fwd`` (inference, no graph) and ``fwd+bwd`` (one
backward with a fixed upstream gradient, to the input and every weight, as a training step of an
inner layer needs). Padding cases compare three ways to run a batch of
unequal lengths: fastseq with ``lengths=``, torch on a ``PackedSequence``, and both on the padded
batch. LayerNorm cases (``ln``) time ``fastseq.nn.LayerNormLSTM`` against the same module on the
plain-PyTorch reference loop, the only other implementation of it here, and show
``torch.nn.LSTM`` (no LayerNorm) for what the normalisations cost. Cell cases (``cell``) time one
step of ``fastseq.nn.LSTMCell`` against ``torch.nn.LSTMCell`` from a given state, as a decoder
loop runs it.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fastseq
from fastseq.bench import Case
from fastseq.benchmarks.training import timed_pass
from fastseq.reference import lstm as reference

SUITE = "lstm"

# The README's results table: these cases (CPU and GPU).
HEADLINES = (
    "fwd fp32 B16 T128 I128 H256",
    "fwd+bwd fp32 B16 T128 I128 H256",
    "fwd+bwd fp32 B8 T64 I128 H1024",
    "fwd+bwd fp32 B1 T1 I512 H512",
    "fwd+bwd fp32 B16 T128 I128 H256 padded:lengths",
    "fwd+bwd fp32 B16 T128 I128 H256 ln",
    "fwd+bwd LSTMCell fp32 B64 I512 H512",
    "fwd fp16 B64 T256 I512 H512",
    "fwd+bwd fp16 B64 T256 I512 H512",
    "fwd+bwd fp16 B64 T256 I512 H512 ln",
)
HEADLINE_BASELINES = ("torch", "torch_packed", "reference", "fastseq_persistent")
# The LSTM layers share the recurrent GEMMs and the torch.func path with the LayerNorm-LSTM.
SOURCES = (
    "csrc/cpu/*gemm*", "csrc/cpu/linear.h", "csrc/cpu/register_tiles.h", "csrc/cpu/layer_norm_lstm*",
    "fastseq/ops/eager.py", "fastseq/ops/layer_norm_lstm.py", "kernels/layer_norm_lstm.py",
)
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclasses.dataclass(frozen=True)
class Shape:
    dtype: torch.dtype
    batch: int
    steps: int
    input_size: int
    hidden: int
    layers: int = 1
    bidirectional: bool = False
    padding: str | None = None  # None, "lengths" (fastseq lengths= vs torch packed)
    layer_norm: bool = False  # fastseq.nn.LayerNormLSTM
    cell: bool = False  # one step of fastseq.nn.LSTMCell (steps must be 1)
    proj_size: int = 0


    def label(self):
        parts = [_DTYPE_NAMES[self.dtype], f"B{self.batch}", f"T{self.steps}", f"I{self.input_size}",
                 f"H{self.hidden}"]
        if self.layers > 1:
            parts.append(f"L{self.layers}")
        if self.bidirectional:
            parts.append("bidir")
        if self.proj_size:
            parts.append(f"P{self.proj_size}")
        if self.padding:
            parts.append(f"padded:{self.padding}")
        if self.layer_norm:
            parts.append("ln")
        if self.cell:
            parts = ["LSTMCell", *(p for p in parts if not p.startswith("T"))]
        return " ".join(parts)


def _cell_variants(shape, pass_, device):
    theirs = torch.nn.LSTMCell(shape.input_size, shape.hidden).to(device, shape.dtype)
    ours = fastseq.nn.LSTMCell(shape.input_size, shape.hidden).to(device, shape.dtype)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(shape.batch, shape.input_size, device=device, dtype=shape.dtype,
                    requires_grad=pass_ != "fwd")
    state = tuple(torch.randn(shape.batch, shape.hidden, device=device, dtype=shape.dtype)
                  for _ in range(2))

    def run(module):
        return lambda t: module(t, state)  # (h, c)

    return {"fastseq": timed_pass(run(ours), pass_, x, ours),
            "torch": timed_pass(run(theirs), pass_, x, theirs)}


def _modules(shape, device):
    kwargs = dict(num_layers=shape.layers, bidirectional=shape.bidirectional)
    if shape.proj_size:
        kwargs["proj_size"] = shape.proj_size
    theirs = torch.nn.LSTM(shape.input_size, shape.hidden, **kwargs).to(device, shape.dtype)
    kind = fastseq.nn.LayerNormLSTM if shape.layer_norm else fastseq.nn.LSTM
    ours = kind(shape.input_size, shape.hidden, **kwargs).to(device, shape.dtype)
    ours.load_state_dict(theirs.state_dict(), strict=not shape.layer_norm)
    return ours, theirs


def _eager(module, x):
    """torch.nn.LSTM's weights run through the plain-PyTorch reference loop (1 layer, 1 direction)."""
    batch = x.shape[1]
    zeros = x.new_zeros(batch, module.hidden_size)
    return reference.lstm_layer(x, zeros, zeros, module.weight_ih_l0, module.weight_hh_l0,
                                module.bias_ih_l0 + module.bias_hh_l0)[0]


def _forced(module, backend):
    def run(t):
        with fastseq.use_backend(backend):
            return module(t)[0]
    return run


def _case(shape, pass_, device):
    variants = _cell_variants(shape, pass_, device) if shape.cell else _layer_variants(
        shape, pass_, device)
    return Case(suite=SUITE, name=f"{pass_} {shape.label()}",
                params={"pass": pass_, **{f.name: str(getattr(shape, f.name))
                                          for f in dataclasses.fields(shape)}},
                dtype=shape.dtype, variants=variants)


def _layer_variants(shape, pass_, device):
    ours, theirs = _modules(shape, device)
    x = torch.randn(shape.steps, shape.batch, shape.input_size, device=device, dtype=shape.dtype,
                    requires_grad=pass_ != "fwd")
    variants = {}
    if shape.layer_norm:
        variants["fastseq"] = timed_pass(lambda t: ours(t)[0], pass_, x, ours)
        variants["reference"] = timed_pass(_forced(ours, "reference"), pass_, x, ours)
        variants["torch_no_ln"] = timed_pass(lambda t: theirs(t)[0], pass_, x, theirs)
    elif shape.padding:
        lengths = torch.linspace(shape.steps // 4, shape.steps, shape.batch).long()
        variants["fastseq"] = timed_pass(lambda t: ours(t, lengths=lengths.to(device))[0], pass_, x,
                                     ours)
        variants["torch_packed"] = timed_pass(
            lambda t: theirs(pack_padded_sequence(t, lengths, enforce_sorted=False))[0].data,
            pass_, x, theirs)
        variants["torch_padded"] = timed_pass(lambda t: theirs(t)[0], pass_, x, theirs)
    else:
        variants["fastseq"] = timed_pass(lambda t: ours(t)[0], pass_, x, ours)
        if device.type == "cuda":  # the default is the persistent kernel where it can run
            variants["fastseq_triton"] = timed_pass(_forced(ours, "triton"), pass_, x, ours)
        variants["torch"] = timed_pass(lambda t: theirs(t)[0], pass_, x, theirs)
        if shape.layers == 1 and not shape.bidirectional and not shape.proj_size \
                and shape.steps * shape.batch <= 16384:
            variants["eager_loop"] = timed_pass(lambda t: _eager(theirs, t), pass_, x, theirs)
    return variants


def _shapes(device, quick):
    if device.type == "cuda":
        base = Shape(torch.float16, batch=64, steps=256, input_size=512, hidden=512)
        shapes = [base, dataclasses.replace(base, dtype=torch.bfloat16),
                  dataclasses.replace(base, hidden=1024, input_size=1024),
                  dataclasses.replace(base, bidirectional=True, layers=2),
                  dataclasses.replace(base, hidden=500, input_size=500),
                  dataclasses.replace(base, padding="lengths"),
                  dataclasses.replace(base, layer_norm=True),
                  dataclasses.replace(base, cell=True, steps=1)]
        return shapes[:2] if quick else shapes
    headline = Shape(torch.float32, batch=16, steps=128, input_size=128, hidden=256)
    if quick:
        small = dataclasses.replace(headline, batch=4, steps=16, hidden=64, input_size=32)
        return [small, dataclasses.replace(small, layer_norm=True),
                dataclasses.replace(small, cell=True, steps=1)]
    return [
        headline,
        dataclasses.replace(headline, batch=1),
        dataclasses.replace(headline, batch=64),
        dataclasses.replace(headline, hidden=128),
        dataclasses.replace(headline, hidden=1024, batch=8, steps=64),
        dataclasses.replace(headline, steps=512, batch=8),
        dataclasses.replace(headline, steps=1024, batch=4, hidden=128),
        dataclasses.replace(headline, batch=128, steps=64),
        dataclasses.replace(headline, dtype=torch.bfloat16),
        dataclasses.replace(headline, dtype=torch.float16),  # fastseq: in float32 on the CPU
        # one decoding step, as a generation loop or an LSTMCell runs it
        dataclasses.replace(headline, batch=1, steps=1, input_size=512, hidden=512),
        dataclasses.replace(headline, layers=2, bidirectional=True),
        dataclasses.replace(headline, proj_size=128),  # torch: its non-oneDNN path
        dataclasses.replace(headline, padding="lengths"),
        dataclasses.replace(headline, layer_norm=True),
        dataclasses.replace(headline, layer_norm=True, batch=64),
        dataclasses.replace(headline, layer_norm=True, dtype=torch.bfloat16),
        dataclasses.replace(headline, layer_norm=True, batch=1, steps=1, input_size=512,
                            hidden=512),  # a decoding step
        # a decoder's LSTMCell step: small (host-bound) and typical training sizes
        dataclasses.replace(headline, cell=True, steps=1, batch=8, hidden=128),
        dataclasses.replace(headline, cell=True, steps=1, batch=32, input_size=256),
        dataclasses.replace(headline, cell=True, steps=1, batch=64, input_size=512, hidden=512),
    ]


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    """fwd and fwd+bwd over the shape sweep of ``device``."""
    return [_case(shape, pass_, device) for shape in _shapes(device, quick)
            for pass_ in ("fwd", "fwd+bwd")]


MEMORY_SWEEP = "steps"


def memory_cases(device: torch.device) -> list[Case]:
    """Peak memory of fwd+bwd over the sequence length: what each implementation keeps for the
    backward grows with T (fastseq: gates, cells and outputs of every step)."""
    base = (Shape(torch.float16, batch=64, steps=0, input_size=512, hidden=512)
            if device.type == "cuda" else
            Shape(torch.float32, batch=16, steps=0, input_size=128, hidden=256))
    out = []
    for steps in (64, 128, 256, 512):
        case = _case(dataclasses.replace(base, steps=steps), "fwd+bwd", device)
        case.params["steps"] = steps  # numeric, for the plot's axis
        out.append(case)
    return out
