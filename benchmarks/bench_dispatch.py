"""Dispatch: the cost of one call at sizes so small that the host's work is nearly all of it.

Each case runs an op on inputs of a few kilobytes, forward only (no autograd graph), so its time
is what the host spends on one call (argument checks, the op layer, the backend choice,
launches) and, on a GPU, the launch latency. The baselines are torch's own ops on the same
inputs, and ``one_launch``, a single elementwise torch op on the output's bytes: the floor any op
with a kernel launch pays.
Variants that isolate a fastseq cost:

* rotary ``fastseq_int_offset``: positions given as an int, which needs no range check on the
  device (the per-batch tensor of positions does: one host read);
* attention ``fastseq_key_lengths``: key lengths given as a tensor (a range check, one host read);
* LSTM at T=1 and T=16: the per-step cost is their difference over 15 steps;
  ``fastseq_layer`` calls the layer op (:func:`fastseq.ops.lstm.lstm_layer`) on the module's
  weights and zero states: what the module adds (the zero state, the bias sum, the layer loop)
  is the difference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import fastseq
from fastseq.bench import Case
from fastseq.ops.lstm import lstm_layer
from fastseq.reference import rotary as rotary_reference

SUITE = "dispatch"

# The README's results table: these cases, against the plain-PyTorch and torch baselines.
HEADLINES = ("rotary decode B8 H8 D64", "attention 1 query x 64 keys B2 H4 D64", "lstm T1 B1 H32")
HEADLINE_BASELINES = ("reference", "sdpa", "torch")
# The host-side path of every op family.
SOURCES = ("fastseq/ops/*.py", "fastseq/nn/*.py", "csrc/ops.cpp")


def _case(name, params, dtype, variants):
    return Case(suite=SUITE, name=name, params=params, dtype=dtype, variants=variants)


def _rotary(device, dtype):
    batch, heads, dim = 8, 8, 64
    q = torch.randn(batch, 1, heads, dim, device=device, dtype=dtype)
    k = torch.randn(batch, 1, heads, dim, device=device, dtype=dtype)
    cos, sin = (torch.randn(256, dim // 2, device=device) for _ in range(2))
    positions = torch.randint(0, 200, (batch,), device=device)
    return _case("rotary decode B8 H8 D64", {"op": "rotary"}, dtype, {
        "fastseq": lambda: fastseq.apply_rotary(q, k, cos, sin, positions=positions),
        "fastseq_int_offset": lambda: fastseq.apply_rotary(q, k, cos, sin, positions=7),
        "reference": lambda: rotary_reference.apply_rotary(q, k, cos, sin, positions=positions),
        "one_launch": lambda: q + 1,
    })


def _attention(device, dtype):
    q = torch.randn(2, 4, 1, 64, device=device, dtype=dtype)
    k, v = (torch.randn(2, 4, 64, 64, device=device, dtype=dtype) for _ in range(2))
    key_lengths = torch.tensor([64, 40], device=device)
    return _case("attention 1 query x 64 keys B2 H4 D64", {"op": "attention"}, dtype, {
        "fastseq": lambda: fastseq.attention(q, k, v),
        "fastseq_key_lengths": lambda: fastseq.attention(q, k, v, key_lengths=key_lengths),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
        "one_launch": lambda: q + 1,
    })


def _cross_attention(device, dtype):
    q = torch.randn(1, 2, 64, 40, device=device, dtype=dtype)
    k, v = (torch.randn(1, 2, 77, 40, device=device, dtype=dtype) for _ in range(2))
    return _case("cross_attention 64 x 77 tokens H2 D40", {"op": "cross_attention"}, dtype, {
        "fastseq": lambda: fastseq.cross_attention(q, k, v),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
        "one_launch": lambda: q + 1,
    })


def _lstm(device, dtype, steps):
    theirs = torch.nn.LSTM(32, 32).to(device, dtype)
    ours = fastseq.nn.LSTM(32, 32).to(device, dtype)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(steps, 1, 32, device=device, dtype=dtype)
    state = torch.zeros(1, 32, device=device, dtype=dtype)
    with torch.no_grad():
        layer_args = (x, state, state, ours.weight_ih_l0, ours.weight_hh_l0,
                      ours.bias_ih_l0 + ours.bias_hh_l0)
    return _case(f"lstm T{steps} B1 H32", {"op": "lstm", "steps": steps}, dtype, {
        "fastseq": torch.no_grad()(lambda: ours(x)),
        "fastseq_layer": torch.no_grad()(lambda: lstm_layer(*layer_args)),
        "torch": torch.no_grad()(lambda: theirs(x)),
        "one_launch": lambda: x + 1,
    })


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    """One tiny case per op (LSTM at 1 and 16 steps), in the device's usual dtype."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    return [_rotary(device, dtype), _attention(device, dtype), _cross_attention(device, dtype),
            _lstm(device, dtype, 1), _lstm(device, dtype, 16)]
