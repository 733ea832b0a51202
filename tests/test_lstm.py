"""LSTM: fastseq.nn.LSTM / LSTMCell against torch.nn.LSTM / LSTMCell holding the same weights."""

import warnings

import pytest
import torch
from tolerance import assert_within_rule
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastseq
from fastseq import _backend, _extension  # noqa: E402
from fastseq.kernels import lstm as lstm_kernels
from fastseq.reference import lstm as ref

INTERPRETED = _backend.triton_interpreted()

_CPP_LSTM = _extension.load() is not None and hasattr(torch.ops.fastseq, "lstm_layer_forward")
BACKENDS = [b for b in ("cpu", "triton", "reference")
            if b in fastseq.available_backends("cpu") and (b != "cpu" or _CPP_LSTM)]
CONFIGS = {
    "one_layer": dict(),
    "two_layers_bidirectional": dict(num_layers=2, bidirectional=True),
    "projection": dict(proj_size=3),
    "three_layers_batch_first": dict(num_layers=3, batch_first=True),
    "no_bias_bidirectional_projection": dict(bias=False, bidirectional=True, proj_size=4),
}


def _pair(dtype=torch.float64, input_size=5, hidden=6, **kwargs):
    torch_lstm = torch.nn.LSTM(input_size, hidden, **kwargs).to(dtype)
    ours = fastseq.nn.LSTM(input_size, hidden, **kwargs).to(dtype)
    ours.load_state_dict(torch_lstm.state_dict())
    return torch_lstm, ours


def _run(module, x, hx, backend=None, leaf=None):
    """Outputs and gradients of a scalar loss touching every output."""
    params = list(module.parameters())
    leaves = [x if leaf is None else leaf] + ([*hx] if hx is not None else [])
    with fastseq.use_backend(backend):
        y, (h, c) = module(x, hx)
    data = y.data if hasattr(y, "batch_sizes") else y
    loss = (data * torch.linspace(-1, 1, data.shape[-1], dtype=data.dtype)).sum() + h.square().sum() + c.sum()
    grads = torch.autograd.grad(loss, leaves + params)
    return (data, h, c), grads


def _compare(ours, theirs, low=None, factor=2.0):
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        if low is None:
            torch.testing.assert_close(a, b.to(a.dtype), atol=1e-9, rtol=1e-7, msg=f"tensor {i}")
        else:
            assert_within_rule(a, b, low[i], f"tensor {i}", factor=factor)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("with_state", [False, True])
