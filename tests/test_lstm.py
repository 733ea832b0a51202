"""LSTM: fastseq.nn.LSTM / LSTMCell against torch.nn.LSTM / LSTMCell holding the same weights."""

import itertools
import os
import subprocess
import sys
import warnings

import pytest
import torch
from tolerance import assert_within_rule
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastseq
from fastseq import _backend, _extension  # noqa: E402
from fastseq.kernels import lstm as lstm_kernels
from fastseq.ops import lstm as lstm_ops
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
    weights = torch.linspace(-1, 1, data.shape[-1], dtype=data.dtype, device=data.device)
    loss = (data * weights).sum() + h.square().sum() + c.sum()
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
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
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
@pytest.mark.parametrize("used", ["y", "h_n", "c_n"])
def test_gradients_when_only_one_output_is_used(backend, used):
    """The outputs a loss does not touch get no gradient (None, not zeros, reaches the op's
    backward): the result must equal torch's, whose unused outputs count as zero."""
    torch_lstm, ours = _pair(torch.float32, input_size=5, hidden=6, num_layers=2)
    x = torch.randn(7, 3, 5, requires_grad=True)
    grads = []
    for module, name in ((ours, backend), (torch_lstm, None)):
        with fastseq.use_backend(name):
            y, (h, c) = module(x)
        out = {"y": y, "h_n": h, "c_n": c}[used]
        grads.append(torch.autograd.grad(out.square().sum(), [x, *module.parameters()]))
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("frozen", ["input", "weights"])
def test_gradients_of_a_frozen_input_or_frozen_weights(backend, frozen):
    """An input without requires_grad (data) or frozen weights: the backward leaves their GEMMs
    out, and what remains equals torch's."""
    torch_lstm, ours = _pair(torch.float32, input_size=5, hidden=6, num_layers=2,
                             bidirectional=True, proj_size=4)
    x = torch.randn(7, 3, 5, requires_grad=frozen == "weights")
    h0 = torch.randn(4, 3, 4, requires_grad=True)
    c0 = torch.randn(4, 3, 6)
    grads = []
    for module, name in ((ours, backend), (torch_lstm, None)):
        module.requires_grad_(frozen != "weights")
        wanted = [x if frozen == "weights" else module.weight_hh_l0, h0]
        with fastseq.use_backend(name):
            y, (h, c) = module(x, (h0, c0))
        grads.append(torch.autograd.grad(y.square().sum() + c.sum(), wanted))
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not _CPP_LSTM, reason="extension built without its CPU kernels")
@pytest.mark.parametrize("wanted", [w for w in itertools.product([False, True], repeat=3)
                                    if not all(w)],
                         ids=lambda w: "+".join(n for n, on in zip(("x", "weights", "state"), w,
                                                                   strict=True) if on) or "none")
@pytest.mark.parametrize("steps, batch, proj", [(5, 3, 4), (5, 3, 0), (1, 8, 0), (1, 1, 0)],
                         ids=["projection", "packed", "one_step_packed", "one_row"])
def test_cpp_backward_computes_only_the_gradients_asked_for(wanted, steps, batch, proj):
    """The C++ backward returns None for grad_x / the weight gradients / the initial state's
    gradients it was told to leave out; the rest is what the full call gives, bit for bit."""
    inputs, hidden = 7, 9
    out = proj or hidden
    x = torch.randn(steps, batch, inputs)
    h0, c0 = torch.randn(batch, out), torch.randn(batch, hidden)
    w_ih, w_hh = torch.randn(4 * hidden, inputs), torch.randn(4 * hidden, out)
    bias, w_hr = torch.randn(4 * hidden), torch.randn(proj, hidden) if proj else None
    y, _, _, gates, cells, pre_proj = torch.ops.fastseq.lstm_layer_forward(
        x, h0, c0, w_ih, w_hh, bias, w_hr, None, False, True)
    upstream = (torch.randn_like(y), torch.randn_like(h0), torch.randn_like(c0))
    args = (*upstream, x, h0, c0, w_ih, w_hh, w_hr, None, False, gates, cells, pre_proj, y, True)
    full = torch.ops.fastseq.lstm_layer_backward(*args, True, True, True)
    part = torch.ops.fastseq.lstm_layer_backward(*args, *wanted)
    with_x, weights, state = wanted
    needed = [with_x, state, state, weights, weights, weights, weights and bool(proj), True]
    for index, (a, b, need) in enumerate(zip(part, full, needed, strict=True)):
        if need:
            assert torch.equal(a, b), f"gradient {index}"
        else:
            assert a is None, f"gradient {index}"


@pytest.mark.skipif(not _CPP_LSTM, reason="extension built without its CPU kernels")
@pytest.mark.parametrize("steps, batch, inputs, hidden", [(24, 32, 16, 48), (2, 8, 256, 256),
                                                          (1, 2, 8, 8), (3, 3, 37, 21),
                                                          (1, 5, 70, 13), (1, 8, 128, 128),
                                                          (1, 2, 300, 300), (3, 1, 20, 19)],
                         ids=["onednn_transposed", "onednn_result_layout", "small", "small_ragged",
                              "small_one_step", "small_largest", "few_rows", "unpacked_steps"])
