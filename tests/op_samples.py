"""Sample inputs for every public op, good and bad, in the manner of PyTorch's OpInfo.

Each :class:`OpInfo` names the op's public function, a plain-PyTorch reference with the same
signature, the dtypes and backends it takes, which arguments are differentiable, sample inputs
(shapes with ragged sizes, edges: length 1, empty batch, fully masked rows, NaN in padding) and
bad inputs with the argument their error must name. ``tests/test_op_samples.py`` runs every
sample on every backend against the reference, ``torch.library.opcheck`` on every registered op
a sample reaches, and every bad input.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

import fastseq
from fastseq.ops.layer_norm_lstm import layer_norm_lstm_layer
from fastseq.ops.linear import linear
from fastseq.ops.lstm import lstm_layer
from fastseq.ops.negative_sampling import negative_sampling_loss
from fastseq.ops.rnn import rnn_layer
from fastseq.reference import attention as attention_reference
from fastseq.reference import lstm as lstm_reference
from fastseq.reference import negative_sampling as negative_sampling_reference
from fastseq.reference import rnn as rnn_reference
from fastseq.reference import rotary as rotary_reference

Make = Callable[[torch.dtype], tuple[tuple, dict]]


@dataclasses.dataclass(frozen=True)
class Sample:
    """Inputs ``make(dtype) -> (args, kwargs)`` of the public function."""

    name: str
    make: Make


@dataclasses.dataclass(frozen=True)
class BadSample:
    """Inputs that must raise ``ValueError`` whose message matches ``match`` (the argument)."""

    name: str
    make: Callable[[], tuple[tuple, dict]]
    match: str


@dataclasses.dataclass(frozen=True)
class OpInfo:
    """One public op: its function, its reference, and its samples."""

    name: str
    function: Callable
    reference: Callable
    dtypes: tuple[torch.dtype, ...]
    backends: tuple[str, ...]
    differentiable: tuple[int, ...]  # positional arguments that take gradients
    samples: tuple[Sample, ...]
    bad: tuple[BadSample, ...] = ()


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def nan_past(t, lengths, dim=2):
    """``t`` with NaN at every position at or past ``lengths[b]`` along ``dim``: padding that
    must never be read."""
    t = t.clone()
    for b, n in enumerate(lengths):
        n = min(n, t.shape[dim])
        t[b].narrow(dim - 1, n, t.shape[dim] - n).fill_(float("nan"))
    return t


# ------------------------------------------------------------------------------------------------
# attention


def _attention_reference(q, k, v, *, causal=False, causal_alignment="top_left", attn_mask=None,
                         key_lengths=None, scale=None):
    return attention_reference.attention(
        q, k, v, causal=causal, bottom_right=causal_alignment == "bottom_right",
        attn_mask=attn_mask, key_lengths=key_lengths, scale=scale)[0]


def _qkv(dtype, b, h, hk, lq, lk, d):
    return randn(b, h, lq, d, dtype=dtype), randn(b, hk, lk, d, dtype=dtype), randn(b, hk, lk, d, dtype=dtype)


def _padded_qkv(dtype):
    q, k, v = _qkv(dtype, 2, 4, 2, 7, 11, 12)
    lengths = [9, 4]
    return ((q, nan_past(k, lengths), nan_past(v, lengths)),
            dict(key_lengths=torch.tensor(lengths), causal=True, causal_alignment="bottom_right"))


def _masked_rows(dtype):
    q, k, v = _qkv(dtype, 1, 2, 2, 5, 6, 8)
    mask = torch.ones(5, 6, dtype=torch.bool)
    mask[2] = False  # a query row that sees no key
    return (q, k, v), dict(attn_mask=mask)


ATTENTION = OpInfo(
    "attention", fastseq.attention, _attention_reference,
    dtypes=(torch.float32, torch.bfloat16, torch.float64),
    backends=("reference", "cpu", "triton"), differentiable=(0, 1, 2),
    samples=(
        Sample("ragged gqa", lambda dt: (_qkv(dt, 2, 4, 2, 13, 9, 20), {})),
        # head dim <= 8: the CPU backend's own kernel (keys off its 16 lanes)
        Sample("small head", lambda dt: (_qkv(dt, 2, 4, 2, 13, 37, 5), {})),
        Sample("causal", lambda dt: (_qkv(dt, 1, 3, 3, 9, 9, 16), dict(causal=True))),
        Sample("bottom right", lambda dt: (_qkv(dt, 2, 2, 1, 3, 10, 8),
                                           dict(causal=True, causal_alignment="bottom_right"))),
        Sample("nan padding", _padded_qkv),
        Sample("fully masked row", _masked_rows),
        Sample("additive mask", lambda dt: (_qkv(dt, 1, 2, 2, 4, 6, 8),
                                            dict(attn_mask=randn(4, 6, dtype=dt)))),
        Sample("length 1", lambda dt: (_qkv(dt, 2, 2, 2, 1, 1, 8), dict(causal=True))),
        Sample("empty batch", lambda dt: (_qkv(dt, 0, 2, 2, 3, 3, 8), {})),
        Sample("strided", lambda dt: (tuple(t.transpose(1, 2).contiguous().transpose(1, 2)
                                            for t in _qkv(dt, 2, 2, 2, 5, 5, 8)), {})),
    ),
    bad=(
        BadSample("q rank", lambda: ((randn(2, 3, 8), randn(2, 1, 3, 8), randn(2, 1, 3, 8)), {}),
                  "q must be a 4-D tensor"),
        BadSample("heads", lambda: (_qkv(torch.float32, 1, 3, 2, 4, 4, 8), {}), "q heads"),
        BadSample("key lengths", lambda: (_qkv(torch.float32, 2, 2, 2, 4, 4, 8),
                                          dict(key_lengths=torch.tensor([1, 5]))), "key_lengths"),
        BadSample("mask shape", lambda: (_qkv(torch.float32, 1, 2, 2, 4, 4, 8),
                                         dict(attn_mask=torch.ones(3, 4, dtype=torch.bool))),
                  "attn_mask"),
        BadSample("dropout", lambda: (_qkv(torch.float32, 1, 2, 2, 4, 4, 8), dict(dropout_p=1.0)),
                  "dropout_p"),
    ),
)


# ------------------------------------------------------------------------------------------------
# attention_decode


def _decode_reference(q, k_cache, v_cache, cache_lengths, *, scale=None):
    return attention_reference.attention(q, k_cache, v_cache, causal=True, bottom_right=True,
                                         key_lengths=cache_lengths, scale=scale)[0]


def _decode(dtype, rows, lengths, size=12):
    q, k, v = _qkv(dtype, len(lengths), 4, 2, rows, size, 16)
    return (q, nan_past(k, lengths), nan_past(v, lengths), torch.tensor(lengths, dtype=torch.long)), {}


ATTENTION_DECODE = OpInfo(
    "attention_decode", fastseq.attention_decode, _decode_reference,
    dtypes=(torch.float32, torch.bfloat16, torch.float64),
    backends=("reference", "cpu", "triton"), differentiable=(),
    samples=(
        Sample("one row, ragged cache", lambda dt: _decode(dt, 1, [12, 5, 1])),
        Sample("speculative rows", lambda dt: _decode(dt, 3, [7, 3])),
        Sample("full caches", lambda dt: _decode(dt, 1, [12, 12])),
        Sample("empty batch", lambda dt: _decode(dt, 1, [])),
    ),
    bad=(
        BadSample("cache lengths", lambda: _decode(torch.float32, 1, [13, 2]), "cache_lengths"),
        BadSample("cache lengths dtype", lambda: ((*_decode(torch.float32, 1, [3, 2])[0][:3],
                                                   torch.tensor([3.0, 2.0])), {}), "cache_lengths"),
    ),
)


# ------------------------------------------------------------------------------------------------
# cross_attention


def _cross_reference(q, k, v, *, context_lengths=None, residual=None, scale=None):
    out = attention_reference.attention(q, k, v, key_lengths=context_lengths, scale=scale)[0]
    return out if residual is None else out + residual


def _cross(dtype, lengths=None, residual=False):
    batch = 2 if lengths is None else len(lengths)
    q, k, v = _qkv(dtype, batch, 2, 2, 19, 7, 8)
    kwargs = {}
    if lengths is not None:
        k, v = nan_past(k, lengths), nan_past(v, lengths)
        kwargs["context_lengths"] = torch.tensor(lengths)
    if residual:
        kwargs["residual"] = randn(*q.shape, dtype=dtype)
    return (q, k, v), kwargs


CROSS_ATTENTION = OpInfo(
    "cross_attention", fastseq.cross_attention, _cross_reference,
    dtypes=(torch.float32, torch.bfloat16, torch.float64),
    backends=("reference", "cpu", "triton"), differentiable=(0, 1, 2),
    samples=(
        Sample("plain", lambda dt: _cross(dt)),
        Sample("nan padding", lambda dt: _cross(dt, [7, 3])),
        Sample("residual", lambda dt: _cross(dt, residual=True)),
        Sample("empty context row", lambda dt: _cross(dt, [0, 7])),
    ),
    bad=(
        BadSample("heads", lambda: ((randn(1, 2, 4, 8), randn(1, 1, 3, 8), randn(1, 1, 3, 8)), {}),
                  "cross_attention: q has 2 heads"),
        BadSample("residual", lambda: (_qkv(torch.float32, 1, 2, 2, 4, 3, 8),
                                       dict(residual=randn(1, 2, 4, 4))), "residual"),
    ),
)


# ------------------------------------------------------------------------------------------------
# rotary


def _tables(length, pairs, dtype=torch.float32):
    angles = torch.outer(torch.arange(length, dtype=torch.float64), torch.rand(pairs, dtype=torch.float64))
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotary(dtype, shape=(2, 7, 3, 16), pairs=8, k_heads=None, **kwargs):
    q = randn(*shape, dtype=dtype)
    k = None if k_heads == 0 else randn(*shape[:2], k_heads or shape[2], shape[3], dtype=dtype)
    return (q, k, *_tables(24, pairs)), kwargs


ROTARY = OpInfo(
    "rotary", lambda *a, **kw: fastseq.apply_rotary(*a, **kw), rotary_reference.apply_rotary,
    dtypes=(torch.float32, torch.bfloat16, torch.float64),
    backends=("reference", "cpu", "triton"), differentiable=(0, 1),
    samples=(
        Sample("gqa partial", lambda dt: _rotary(dt, pairs=5, k_heads=1)),
        Sample("interleaved", lambda dt: _rotary(dt, interleaved=True)),
        Sample("offsets", lambda dt: _rotary(dt, positions=torch.tensor([3, 17]))),
        Sample("position ids", lambda dt: _rotary(dt, positions=torch.randint(0, 24, (2, 7)))),
        Sample("bhnd", lambda dt: _rotary(dt, shape=(2, 3, 7, 16), layout="bhnd")),
        Sample("length 1", lambda dt: _rotary(dt, shape=(1, 1, 2, 8), pairs=4)),
        Sample("empty batch", lambda dt: _rotary(dt, shape=(0, 7, 3, 16))),
    ),
    bad=(
        BadSample("positions past the table", lambda: _rotary(torch.float32,
                                                              positions=torch.tensor([0, 20])),
                  "per-batch offsets span"),
        BadSample("layout", lambda: _rotary(torch.float32, layout="nbhd"), "layout"),
        BadSample("rotary dim", lambda: _rotary(torch.float32, pairs=9), "rotary"),
    ),
)


# ------------------------------------------------------------------------------------------------
# lstm_layer and layer_norm_lstm_layer


def _lstm(dtype, steps=6, batch=3, inputs=5, hidden=7, proj=0, lengths=None, reverse=False):
    out = proj or hidden
    args = (randn(steps, batch, inputs, dtype=dtype), randn(batch, out, dtype=dtype),
            randn(batch, hidden, dtype=dtype), randn(4 * hidden, inputs, dtype=dtype) / 3,
            randn(4 * hidden, out, dtype=dtype) / 3, randn(4 * hidden, dtype=dtype) / 3,
            randn(proj, hidden, dtype=dtype) / 3 if proj else None)
    kwargs = dict(reverse=reverse)
    if lengths is not None:
        kwargs["lengths"] = torch.tensor(lengths)
    return args, kwargs


LSTM_LAYER = OpInfo(
    "lstm_layer", lstm_layer, lstm_reference.lstm_layer,
    dtypes=(torch.float32, torch.bfloat16, torch.float64),
    backends=("reference", "cpu", "triton"), differentiable=(0, 1, 2, 3, 4, 5),
    samples=(
        Sample("ragged lengths", lambda dt: _lstm(dt, lengths=[6, 2, 0])),
        Sample("reverse", lambda dt: _lstm(dt, reverse=True, lengths=[3, 6, 1])),
        Sample("projection", lambda dt: _lstm(dt, proj=4)),
        Sample("one step", lambda dt: _lstm(dt, steps=1)),
        Sample("empty batch", lambda dt: _lstm(dt, batch=0)),
    ),
    bad=(
        BadSample("weights of another dtype", lambda: ((*_lstm(torch.float32)[0][:4],
                                                        randn(28, 7, dtype=torch.float64)), {}),
                  "w_hh must be torch.float32"),
        BadSample("lengths", lambda: _lstm(torch.float32, lengths=[7, 1, 1]), "lengths must lie"),
    ),
)


def _replaced(args, index, value):
    return (*args[:index], value, *args[index + 1:])


def _layer_norm_lstm(dtype, steps=6, batch=3, inputs=5, hidden=7, lengths=None, reverse=False):
    args, kwargs = _lstm(dtype, steps, batch, inputs, hidden, lengths=lengths, reverse=reverse)
    norms = (1 + randn(4 * hidden, dtype=dtype) / 4, 1 + randn(4 * hidden, dtype=dtype) / 4,
             1 + randn(hidden, dtype=dtype) / 4, randn(hidden, dtype=dtype) / 4)
    return (*args[:6], *norms), kwargs


LAYER_NORM_LSTM_LAYER = OpInfo(
    "layer_norm_lstm_layer", layer_norm_lstm_layer, lstm_reference.layer_norm_lstm_layer,
    dtypes=(torch.float32, torch.bfloat16, torch.float64),
    backends=("reference", "cpu", "triton"), differentiable=(0, 1, 2, 3, 4, 5, 6, 7, 8, 9),
    samples=(
        Sample("ragged lengths", lambda dt: _layer_norm_lstm(dt, lengths=[6, 2, 0])),
        Sample("reverse", lambda dt: _layer_norm_lstm(dt, reverse=True, lengths=[3, 6, 1])),
        Sample("one step", lambda dt: _layer_norm_lstm(dt, steps=1)),
        Sample("empty batch", lambda dt: _layer_norm_lstm(dt, batch=0)),
    ),
    bad=(
        BadSample("gains", lambda: (_replaced(_layer_norm_lstm(torch.float32)[0], 6, randn(3)),
                                    {}), "ln_ih must have shape"),
    ),
)


# ------------------------------------------------------------------------------------------------
# rnn_layer


def _rnn(dtype, steps=6, batch=3, inputs=5, hidden=7, lengths=None, reverse=False, nonlinearity="tanh"):
    args = (randn(steps, batch, inputs, dtype=dtype), randn(batch, hidden, dtype=dtype),
            randn(hidden, inputs, dtype=dtype) / 3, randn(hidden, hidden, dtype=dtype) / 3,
            randn(hidden, dtype=dtype) / 3)
    kwargs = dict(reverse=reverse, nonlinearity=nonlinearity)
    if lengths is not None:
        kwargs["lengths"] = torch.tensor(lengths)
    return args, kwargs


RNN_LAYER = OpInfo(
    "rnn_layer", rnn_layer, rnn_reference.rnn_layer,
    dtypes=(torch.float32, torch.bfloat16, torch.float64),
    backends=("reference", "cpu", "triton"), differentiable=(0, 1, 2, 3, 4),
    samples=(
        Sample("ragged lengths", lambda dt: _rnn(dt, lengths=[6, 2, 0])),
        Sample("reverse", lambda dt: _rnn(dt, reverse=True, lengths=[3, 6, 1])),
        Sample("relu", lambda dt: _rnn(dt, nonlinearity="relu")),
        Sample("one step", lambda dt: _rnn(dt, steps=1)),
        Sample("empty batch", lambda dt: _rnn(dt, batch=0)),
    ),
    bad=(
        BadSample("recurrent weights", lambda: (_replaced(_rnn(torch.float32)[0], 3, randn(7, 6)), {}),
                  "w_hh must have shape"),
        BadSample("lengths", lambda: _rnn(torch.float32, lengths=[7, 1, 1]), "lengths must lie"),
    ),
)


# ------------------------------------------------------------------------------------------------
# negative_sampling_loss


def _negative_sampling_reference(in_weight, out_weight, inputs, targets, *, sparse, reduction):
    return negative_sampling_reference.negative_sampling_loss(in_weight, out_weight, inputs, targets,
                                                              sparse)


def _negative_sampling(dtype, batch=5, words=1, count=4, vocab=11, dim=19):
    """Per-example losses with dense gradients; ids repeat within and across examples."""
    generator = torch.Generator().manual_seed(0)
    args = (randn(vocab, dim, dtype=dtype) / 3, randn(vocab, dim, dtype=dtype) / 3,
            torch.randint(0, vocab, (batch, words), generator=generator),
            torch.randint(0, vocab, (batch, count), generator=generator))
    return args, dict(sparse=False, reduction="none")


NEGATIVE_SAMPLING = OpInfo(
    "negative_sampling_loss", negative_sampling_loss, _negative_sampling_reference,
    dtypes=(torch.float32, torch.float64), backends=("reference", "cpu"), differentiable=(0, 1),
    samples=(
        Sample("skip-gram", lambda dt: _negative_sampling(dt)),
        Sample("cbow", lambda dt: _negative_sampling(dt, words=4)),
        Sample("one target", lambda dt: _negative_sampling(dt, count=1)),
        Sample("empty batch", lambda dt: _negative_sampling(dt, batch=0)),
    ),
    bad=(
        BadSample("targets out of range", lambda: (_replaced(_negative_sampling(torch.float32)[0], 3,
                                                             torch.tensor([[0, 11]] * 5)), {}),
                  r"targets must lie in \[0, 11\)"),
    ),
)


# ------------------------------------------------------------------------------------------------
# linear (the few-row inference op)


def _linear(dtype, rows=(1,), features=7, outputs=5, bias=True):
    return (randn(*rows, features, dtype=dtype), randn(outputs, features, dtype=dtype),
            randn(outputs, dtype=dtype) if bias else None), {}


LINEAR = OpInfo(
    "linear", linear, torch.nn.functional.linear,
    dtypes=(torch.float32, torch.bfloat16, torch.float64),
    backends=("reference", "cpu"), differentiable=(),
    samples=(
        Sample("one row", lambda dt: _linear(dt)),
        Sample("few rows, ragged widths", lambda dt: _linear(dt, rows=(3, 2), features=33, outputs=65)),
        Sample("no bias", lambda dt: _linear(dt, rows=(16,), bias=False)),
        Sample("empty batch", lambda dt: _linear(dt, rows=(0,))),
    ),
    bad=(
        BadSample("widths", lambda: ((randn(2, 6), randn(5, 7)), {}), "must agree on K"),
        BadSample("bias", lambda: ((randn(2, 7), randn(5, 7), randn(4)), {}), r"bias must be \(5,\)"),
    ),
)


OPS = (ATTENTION, ATTENTION_DECODE, CROSS_ATTENTION, ROTARY, LSTM_LAYER, LAYER_NORM_LSTM_LAYER,
       RNN_LAYER, NEGATIVE_SAMPLING, LINEAR)