def test_matches_torch_lstm_float64(backend, config, with_state):
    torch_lstm, ours = _pair(**CONFIGS[config])
    directions = 2 if torch_lstm.bidirectional else 1
    layers = torch_lstm.num_layers * directions
    batch_first = torch_lstm.batch_first
    x = torch.randn((3, 7, 5) if batch_first else (7, 3, 5), dtype=torch.float64,
                    requires_grad=True)
    hx = None
    if with_state:
        hx = (torch.randn(layers, 3, torch_lstm.proj_size or 6, dtype=torch.float64, requires_grad=True),
              torch.randn(layers, 3, 6, dtype=torch.float64, requires_grad=True))
    if backend != "reference":
        warnings.simplefilter("ignore")  # float64 takes the reference path of a kernel backend
    got_out, got_grads = _run(ours, x, hx, backend)
    want_out, want_grads = _run(torch_lstm, x, hx)
    _compare(got_out, want_out)
    _compare(got_grads, want_grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config", ["two_layers_bidirectional", "projection"])
def test_low_precision_within_tolerance_rule(backend, dtype, config):
    kwargs = CONFIGS[config]
    truth_lstm, ours = _pair(input_size=13, hidden=19, **kwargs)
    low_lstm, _ = _pair(input_size=13, hidden=19, **kwargs)
    low_lstm.load_state_dict(truth_lstm.state_dict())
    ours.to(dtype), low_lstm.to(dtype)
    x64 = torch.randn(9, 4, 13, dtype=torch.float64, requires_grad=True)
    x = x64.detach().to(dtype).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no silent fallback
        got_out, got_grads = _run(ours, x, None, backend)
    truth_out, truth_grads = _run(truth_lstm, x64, None)
    low_out, low_grads = _run(low_lstm, x.detach().requires_grad_(), None)
    # The Triton interpreter rounds float32 -> bfloat16 by truncation (twice the error of
    # round-to-nearest), so interpreted bfloat16 kernels get twice the factor.
    scale = 2.0 if backend == "triton" and dtype == torch.bfloat16 and INTERPRETED else 1.0
    _compare(got_out, truth_out, low_out, factor=2.0 * scale)
    _compare(got_grads[:1], truth_grads[:1], low_grads[:1], factor=2.0 * scale)
    for g, t, lo in zip(got_grads[1:], truth_grads[1:], low_grads[1:], strict=True):
        # weight gradients sum over every step: summation order alone moves them
        assert_within_rule(g, t, lo, "weight grad", factor=3.0 * scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_packed_sequence_in_and_out(backend, bidirectional, enforce_sorted):
    torch_lstm, ours = _pair(num_layers=2, bidirectional=bidirectional)
    lengths = torch.tensor([7, 5, 5, 1]) if enforce_sorted else torch.tensor([3, 7, 1, 6])
    x = torch.randn(7, 4, 5, dtype=torch.float64, requires_grad=True)

    def packed():
        return pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got_out, got_grads = _run(ours, packed(), None, backend, leaf=x)
    want_out, want_grads = _run(torch_lstm, packed(), None, leaf=x)
    _compare(got_out, want_out)
    _compare(got_grads, want_grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lengths_argument_equals_packed_run(backend):
    torch_lstm, ours = _pair(bidirectional=True, batch_first=True)
    lengths = torch.tensor([4, 7, 0, 2])
    x = torch.randn(4, 7, 5, dtype=torch.float64)
    with fastseq.use_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y, (h, c) = ours(x, lengths=lengths)
    nonempty = lengths > 0
    packed = pack_padded_sequence(x[nonempty], lengths[nonempty], batch_first=True,
                                  enforce_sorted=False)
    want, (want_h, want_c) = torch_lstm(packed)
    want, _ = pad_packed_sequence(want, batch_first=True, total_length=7)
    torch.testing.assert_close(y[nonempty], want)
    torch.testing.assert_close(h[:, nonempty], want_h)
    assert torch.equal(y[2], torch.zeros_like(y[2])), "a sequence of length 0 outputs zeros"
    torch.testing.assert_close(c[:, 2], torch.zeros_like(c[:, 2]))


def test_unbatched_input_and_lstm_cell():
    torch_lstm, ours = _pair()
    x = torch.randn(6, 5, dtype=torch.float64)
    y, (h, c) = ours(x)
    want, (want_h, want_c) = torch_lstm(x)
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(h, want_h)

    cell = torch.nn.LSTMCell(5, 6).double()
    our_cell = fastseq.nn.LSTMCell(5, 6).double()
    our_cell.load_state_dict(cell.state_dict())
    inp = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    hx = (torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64))
    got = our_cell(inp, hx)
    want = cell(inp, hx)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    (g_in,) = torch.autograd.grad(sum(t.sum() for t in got), inp)
    (w_in,) = torch.autograd.grad(sum(t.sum() for t in want), inp)
    torch.testing.assert_close(g_in, w_in)
    torch.testing.assert_close(our_cell(inp[0])[0], cell(inp[0])[0])


def test_state_dict_loads_both_ways_and_flatten_parameters():
    ours = fastseq.nn.LSTM(4, 8, num_layers=2, bidirectional=True, proj_size=3)
    theirs = torch.nn.LSTM(4, 8, num_layers=2, bidirectional=True, proj_size=3)
    theirs.load_state_dict(ours.state_dict())
    ours.load_state_dict(theirs.state_dict())
    ours.flatten_parameters()


def test_dropout_between_layers_is_reproducible_under_a_seed():
    lstm = fastseq.nn.LSTM(5, 6, num_layers=3, dropout=0.5).train()
    x = torch.randn(4, 2, 5)
    torch.manual_seed(3)
    first, _ = lstm(x)
    torch.manual_seed(3)
    again, _ = lstm(x)
    torch.manual_seed(4)
    other, _ = lstm(x)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_triton_cell_kernels_match_reference():
    if "triton" not in fastseq.available_backends("cpu"):
        pytest.skip("Triton interpreter not active")
    pre, c_prev = torch.randn(5, 4 * 37) * 3, torch.randn(5, 37)
    gates, c, m = torch.empty_like(pre), torch.empty_like(c_prev), torch.empty_like(c_prev)
    lstm_kernels.cell_forward(pre, c_prev, gates, c, m)
    want = ref.cell_forward(pre, c_prev)
    for g, w in zip((gates, c, m), want, strict=True):
        torch.testing.assert_close(g, w)
    dm, dc = torch.randn(5, 37), torch.randn(5, 37)
    dpre, dc_prev = torch.empty_like(pre), torch.empty_like(c)
    lstm_kernels.cell_backward(dm, dc, gates, c_prev, c, dpre, dc_prev)
    want = ref.cell_backward(dm, dc, *ref.cell_forward(pre, c_prev)[:1], c_prev, c)
    torch.testing.assert_close(dpre, want[0])
    torch.testing.assert_close(dc_prev, want[1])


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m: m(torch.randn(4, 2, 7)), "expected input_size=5"),
        (lambda m: m(torch.randn(4, 2, 5), (torch.zeros(1, 3, 6), torch.zeros(1, 2, 6))),
         "h0 must have shape"),
        (lambda m: m(torch.randn(4, 2, 5), (torch.zeros(1, 2, 6), torch.zeros(1, 2, 6).double())),
         "c0 is"),
        (lambda m: m(torch.randn(4, 2, 5), lengths=torch.tensor([5, 1])), r"lengths must lie in \[0, 4\]"),
        (lambda m: m(torch.randn(4, 2, 5), lengths=torch.tensor([1])), "lengths must be 2 integers"),
        (lambda m: m(torch.randn(2, 4, 2, 5)), "2-D"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call(fastseq.nn.LSTM(5, 6))


def test_compile_fullgraph():
    lstm = fastseq.nn.LSTM(5, 6, num_layers=2)
    compiled = torch.compile(lstm, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 2, 5, requires_grad=True)
    y, _ = compiled(x)
    y.sum().backward()
    torch.testing.assert_close(y, lstm(x)[0])