def test_cpp_layer_gemm_paths(steps, batch, inputs, hidden):
    """The whole-sequence GEMMs take the unpacked small-product kernels (csrc/cpu/linear.h: rows,
    columns and depth off every tile multiple, up to the largest product they take, and larger
    ones of two rows) or oneDNN by size, and the weight gradients one of three layouts; with
    fewer than 4 rows over the sequence the recurrent GEMMs accumulate on the unpacked kernels
    too: each way against the float64 truth, in float32."""
    _check_cpp_layer(torch.float32, steps, batch, input_size=inputs, hidden=hidden)


def _check_cpp_layer(dtype, steps, batch, **kwargs):
    """The C++ layer in ``dtype`` against the float64 truth, within the tolerance rule (weight
    gradients, sums over every step, with factor 3)."""
    truth_lstm, ours = _pair(**kwargs)
    low_lstm, _ = _pair(**kwargs)
    low_lstm.load_state_dict(truth_lstm.state_dict())
    ours.to(dtype), low_lstm.to(dtype)
    x64 = torch.randn(steps, batch, kwargs["input_size"], dtype=torch.float64, requires_grad=True)
    x = x64.detach().to(dtype).requires_grad_()
    got_out, got_grads = _run(ours, x, None, "cpu")
    truth_out, truth_grads = _run(truth_lstm, x64, None)
    low_out, low_grads = _run(low_lstm, x.detach().requires_grad_(), None)
    _compare(got_out, truth_out, low_out)
    _compare(got_grads[:1], truth_grads[:1], low_grads[:1])
    for g, t, lo in zip(got_grads[1:], truth_grads[1:], low_grads[1:], strict=True):
        assert_within_rule(g, t, lo, "weight grad", factor=3.0)


@pytest.mark.skipif(not _CPP_LSTM, reason="extension built without its CPU kernels")
@pytest.mark.parametrize("batch, hidden", [(13, 70), (1, 37), (7, 64), (3, 300), (3, 1100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpp_layer_on_ragged_panels(batch, hidden, dtype):
    """The C++ layer's recurrent GEMM works on 16-column panels, up to four at a time, over rows
    in blocks of 6, float32 weight rows in blocks of 1024 (AVX-512; 4096 for a lone panel in the
    backward) and bfloat16 ones in pairs (an odd hidden size leaves half a pair): sizes off every
    multiple, against the float64 truth."""
    _check_cpp_layer(dtype, 5, batch, input_size=11, hidden=hidden, bidirectional=True)


@pytest.mark.skipif(not _CPP_LSTM, reason="extension built without its CPU kernels")
@pytest.mark.parametrize("steps, batch, hidden", [(5, 13, 70), (5, 1, 37), (3, 1, 19)],
                         ids=["packed", "packed_one_row", "unpacked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpp_layer_with_lengths_on_ragged_panels(steps, batch, hidden, dtype):
    """As above with ``lengths=`` (an empty and a full sequence among them; a lone sequence one
    padding step short), against fastseq's plain-PyTorch reference: float64 the truth, the same in
    ``dtype`` the low-precision one. Under 4 rows over the sequence the recurrent GEMMs run
    unpacked, accumulating onto the carry that padding rows keep."""
    module = fastseq.nn.LSTM(11, hidden, bidirectional=True).double()
    lengths = torch.arange(batch) % (steps + 1)
    lengths[-1] = steps if batch > 1 else steps - 1
    x64 = torch.randn(steps, batch, 11, dtype=torch.float64)

    def run(backend, dtype):
        m = fastseq.nn.LSTM(11, hidden, bidirectional=True).to(dtype)
        m.load_state_dict(module.state_dict())
        x = x64.to(dtype).requires_grad_()
        with fastseq.use_backend(backend), warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # no silent fallback
            y, (h, c) = m(x, lengths=lengths)
        loss = (y * torch.linspace(-1, 1, y.shape[-1], dtype=dtype)).sum() + h.square().sum() + c.sum()
        return [y, h, c, *torch.autograd.grad(loss, [x, *m.parameters()])]

    got, truth, low = run("cpu", dtype), run("reference", torch.float64), run("reference", dtype)
    for i, (g, t, lo) in enumerate(zip(got, truth, low, strict=True)):
        assert_within_rule(g, t, lo, f"tensor {i}", factor=2.0 if i < 4 else 3.0)


@pytest.mark.skipif(not _CPP_LSTM, reason="extension built without its CPU kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("with_lengths", [False, True])
def test_inference_matches_training_forward(dtype, with_lengths):
    """Without grad the C++ layer keeps no per-step state and projects the input a chunk of steps
    at a time (about 4 MiB each: 600 steps of batch 8 and hidden 64 are several chunks)."""
    module = fastseq.nn.LSTM(5, 64, num_layers=2, bidirectional=True).to(dtype)
    x = torch.randn(600, 8, 5, dtype=dtype)
    lengths = torch.tensor([600, 1, 599, 300, 0, 17, 600, 450]) if with_lengths else None
    with fastseq.use_backend("cpu"), warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no silent fallback
        with torch.no_grad():
            inferred = module(x, lengths=lengths)
        trained = module(x.requires_grad_(), lengths=lengths)
    for got, want in zip(torch.utils._pytree.tree_leaves(inferred),
                         torch.utils._pytree.tree_leaves(trained), strict=True):
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not _CPP_LSTM, reason="extension built without its CPU kernels")
@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_cpp_layer_under_lower_cpu_capabilities(capability):
    """The AVX2 and portable paths, which an AVX-512 machine never takes by itself: ATen reads
    ATEN_CPU_CAPABILITY once per process, so the ragged-panel test runs in a child."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    here = os.path.dirname(os.path.abspath(__file__))
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "-k", "ragged_panels", f"{here}/test_lstm.py"],
        env=env, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-3000:]


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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_dropout_between_layers_matches_torch_under_the_same_seed(backend, bidirectional):
    """Dropout > 0 as torch.nn.LSTM applies it: the same mask and scale on the same layers'
    outputs (the same draws from the generator), so outputs and gradients agree under one seed."""
    torch_lstm, ours = _pair(torch.float32, num_layers=3, dropout=0.5, bidirectional=bidirectional)
    torch_lstm.train(), ours.train()
    x = torch.randn(4, 2, 5, requires_grad=True)
    torch.manual_seed(3)
    want_out, want_grads = _run(torch_lstm, x, None)
    torch.manual_seed(3)
    got_out, got_grads = _run(ours, x, None, backend)
    for a, b in zip(got_out + got_grads, want_out + want_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert (ours.dropout, torch_lstm.training) == (0.5, True)


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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sizes", [dict(input_size=1, hidden=6), dict(input_size=5, hidden=1),
                                   dict(input_size=5, hidden=6, proj_size=1)], ids=str)
def test_sizes_of_one_train(backend, sizes):
    """Gradient slices of width one are contiguous already; they must still come back as their
    own tensors (a custom op may not return aliases)."""
    torch_lstm, ours = _pair(dtype=torch.float32, **sizes)
    x = torch.randn(4, 3, sizes["input_size"], requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got_out, got_grads = _run(ours, x, None, backend)
    want_out, want_grads = _run(torch_lstm, x, None)
    for a, b in zip(got_out + got_grads, want_out + want_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(0, 3), (5, 0)], ids=["no_steps", "empty_batch"])
def test_empty_sequence_or_batch(backend, dtype, shape):
    steps, batch = shape
    ours = fastseq.nn.LSTM(4, 16, bidirectional=True).to(dtype)
    x = torch.randn(steps, batch, 4, dtype=dtype, requires_grad=True)
    h0 = torch.randn(2, batch, 16, dtype=dtype, requires_grad=True)
    c0 = torch.randn(2, batch, 16, dtype=dtype)
    with fastseq.use_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y, (h, c) = ours(x, (h0, c0))
    assert y.shape == (steps, batch, 32)
    if steps == 0:  # the state passes through untouched
        torch.testing.assert_close(h, h0.detach())
        torch.testing.assert_close(c, c0)
    (y.sum() + h.sum() + c.sum()).backward()
    assert x.grad.shape == x.shape and h0.grad.shape == h0.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("module", ["LSTM", "LayerNormLSTM"])
@pytest.mark.parametrize("steps", [0, 3])
def test_final_states_never_alias(backend, module, steps):
    """h_n and c_n of one layer and direction are views of the layer's outputs, not stacks: they
    share memory neither with each other (the default zero state is one tensor) nor with hx."""
    m = getattr(fastseq.nn, module)(4, 5)
    x = torch.randn(steps, 2, 4)
    hx = (torch.randn(1, 2, 5), torch.randn(1, 2, 5))
    with fastseq.use_backend(backend), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        for state in (None, hx):
            _, (h, c) = m(x, state)
            storages = {t.untyped_storage().data_ptr() for t in (h, c, *hx)}
            assert len(storages) == 4, f"state {'given' if state else 'default'}"


def test_strided_lengths():
    _, ours = _pair()
    x = torch.randn(6, 3, 5, dtype=torch.float64)
    strided = torch.tensor([6, 0, 3, 0, 2, 0])[::2]
    torch.testing.assert_close(ours(x, lengths=strided)[0], ours(x, lengths=strided.clone())[0])


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


def _layer_inputs(projection, seed=0):
    """One layer's (x, h0, c0, w_ih, w_hh, bias, w_hr) in float32, T=4 B=3 I=5 H=6 (P=4)."""
    g = torch.Generator().manual_seed(seed)
    hidden, out = 6, 4 if projection else 6
    shapes = [(4, 3, 5), (3, out), (3, hidden), (4 * hidden, 5), (4 * hidden, out), (4 * hidden,)]
    tensors = [torch.randn(*shape, generator=g) * 0.5 for shape in shapes]
    return [*tensors, torch.randn(out, hidden, generator=g) * 0.5 if projection else None]


def _eager_and_op_results(inputs, lengths, backend):
    """(y, h_n, c_n, every gradient) of one reversed layer with ``lengths``, run through the eager
    Function and through the registered op."""
    results = []
    for layer in (lstm_ops._EagerLayer.apply, torch.ops.fastseq.lstm_layer):
        leaves = [t if t is None else t.detach().requires_grad_() for t in inputs]
        y, h_n, c_n, *_ = layer(*leaves, lengths, True, True, backend)
        grads = torch.autograd.grad((y.sin().sum(), h_n.square().sum(), c_n.sum()),
                                    [t for t in leaves if t is not None])
        results.append((y, h_n, c_n, *grads))
    return results


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("projection", [False, True])
def test_eager_calls_equal_the_registered_op(backend, projection):
    """Eager calls run the op's autograd without the dispatcher (fastseq/ops/eager.py); the
    registered op, which torch.compile and torch.export trace, gives the same bits."""
    eager_results, op_results = _eager_and_op_results(_layer_inputs(projection),
                                                      torch.tensor([4, 1, 3]), backend)
    for got, want in zip(eager_results, op_results, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("module", ["LSTM", "LSTMCell"])
def test_double_backward_raises_instead_of_returning_zeros(backend, module):
    """The layer is differentiable once: a backward with create_graph=True goes through the
    gradient op, which refuses a second backward (its body would give silent zeros)."""
    m = getattr(fastseq.nn, module)(4, 3)
    x = torch.randn(5, 2, 4) if module == "LSTM" else torch.randn(2, 4)
    x.requires_grad_()
    with fastseq.use_backend(backend):
        out = m(x)[0]
    (grad,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="autograd"):
        torch.autograd.grad(grad.square().sum(), m.weight_ih_l0 if module == "LSTM" else m.weight_ih)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("proj_size", [0, 3])
def test_torch_func_grad_jacrev_and_per_sample_gradients(backend, proj_size):
    """torch.func transforms, which refuse torch.library's autograd, run the layer through a
    Function of their own (fastseq/ops/eager.py): per-sample gradients (vmap of grad) equal
    autograd's example by example, and jacrev equals autograd's Jacobian. Without a projection
    the gradient's batching rule folds the sequences (weight gradients per sequence from d pre);
    with one it takes them one at a time."""
    _check_torch_func(backend, "cpu", proj_size=proj_size)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_torch_func_on_the_gpu(backend):
    """As on the CPU: under vmap each example reaches the GPU kernels as plain tensors."""
    _check_torch_func(backend, "cuda", proj_size=0)


def _check_torch_func(backend, device, proj_size):
    torch.manual_seed(0)
    m = fastseq.nn.LSTM(5, 6, proj_size=proj_size).to(device)
    xs = torch.randn(3, 4, 2, 5, device=device)
    params = {name: p.detach() for name, p in m.named_parameters()}

    def loss(p, x):
        y, (h, c) = torch.func.functional_call(m, p, (x,))
        return y.sin().sum() + h.square().sum() + c.sum()

    with fastseq.use_backend(backend):
        with warnings.catch_warnings():  # batching rules of their own: no fallback warning
            warnings.simplefilter("error", UserWarning)
            per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, xs)
        for i, x in enumerate(xs):
            want = torch.autograd.grad(loss(dict(m.named_parameters()), x), list(m.parameters()))
            for name, w in zip(params, want, strict=True):
                torch.testing.assert_close(per_sample[name][i], w, msg=name)
        outputs = lambda x: m(x)[0].sum((0, 1))  # noqa: E731
        torch.testing.assert_close(torch.func.jacrev(outputs)(xs[0]),
                                   torch.autograd.functional.jacobian(outputs, xs[0]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_folds_sequences_into_the_batch(backend):
    """vmap with shared weights runs one layer call for all the vmapped sequences (the layer's
    batching rule): equal to a loop over them, whatever dimension is vmapped, with per-sequence
    states and lengths; batched weights (an ensemble) too; out-of-range vmapped lengths raise."""
    torch.manual_seed(0)
    m = fastseq.nn.LSTM(5, 6, num_layers=2, bidirectional=True,
                        proj_size=3 if backend != "reference" else 0)
    xs, lengths = torch.randn(4, 3, 2, 5), torch.tensor([[3, 1], [2, 2], [0, 3], [1, 1]])
    h0, c0 = torch.randn(4, 4, 2, m.proj_size or 6), torch.randn(4, 4, 2, 6)
    ensemble = [fastseq.nn.LSTM(5, 6) for _ in range(3)]
    params, buffers = torch.func.stack_module_state(ensemble)
    with fastseq.use_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loop = torch.stack([m(x)[0] for x in xs])
        torch.testing.assert_close(torch.func.vmap(lambda x: m(x)[0])(xs), loop)
        torch.testing.assert_close(
            torch.func.vmap(lambda x: m(x)[0], in_dims=1)(xs.transpose(0, 1)), loop)
        def run(x, h, c, n):
            y, (h_n, c_n) = m(x, (h, c), lengths=n)
            return torch.cat([y.flatten(), h_n.flatten(), c_n.flatten()])

        per_sequence = zip(xs, h0, c0, lengths, strict=True)
        torch.testing.assert_close(torch.func.vmap(run)(xs, h0, c0, lengths),
                                   torch.stack([run(*args) for args in per_sequence]))
        torch.testing.assert_close(  # one sequence from several states
            torch.func.vmap(lambda h, c: run(xs[0], h, c, lengths[0]))(h0, c0),
            torch.stack([run(xs[0], h, c, lengths[0]) for h, c in zip(h0, c0, strict=True)]))
        member = fastseq.nn.LSTM(5, 6)
        torch.testing.assert_close(
            torch.func.vmap(lambda p, b: torch.func.functional_call(member, (p, b), (xs[0],))[0])(
                params, buffers),
            torch.stack([e(xs[0])[0] for e in ensemble]))
        with pytest.raises(ValueError, match=r"lengths must lie in \[0, 3\]"):
            torch.func.vmap(lambda x, n: m(x, lengths=n)[0])(xs, lengths + 1)
        plain = fastseq.nn.LSTM(5, 6, num_layers=2, bidirectional=True)  # the gradient folds too
        params = {name: p.detach() for name, p in plain.named_parameters()}

        def loss(p, x, n):
            y, (h_n, c_n) = torch.func.functional_call(plain, p, (x,), {"lengths": n})
            return y.sin().sum() + h_n.square().sum() + c_n.sum()

        per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, xs,
                                                                                  lengths)
        for i, (x, n) in enumerate(zip(xs, lengths, strict=True)):
            want = torch.autograd.grad(loss(dict(plain.named_parameters()), x, n),
                                       list(plain.parameters()))
            for name, w in zip(params, want, strict=True):
                torch.testing.assert_close(per_sample[name][i], w, msg=name)


def _second_order(kind, f, x):
    """A second derivative of f at x, taken the way ``kind`` names."""
    if kind == "grad of grad":
        return torch.func.grad(lambda x: torch.func.grad(f)(x).square().sum())(x)
    if kind == "grad of jacrev":
        return torch.func.grad(lambda x: torch.func.jacrev(f)(x).square().sum())(x)
    if kind == "jacrev of jacrev":
        return torch.func.jacrev(torch.func.jacrev(f))(x)
    leaf = x.clone().requires_grad_()  # "autograd of grad"
    return torch.autograd.grad(torch.func.grad(f)(leaf).square().sum() + leaf.sum(), leaf)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["grad of grad", "grad of jacrev", "jacrev of jacrev",
                                  "autograd of grad"])
def test_torch_func_second_derivatives_raise(backend, kind):
    """Differentiable once under torch.func too: whatever differentiates the gradient raises,
    where the gradient op would give silent zeros; a gradient used as data does not."""
    m = fastseq.nn.LSTM(4, 3)
    x = torch.randn(5, 2, 4)
    f = lambda x: m(x)[0].sin().sum()  # noqa: E731
    with fastseq.use_backend(backend):
        with pytest.raises(RuntimeError, match="differentiable once"):
            _second_order(kind, f, x)
        as_data = torch.func.grad(lambda w: (w * torch.func.grad(f)(x).detach()).sum())(x)
        torch.testing.assert_close(as_data, torch.func.grad(f)(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_mode_ad_raises_and_functionalize_runs(backend):
    """Forward-mode AD (dual tensors need no grad, even under no_grad) reaches the Function and
    gets torch's error rather than a silently dropped tangent; functionalize takes the
    registered op and gives the eager result."""
    m = fastseq.nn.LSTM(4, 3)
    x = torch.randn(5, 2, 4)
    with fastseq.use_backend(backend):
        with torch.no_grad(), torch.autograd.forward_ad.dual_level():
            dual = torch.autograd.forward_ad.make_dual(x, torch.randn_like(x))
            with pytest.raises(NotImplementedError, match="jvp"):
                m(dual)
        with pytest.raises(NotImplementedError, match="jvp"):
            torch.func.jvp(lambda x: m(x)[0], (x,), (torch.randn_like(x),))
        torch.testing.assert_close(torch.func.functionalize(lambda x: m(x)[0])(x), m(x)[0])


def test_vmap_fake_tensors_and_make_fx_take_the_registered_op():
    """Outside plain eager mode (functorch transforms, fake tensors, make_fx) the layer runs the
    registered op, which those systems know how to handle."""
    torch.manual_seed(0)
    m = fastseq.nn.LSTM(5, 6)
    xs = torch.randn(3, 4, 2, 5)
    batched = torch.func.vmap(lambda x: m(x)[0])(xs)
    torch.testing.assert_close(batched, torch.stack([m(x)[0] for x in xs]))
    first = xs[0]
    with FakeTensorMode() as mode:
        fake = fastseq.nn.LSTM(5, 6)
        y, (h, c) = fake(mode.from_tensor(first))
    assert y.shape == (4, 2, 6) and h.shape == c.shape == (1, 2, 6)
    params = dict(m.named_parameters())
    graph = make_fx(
        lambda p, x: torch.func.functional_call(m, p, (x,))[0], tracing_mode="fake")(params, first)
    assert any("lstm_layer" in str(node.target) for node in graph.graph.nodes)


def test_exported_program_runs_in_a_fresh_process(tmp_path):
    """An exported graph holds fastseq.lstm_layer; a process that loads it runs the op's body
    before anything else has loaded the C++ extension."""
    torch.manual_seed(0)
    m = fastseq.nn.LSTM(5, 6)
    x = torch.randn(4, 2, 5)
    torch.export.save(torch.export.export(m, (x,)), tmp_path / "lstm.pt2")
    torch.save((x, m(x)[0]), tmp_path / "io.pt")
    script = (
        "import sys, torch, fastseq\n"
        "x, want = torch.load(sys.argv[2])\n"
        "got = torch.export.load(sys.argv[1]).module()(x)[0]\n"
        "torch.testing.assert_close(got, want)\n")
    child = subprocess.run([sys.executable, "-c", script, str(tmp_path / "lstm.pt2"),
                            str(tmp_path / "io.pt")], capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-3000:]


@pytest.mark.parametrize("backend", BACKENDS)
def test_registered_ops_pass_opcheck(backend):
    """The layer op under opcheck: schema, fake kernel (strides included), autograd registration
    and AOT dispatch of forward and backward (the gradient op), as torch.compile uses them."""
    inputs = [t if t is None else t.requires_grad_() for t in _layer_inputs(projection=True)]
    torch.library.opcheck(torch.ops.fastseq.lstm_layer,
                          (*inputs, torch.tensor([4, 1, 3]), False, True, backend))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m: m(torch.randn(3, 7)), r"must be \(B, 5\)"),
        (lambda m: m(torch.randn(3, 5), (torch.zeros(2, 6), torch.zeros(3, 6))),
         r"h0 must have shape \(3, 6\)"),
        (lambda m: m(torch.randn(3, 5), (torch.zeros(3, 6), torch.zeros(3, 4))),
         r"c0 must have shape \(3, 6\)"),
        (lambda m: m(torch.randn(3, 5), (torch.zeros(3, 6).double(), torch.zeros(3, 6))),
         "h0 is torch.float64"),
        (lambda m: m(torch.randn(5), (torch.zeros(6), torch.zeros(2, 6))), r"c0 must have shape"),
    ],
)
def test_lstm_cell_bad_inputs_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call(fastseq.nn.LSTMCell(5, 6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_compile_fullgraph(dtype):
    """float16 on the CPU adds the casts around the float32 C++ layer to the graph."""
    lstm = fastseq.nn.LSTM(5, 6, num_layers=2).to(dtype)
    compiled = torch.compile(lstm, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 2, 5, dtype=dtype, requires_grad=True)
    y, _ = compiled(x)
    (grad,) = torch.autograd.grad(y.float().sum(), x)
    y_eager = lstm(x)[0]
    (grad_eager,) = torch.autograd.grad(y_eager.float().sum(), x)
    assert y.dtype == grad.dtype == dtype
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(grad, grad_eager)


GPU_CASES = {
    "ragged_hidden": dict(input_size=13, hidden=19, kwargs={}),
    "two_layers_bidirectional": dict(input_size=13, hidden=19, kwargs=dict(num_layers=2, bidirectional=True)),
    "wide_hidden": dict(input_size=64, hidden=700, kwargs={}),
    # a batch of no block's size: each warp of the CUDA-core kernels takes 4 or 5 of its rows
    "ragged_batch": dict(input_size=13, hidden=40, kwargs={}, batch=37),
    # 512 rows a warp; also too many rows for the tensor-core kernels' partial sums in shared
    # memory, so these stay on the CUDA-core kernels however 'auto' chooses
    "large_batch": dict(input_size=13, hidden=19, kwargs={}, batch=4096),
}


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", sorted(GPU_CASES))
@pytest.mark.parametrize("with_lengths", [False, True])
def test_gpu_backends_within_tolerance_rule(backend, dtype, case, with_lengths):
    """Outputs and gradients on the GPU against float64 on the CPU, within the tolerance rule with
    torch.nn.LSTM (cuDNN) in the same dtype as the low-precision reference."""
    spec = GPU_CASES[case]
    truth, ours = _pair(input_size=spec["input_size"], hidden=spec["hidden"], **spec["kwargs"])
    low, _ = _pair(input_size=spec["input_size"], hidden=spec["hidden"], **spec["kwargs"])
    low.load_state_dict(truth.state_dict())
    ours.to("cuda", dtype), low.to("cuda", dtype)
    batch, steps = spec.get("batch", 5), 11
    x64 = torch.randn(steps, batch, spec["input_size"], dtype=torch.float64, requires_grad=True)
    x = x64.detach().to("cuda", dtype).requires_grad_()
    lengths = torch.tensor([11, 3, 1, 0, 7]).repeat(batch)[:batch] if with_lengths else None

    def run(module, inp, use=None):
        if lengths is None:
            return _run(module, inp, None, use)
        if module is ours:  # fastseq: lengths=; torch: the same batch packed
            with fastseq.use_backend(use):
                y, (h, c) = module(inp, lengths=lengths)
        else:
            packed = pack_padded_sequence(inp, lengths.clamp(min=1), enforce_sorted=False)
            y, (h, c) = module(packed)
            y, _ = pad_packed_sequence(y, total_length=steps)
        keep = (lengths > 0).to(y.device)
        loss = (y * keep[:, None]).sum() + (h.square() * keep[:, None]).sum() + (c * keep[:, None]).sum()
        return (y * keep[:, None], h * keep[:, None], c * keep[:, None]), torch.autograd.grad(
            loss, [inp, *module.parameters()])

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the forced backend really runs
        got_out, got_grads = run(ours, x, backend)
    truth_out, truth_grads = run(truth, x64)
    low_out, low_grads = run(low, x.detach().requires_grad_())
    cpu = [t.cpu() for t in got_out], [t.cpu() for t in got_grads]
    low_cpu = [t.cpu() for t in low_out], [t.cpu() for t in low_grads]
    _compare(cpu[0], truth_out, low_cpu[0])
    _compare(cpu[1][:1], truth_grads[:1], low_cpu[1][:1])
    for g, t, lo in zip(cpu[1][1:], truth_grads[1:], low_cpu[1][1:], strict=True):
        assert_within_rule(g, t, lo, "weight grad", factor=3.0)


@pytest.mark.cuda
@pytest.mark.parametrize(("backend", "projection"), [("cuda", False), ("triton", False), ("triton", True)])
def test_gpu_eager_calls_equal_the_registered_op_and_pass_opcheck(backend, projection):
    """On the GPU too, the eager Function (fastseq/ops/eager.py) and the registered op, which
    torch.compile traces, agree; and the op passes opcheck (fake kernel, autograd, AOT dispatch)."""
    inputs = [t if t is None else t.cuda() for t in _layer_inputs(projection)]
    lengths = torch.tensor([4, 1, 3], device="cuda")  # as fastseq.ops.lstm.checked_lengths gives it
    for got, want in zip(*_eager_and_op_results(inputs, lengths, backend), strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    leaves = [t if t is None else t.requires_grad_() for t in inputs]
    torch.library.opcheck(torch.ops.fastseq.lstm_layer, (*leaves, lengths, False, True, backend))


@pytest.mark.skipif(not _extension.cuda_built(), reason="extension built without its CUDA kernels")
def test_persistent_kernel_plan():
    """Hidden units per block of the persistent kernel, for an H100 (132 SMs, 227 KiB per block)."""
    plan = _extension.load().lstm_persistent_units
    h100 = (132, 227 * 1024, 228 * 1024)  # SMs, shared memory per block, per SM
    assert plan(256, 2, *h100) == 1  # 256 blocks of one unit: two per SM fit
    assert plan(1024, 2, *h100) == 4  # 256 blocks of 4 units, 32 KiB each
    assert plan(1024, 4, *h100) == 4  # float32: 64 KiB a block, still two per SM
    assert plan(4096, 2, *h100) == 0  # would need 8 units x 4096 x 4 gates: too big


def test_tensor_core_tile_plan():
    """How the tensor-core kernels split a block's (batch x depth) by (depth x cols) product over
    their 8 warps: rows padded to a tile of 16, each tile's depth split so that every warp has work
    when tiles are few, and the block's shared memory (its W_hh slice, then float partials)."""
    tiles = _extension.load().lstm_tensor_core_tiles

    def shared(rows, splits, cols, depth):
        return cols * depth * 2 + splits * rows * cols * 4

    # Forward at B64 H512, 4 units (16 gate columns) a block: 4 tiles, each split in two.
    assert tiles(64, 16, 512) == (64, 2, shared(64, 2, 16, 512))
    # A ragged batch pads to one tile, which all 8 warps share ...
    assert tiles(5, 16, 704) == (16, 8, shared(16, 8, 16, 704))
    # ... unless its depth has fewer 16-deep slices than that.
    assert tiles(5, 16, 32) == (16, 2, shared(16, 2, 16, 32))
    # Backward at B64 H512: 16 units, depth 4 x 512.
    assert tiles(64, 16, 2048) == (64, 2, shared(64, 2, 16, 2048))
    # Eight tiles or more: one warp per tile, no split.
    assert tiles(128, 16, 512)[:2] == (128, 1)
    assert tiles(256, 64, 1024)[:2] == (256, 1)
    for batch in (1, 15, 16, 17, 33, 100):
        for cols, depth in ((16, 16), (32, 48), (64, 1024)):
            rows, splits, _ = tiles(batch, cols, depth)
            assert rows % 16 == 0 and batch <= rows < batch + 16
            assert 1 <= splits <= depth // 16
            assert (rows // 16) * (cols // 16) * splits <= max(8, (rows // 16) * (cols // 16))


def _recurrence_truth_and_low(dtype, steps, batch, hidden, lengths, reverse):
    """The recurrence from pre-activations: (inputs in `dtype` on the GPU, their float64 outputs and
    gradients on the CPU, and the same from the plain-PyTorch loop in `dtype` on the GPU). The loop
    takes pre_x as x with W_ih = I, exact in every dtype, so that d pre is the gradient of x."""
    gen = torch.Generator().manual_seed(0)
    pre = torch.randn(steps, batch, 4 * hidden, generator=gen, dtype=torch.float64)
    h0, c0 = (torch.randn(batch, hidden, generator=gen, dtype=torch.float64) for _ in range(2))
    w_hh = torch.randn(4 * hidden, hidden, generator=gen, dtype=torch.float64) / hidden**0.5
    upstream = [torch.randn(steps, batch, hidden, generator=gen, dtype=torch.float64),
                torch.randn(batch, hidden, generator=gen, dtype=torch.float64),
                torch.randn(batch, hidden, generator=gen, dtype=torch.float64)]

    def loop(device, dt):
        leaves = [t.to(device, dt).requires_grad_() for t in (pre, h0, c0)]
        eye = torch.eye(4 * hidden, device=device, dtype=dt)
        lens = None if lengths is None else lengths.to(device)
        out = ref.lstm_layer(leaves[0], leaves[1], leaves[2], eye, w_hh.to(device, dt),
                             lengths=lens, reverse=reverse)
        loss = sum((o * u.to(device, dt)).sum() for o, u in zip(out, upstream, strict=True))
        return [o.detach().cpu() for o in out], [g.cpu() for g in torch.autograd.grad(loss, leaves)]

    inputs = [t.to("cuda", dtype) for t in (pre, h0, c0, w_hh, *upstream)]
    return inputs, loop("cpu", torch.float64), loop("cuda", dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("kernel", "units"), [("cuda_cores", 0), ("cuda_cores", 2),
                                                ("tensor_cores", 4), ("tensor_cores", 8),
                                                ("tensor_cores", 16)])
@pytest.mark.parametrize("reverse", [False, True])
def test_gpu_recurrence_every_kernel_kind_and_block_size(dtype, kernel, units, reverse):
    """The persistent recurrence forced to each kind and forward block size (the benchmark's
    variants), forward and backward, against float64 within the tolerance rule, the plain loop in
    the same dtype as the low-precision reference; ragged batch and hidden size, padded rows."""
    steps, batch, hidden = 9, 21, 37
    lengths = torch.tensor([9, 4, 1, 0, 7, 9, 2] * 3)
    inputs, truth, low = _recurrence_truth_and_low(dtype, steps, batch, hidden, lengths, reverse)
    pre, h0, c0, w_hh, grad_y, grad_h, grad_c = inputs
    lens = lengths.cuda()
    ops = torch.ops.fastseq
    y, h_n, c_n, gates, cells = ops.lstm_recurrence_forward(pre, h0, c0, w_hh, lens, reverse,
                                                            kernel, units)
    backward_units = units if kernel == "cuda_cores" else 0  # the tensor-core backward has one size
    grads = ops.lstm_recurrence_backward(grad_y, grad_h, grad_c, c0, w_hh, lens, reverse, gates,
                                         cells, kernel, backward_units)
    _compare([t.cpu() for t in (y, h_n, c_n)], truth[0], low[0])
    _compare([t.cpu() for t in grads], truth[1], low[1], factor=3.0)


def _recurrence_inputs(steps, batch, hidden, dtype=torch.float16):
    """Zero pre-activations, state and W_hh for the recurrence ops, on the GPU."""
    return (torch.zeros(steps, batch, 4 * hidden, device="cuda", dtype=dtype),
            torch.zeros(batch, hidden, device="cuda", dtype=dtype),
            torch.zeros(batch, hidden, device="cuda", dtype=dtype),
            torch.zeros(4 * hidden, hidden, device="cuda", dtype=dtype))


@pytest.mark.cuda
def test_gpu_recurrence_rejects_kernel_choices_it_cannot_run():
    """A kind or block size that cannot run raises a clear error naming it, before any launch,
    also on an empty batch (where nothing would launch at all)."""
    ops = torch.ops.fastseq
    pre, h0, c0, w_hh = _recurrence_inputs(2, 3, 8)

    def forward(kernel, units, inputs=(pre, h0, c0, w_hh)):
        return ops.lstm_recurrence_forward(*inputs, None, False, kernel, units)

    with pytest.raises(RuntimeError, match="kernel must be 'auto', 'tensor_cores' or 'cuda_cores'"):
        forward("tensor", 0)
    with pytest.raises(RuntimeError, match="units per block need kernel="):
        forward("auto", 4)
    with pytest.raises(RuntimeError, match=r"on tensor cores units must be 0 \(the plan's\), 4, 8 or 16"):
        forward("tensor_cores", 2)
    with pytest.raises(RuntimeError, match=r"on CUDA cores units must be 0 \(the plan's\), 1, 2, 4 or 8"):
        forward("cuda_cores", 16)
    as_float = [t.float() for t in (pre, h0, c0, w_hh)]
    with pytest.raises(RuntimeError, match="takes half or bfloat16"):
        forward("tensor_cores", 0, as_float)
    with pytest.raises(RuntimeError, match="takes half or bfloat16"):
        forward("tensor_cores", 0, [t[:, :0] if t.dim() == 3 else t[:0] for t in as_float[:3]]
                + as_float[3:])
    wide = _recurrence_inputs(1, 1, 4096)  # one unit a block: 4096 blocks
    with pytest.raises(RuntimeError, match="units=1 does not keep every block resident"):
        forward("cuda_cores", 1, wide)
    y, _, _, gates, cells = forward("cuda_cores", 0)
    with pytest.raises(RuntimeError, match="on tensor cores units must be 0 or 16"):
        ops.lstm_recurrence_backward(y, h0, c0, c0, w_hh, None, False, gates, cells,
                                     "tensor_cores", 4)
