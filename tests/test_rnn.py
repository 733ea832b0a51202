"""Elman RNN: fastseq.nn.RNN against torch.nn.RNN holding the same weights."""

import os
import subprocess
import sys
import warnings

import pytest
import torch
from tolerance import assert_within_rule
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastseq
from fastseq import _extension
from fastseq.ops import rnn as rnn_ops

_CPP_RNN = _extension.load() is not None and hasattr(torch.ops.fastseq, "rnn_layer_forward")
BACKENDS = [b for b in ("cpu", "reference") if b != "cpu" or _CPP_RNN]
# The Triton steps run here under the interpreter; they take float32, float16 and bfloat16.
TRITON = "triton" in fastseq.available_backends("cpu")
FLOAT32_BACKENDS = BACKENDS + ["triton"] * TRITON
needs_cpp = pytest.mark.skipif(not _CPP_RNN, reason="extension built without the C++ RNN layer")
needs_triton = pytest.mark.skipif(not TRITON, reason="Triton interpreter not active")
CONFIGS = {
    "one_layer": dict(),
    "relu": dict(nonlinearity="relu"),
    "two_layers_bidirectional": dict(num_layers=2, bidirectional=True),
    "batch_first_relu": dict(batch_first=True, nonlinearity="relu", num_layers=2),
    "no_bias_bidirectional": dict(bias=False, bidirectional=True),
}


def _pair(dtype=torch.float64, input_size=5, hidden=6, **kwargs):
    theirs = torch.nn.RNN(input_size, hidden, **kwargs).to(dtype)
    ours = fastseq.nn.RNN(input_size, hidden, **kwargs).to(dtype)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _run(module, x, h0=None, backend=None, leaf=None, lengths=None):
    """Outputs and gradients (input, h0, every parameter) of a scalar loss touching every output."""
    leaves = [x if leaf is None else leaf] + ([h0] if h0 is not None else [])
    with fastseq.use_backend(backend):
        y, h = module(x, h0) if lengths is None else module(x, h0, lengths=lengths)
    data = y.data if hasattr(y, "batch_sizes") else y
    weights = torch.linspace(-1, 1, data.shape[-1], dtype=data.dtype, device=data.device)
    loss = (data * weights).sum() + h.square().sum()
    grads = torch.autograd.grad(loss, leaves + list(module.parameters()))
    return [data, h, *grads]


def _close(got, want, **tolerance):
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b.to(a.dtype), msg=lambda m, i=i: f"tensor {i}: {m}",
                                   **tolerance)


def _exact(got, want):
    _close(got, want, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("with_state", [False, True])
def test_matches_torch_rnn_float64(backend, config, with_state):
    theirs, ours = _pair(**CONFIGS[config])
    layers = theirs.num_layers * (2 if theirs.bidirectional else 1)
    x = torch.randn((3, 7, 5) if theirs.batch_first else (7, 3, 5), dtype=torch.float64,
                    requires_grad=True)
    h0 = torch.randn(layers, 3, 6, dtype=torch.float64, requires_grad=True) if with_state else None
    _exact(_run(ours, x, h0, backend), _run(theirs, x, h0))


def _tolerance_check(dtype, steps, batch, lengths=None, input_size=11, hidden=37, backend="cpu",
                     **kwargs):
    """fastseq's layer on ``backend`` in ``dtype`` against torch.nn.RNN in float64 (the truth),
    within the tolerance rule against torch.nn.RNN in ``dtype``; ragged ``lengths`` go to torch
    packed. The Triton steps, built like the plain-PyTorch loop (a step's product, then its
    pointwise tail), have that loop in ``dtype`` as their low-precision reference: torch.nn.RNN's
    fused CPU kernel is at times 4x more accurate than either on a weight gradient."""
    truth, ours = _pair(torch.float64, input_size, hidden, **kwargs)
    low, _ = _pair(torch.float64, input_size, hidden, **kwargs)
    low.load_state_dict(truth.state_dict())
    ours.to(dtype), low.to(dtype)
    x64 = torch.randn(steps, batch, input_size, dtype=torch.float64)
    x = x64.to(dtype).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no silent fallback
        got = _run(ours, x, None, backend, lengths=lengths)
    if backend == "triton":
        loop = fastseq.nn.RNN(input_size, hidden, **kwargs).to(dtype)
        loop.load_state_dict(ours.state_dict())
        want_low = _run(loop, x.detach().requires_grad_(), None, "reference", lengths=lengths)
        want = (_run(truth, x64.requires_grad_()) if lengths is None
                else _run_packed(truth, x64.requires_grad_(), lengths))
    elif lengths is None:
        want, want_low = _run(truth, x64.requires_grad_()), _run(low, x.detach().requires_grad_())
    else:
        want, want_low = [_run_packed(m, t, lengths) for m, t in
                          ((truth, x64.requires_grad_()), (low, x.detach().requires_grad_()))]
    # The Triton interpreter rounds float32 -> bfloat16 by truncation: twice the error.
    scale = 2.0 if backend == "triton" and dtype == torch.bfloat16 else 1.0
    for i, (g, t, lo) in enumerate(zip(got, want, want_low, strict=True)):
        # outputs and grad_x within 2x; weight gradients, sums over every step, within 3x
        assert_within_rule(g, t, lo, f"tensor {i}", factor=scale * (2.0 if i < 3 else 3.0))


def _run_packed(module, x, lengths):
    """_run of torch on a PackedSequence of ``x`` (T, B, I), its output padded back."""
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    y, h = module(packed)
    y, _ = pad_packed_sequence(y, total_length=x.shape[0])
    weights = torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)
    grads = torch.autograd.grad((y * weights).sum() + h.square().sum(), [x, *module.parameters()])
    return [y, h, *grads]


@needs_cpp
@pytest.mark.parametrize("config", ["one_layer", "relu", "two_layers_bidirectional"])
@pytest.mark.parametrize(("steps", "batch", "hidden"), [(9, 4, 37), (5, 13, 70), (3, 3, 300),
                                                        (1, 5, 19), (2, 1, 16)],
                         ids=["ragged_panels", "rows_off_tiles", "wide", "one_step_unpacked",
                              "two_rows_unpacked"])
def test_float32_within_tolerance_rule(config, steps, batch, hidden):
    """Packed W_hh panels (hidden off every multiple of 16, rows off the register tiles, wide
    enough for several panel groups) and the per-step ATen path (under 4 rows in all)."""
    _tolerance_check(torch.float32, steps, batch, hidden=hidden, **CONFIGS[config])


@needs_cpp
@pytest.mark.parametrize("config", ["one_layer", "two_layers_bidirectional"])
def test_bfloat16_within_tolerance_rule(config):
    _tolerance_check(torch.bfloat16, 6, 5, hidden=40, **CONFIGS[config])


# relu only in float32: in half precision a pre-activation within rounding of 0 flips relu's
# derivative from one implementation to another, an O(1) change in its gradient that no
# tolerance rule bounds.
@needs_triton
@pytest.mark.parametrize(("config", "dtype"),
                         [(c, d) for c in ("one_layer", "relu", "two_layers_bidirectional")
                          for d in (torch.float32, torch.float16, torch.bfloat16)
                          if c != "relu" or d == torch.float32], ids=str)
@pytest.mark.parametrize("lengths", [None, [3, 9, 1, 6, 9, 2, 5, 9, 4, 8, 7, 9, 1, 2, 3, 5, 6, 9]],
                         ids=["full", "ragged"])
def test_triton_steps_within_tolerance_rule(config, dtype, lengths):
    """The Triton steps: 18 rows and 37 units (off the 16-wide tiles), a length-1 row among
    unsorted ragged lengths, outputs, h_n and every gradient."""
    lengths = None if lengths is None else torch.tensor(lengths)
    _tolerance_check(dtype, 9, 18, lengths=lengths, backend="triton", **CONFIGS[config])


@needs_cpp
@pytest.mark.parametrize("config", ["two_layers_bidirectional", "batch_first_relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_lengths_against_torch_packed(config, dtype):
    """Ragged unsorted lengths with a full row and a length-1 row: fastseq's ``lengths=`` against
    torch on a PackedSequence, outputs, h_n and every gradient."""
    lengths = torch.tensor([3, 9, 1, 6, 9, 2, 5])
    kwargs = {k: v for k, v in CONFIGS[config].items() if k != "batch_first"}
    if dtype == torch.float64:
        theirs, ours = _pair(torch.float64, 11, 21, **kwargs)
        x = torch.randn(9, 7, 11, dtype=dtype, requires_grad=True)
        _exact(_run(ours, x, None, "cpu", lengths=lengths), _run_packed(theirs, x, lengths))
    else:
        _tolerance_check(dtype, 9, 7, lengths=lengths, hidden=21, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_lengths_with_an_empty_sequence_and_a_batch_of_one(backend, bidirectional):
    """A sequence of length 0 outputs zeros and keeps h0 (torch cannot pack it: the others are
    compared with torch packed); a batch of one with lengths equals the trimmed run."""
    theirs, ours = _pair(num_layers=2, bidirectional=bidirectional)
    x = torch.randn(5, 4, 5, dtype=torch.float64)
    h0 = torch.randn(4 if bidirectional else 2, 4, 6, dtype=torch.float64)
    lengths = torch.tensor([4, 0, 5, 1])
    with fastseq.use_backend(backend):
        y, h = ours(x, h0, lengths=lengths)
    keep = lengths > 0
    want, want_h = theirs(pack_padded_sequence(x[:, keep], lengths[keep], enforce_sorted=False),
                          h0[:, keep].contiguous())
    want, _ = pad_packed_sequence(want, total_length=5)
    _exact([y[:, keep], h[:, keep]], [want, want_h])
    assert torch.equal(y[:, 1], torch.zeros_like(y[:, 1]))
    assert torch.equal(h[:, 1], h0[:, 1])
    with fastseq.use_backend(backend):
        one, one_h = ours(x[:, 2:3], h0[:, 2:3], lengths=[3])
        trimmed, trimmed_h = ours(x[:3, 2:3], h0[:, 2:3])
    _exact([one[:3], one_h], [trimmed, trimmed_h])
    assert torch.equal(one[3:], torch.zeros_like(one[3:]))


@needs_triton
@pytest.mark.parametrize("bidirectional", [False, True])
def test_triton_steps_keep_the_state_of_empty_and_ended_sequences(bidirectional):
    """A length-0 row outputs zeros and keeps h0 (its gradient passes straight through), a
    length-1 row and full rows beside it: the Triton steps equal the reference loop."""
    ours = fastseq.nn.RNN(5, 20, num_layers=2, bidirectional=bidirectional)
    x = torch.randn(5, 4, 5, requires_grad=True)
    h0 = torch.randn(4 if bidirectional else 2, 4, 20, requires_grad=True)
    lengths = torch.tensor([4, 0, 5, 1])
    results = [_run(ours, x, h0, backend, lengths=lengths) for backend in ("triton", "reference")]
    _close(*results, atol=1e-5, rtol=1e-5)
    y, h, _, grad_h0, *_ = results[0]
    assert torch.equal(y[:, 1], torch.zeros_like(y[:, 1]))
    assert torch.equal(h[:, 1], h0[:, 1].detach())


@pytest.mark.parametrize(("backend", "dtype"),
                         [(b, d) for b in FLOAT32_BACKENDS for d in (torch.float32, torch.float64)
                          if b != "triton" or d == torch.float32])
@pytest.mark.parametrize("shape", [(0, 3), (5, 0)], ids=["no_steps", "empty_batch"])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_empty_sequence_or_batch(backend, dtype, shape, with_lengths):
    steps, batch = shape
    ours = fastseq.nn.RNN(4, 16, bidirectional=True).to(dtype)
    x = torch.randn(steps, batch, 4, dtype=dtype, requires_grad=True)
    h0 = torch.randn(2, batch, 16, dtype=dtype, requires_grad=True)
    lengths = torch.full((batch,), steps) if with_lengths else None
    with fastseq.use_backend(backend):
        y, h = ours(x, h0, lengths=lengths)
    assert y.shape == (steps, batch, 32) and h.shape == (2, batch, 16)
    if steps == 0:  # the state passes through untouched
        torch.testing.assert_close(h, h0.detach())
    (y.sum() + h.sum()).backward()
    assert x.grad.shape == x.shape and h0.grad.shape == h0.shape
    assert ours.weight_hh_l0.grad.shape == (16, 16)
    if steps == 0:
        assert torch.equal(h0.grad, torch.ones_like(h0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_packed_sequence_in_and_out(backend, enforce_sorted):
    theirs, ours = _pair(num_layers=2, bidirectional=True)
    lengths = torch.tensor([7, 5, 5, 1]) if enforce_sorted else torch.tensor([3, 7, 1, 6])
    x = torch.randn(7, 4, 5, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 4, 6, dtype=torch.float64, requires_grad=True)

    def packed():
        return pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)

    got = _run(ours, packed(), h0, backend, leaf=x)
    want = _run(theirs, packed(), h0, leaf=x)
    _exact(got, want)
    with fastseq.use_backend(backend):
        out, _ = ours(packed())
    assert isinstance(out, torch.nn.utils.rnn.PackedSequence)
    torch.testing.assert_close(pad_packed_sequence(out)[1], lengths)


def test_unbatched_input():
    theirs, ours = _pair(num_layers=2, bidirectional=True)
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    for state in (None, h0):
        got, want = _run(ours, x, state), _run(theirs, x, state)
        assert got[0].shape == (6, 12) and got[1].shape == (4, 6)
        _exact(got, want)


def test_same_seed_same_weights_and_state_dicts_load_both_ways():
    kwargs = dict(num_layers=2, bidirectional=True, nonlinearity="relu")
    torch.manual_seed(3)
    theirs = torch.nn.RNN(5, 6, **kwargs)
    torch.manual_seed(3)
    ours = fastseq.nn.RNN(5, 6, **kwargs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    other = torch.nn.RNN(5, 6, **kwargs)
    other.load_state_dict(fastseq.nn.RNN(5, 6, **kwargs).state_dict())
    ours.load_state_dict(other.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), other.parameters(), strict=True))
    no_bias = fastseq.nn.RNN(5, 6, bias=False)
    assert [n for n, _ in no_bias.named_parameters()] == ["weight_ih_l0", "weight_hh_l0"]
    ours.flatten_parameters()
    assert "nonlinearity='relu'" in repr(ours)


def test_to_torch_nn_gives_torch_rnn_with_the_same_function():
    ours = fastseq.nn.RNN(5, 6, num_layers=2, nonlinearity="relu", batch_first=True).double()
    theirs = fastseq.nn.to_torch_nn(ours)
    assert type(theirs) is torch.nn.RNN and theirs.nonlinearity == "relu" and theirs.batch_first
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    _exact(list(ours(x)), list(theirs(x)))


def test_dropout_between_layers_matches_torch_under_the_same_seed():
    theirs, ours = _pair(num_layers=3, dropout=0.4)
    x = torch.randn(5, 3, 5, dtype=torch.float64)
    torch.manual_seed(7)
    got = ours(x)
    torch.manual_seed(7)
    want = theirs(x)
    _exact(list(got), list(want))


@needs_cpp
@pytest.mark.parametrize("wanted", [(True, False, False), (False, True, False),
                                    (False, False, True), (False, False, False)],
                         ids=["x", "weights", "state", "none"])
@pytest.mark.parametrize("lengths", [None, [5, 2, 0]], ids=["full", "ragged"])
@pytest.mark.parametrize("reverse", [False, True])
def test_cpp_backward_computes_only_the_gradients_asked_for(wanted, lengths, reverse):
    """None for what was not asked for; the rest is what the full call gives, bit for bit."""
    x, h0 = torch.randn(5, 3, 7), torch.randn(3, 9)
    w_ih, w_hh, bias = torch.randn(9, 7), torch.randn(9, 9) * 0.3, torch.randn(9)
    lengths = None if lengths is None else torch.tensor(lengths)
    y, h_n = torch.ops.fastseq.rnn_layer_forward(x, h0, w_ih, w_hh, bias, lengths, reverse, "tanh")
    args = (torch.randn_like(y), torch.randn_like(h_n), x, h0, w_ih, w_hh, y, lengths, reverse,
            "tanh", True)
    full = torch.ops.fastseq.rnn_layer_backward(*args, True, True, True)
    part = torch.ops.fastseq.rnn_layer_backward(*args, *wanted)
    with_x, weights, state = wanted
    for index, (a, b, need) in enumerate(zip(part, full, [with_x, state, weights, weights, weights],
                                             strict=True)):
        assert torch.equal(a, b) if need else a is None, f"gradient {index}"


@needs_cpp
def test_cpp_layer_under_lower_cpu_capabilities():
    """The AVX2 level, where float32 takes the per-step ATen GEMMs and 8-lane activations (an
    AVX-512 machine never takes them by itself: ATen reads ATEN_CPU_CAPABILITY once per process),
    float32 with ragged lengths against float64, in a child process. The portable scalar code
    runs in this process too: float64, and the columns past the last multiple of 8."""
    script = (
        "import torch, fastseq\n"
        "from fastseq.ops.rnn import rnn_layer\n"
        "torch.manual_seed(0)\n"
        "d = torch.float64\n"
        "x, h0 = torch.randn(6, 5, 7, dtype=d), torch.randn(5, 37, dtype=d)\n"
        "w = [torch.randn(37, 7, dtype=d) * 0.3, torch.randn(37, 37, dtype=d) * 0.2,\n"
        "     torch.randn(37, dtype=d)]\n"
        "for nl in ('tanh', 'relu'):\n"
        "    for lengths in (None, torch.tensor([6, 1, 0, 4, 6])):\n"
        "        for reverse in (False, True):\n"
        "            def run(dtype):\n"
        "                leaves = [t.to(dtype).requires_grad_() for t in (x, h0, *w)]\n"
        "                with fastseq.use_backend('cpu'):\n"
        "                    y, h = rnn_layer(*leaves, lengths=lengths, reverse=reverse, nonlinearity=nl)\n"
        "                return [y, h, *torch.autograd.grad(y.sin().sum() + h.sum(), leaves)]\n"
        "            for a, b in zip(run(torch.float32), run(torch.float64)):\n"
        "                torch.testing.assert_close(a, b.float(), atol=2e-4, rtol=1e-4)\n"
    )
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", OMP_NUM_THREADS="1")
    child = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                           timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]


def _layer_inputs(seed=0):
    """One layer's (x, h0, w_ih, w_hh, bias) in float32, T=4 B=3 I=5 H=6."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 3, 5), (3, 6), (6, 5), (6, 6), (6,)]
    return [torch.randn(*shape, generator=g) * 0.5 for shape in shapes]


@pytest.mark.parametrize("backend", FLOAT32_BACKENDS)
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_eager_calls_equal_the_registered_op(backend, nonlinearity):
    """Eager calls run the op's autograd without the dispatcher (fastseq/ops/eager.py); the
    registered op, which torch.compile and torch.export trace, gives the same bits."""
    results = []
    for layer in (rnn_ops._EagerLayer.apply, torch.ops.fastseq.rnn_layer):
        leaves = [t.requires_grad_() for t in _layer_inputs()]
        y, h_n = layer(*leaves, torch.tensor([4, 1, 3]), True, nonlinearity, backend)
        grads = torch.autograd.grad((y.sin().sum(), h_n.square().sum()), leaves)
        results.append((y, h_n, *grads))
    for got, want in zip(*results, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("backend", FLOAT32_BACKENDS)
@pytest.mark.parametrize("lengths", [None, [4, 1, 3]], ids=["full", "ragged"])
def test_registered_ops_pass_opcheck(backend, lengths):
    """Schema, fake kernel, autograd registration and AOT dispatch of forward and backward."""
    inputs = [t.requires_grad_() for t in _layer_inputs()]
    lengths = None if lengths is None else torch.tensor(lengths)
    torch.library.opcheck(torch.ops.fastseq.rnn_layer, (*inputs, lengths, True, "relu", backend))


def test_compile_fullgraph():
    rnn = fastseq.nn.RNN(5, 6, num_layers=2, bidirectional=True)
    compiled = torch.compile(rnn, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 2, 5, requires_grad=True)
    y, h = compiled(x)
    (grad,) = torch.autograd.grad(y.sum() + h.sum(), x)
    y_eager, h_eager = rnn(x)
    (grad_eager,) = torch.autograd.grad(y_eager.sum() + h_eager.sum(), x)
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(grad, grad_eager)


def test_float16_runs_in_float32_and_autocast():
    theirs, ours = _pair(torch.float32, num_layers=2)
    x = torch.randn(5, 3, 5)
    half = fastseq.nn.RNN(5, 6, num_layers=2).half()
    half.load_state_dict(ours.state_dict())
    y, h = half(x.half())
    assert y.dtype == h.dtype == torch.float16
    torch.testing.assert_close(y.float(), theirs(x)[0], atol=5e-3, rtol=5e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, h = ours(x)
    assert y.dtype == h.dtype == torch.bfloat16


def test_reference_fallback_warns_once_on_other_devices():
    """A device no kernel takes: the reference, announced once (the meta device stands in for a
    GPU with float64 here)."""
    rnn = fastseq.nn.RNN(5, 6).to("meta")
    rnn_ops.warn_once.cache_clear()
    with pytest.warns(UserWarning, match="no meta kernel for the Elman RNN"):
        y, h = rnn(torch.empty(4, 2, 5, device="meta"))
    assert y.shape == (4, 2, 6) and y.device.type == "meta"


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m: m(torch.randn(4, 2, 7)), "expected input_size=5"),
        (lambda m: m(torch.randn(4, 2, 5), torch.zeros(1, 3, 6)), r"h0 must have shape \(1, 2, 6\)"),
        (lambda m: m(torch.randn(4, 2, 5), torch.zeros(1, 2, 6).double()), "h0 is torch.float64"),
        (lambda m: m(torch.randn(4, 2, 5).double()), "input dtype torch.float64 must match"),
        (lambda m: m(torch.randn(4, 2, 5), lengths=torch.tensor([5, 1])), r"lengths must lie in \[0, 4\]"),
        (lambda m: m(torch.randn(4, 2, 5), lengths=torch.tensor([-1, 1])), r"lengths must lie in \[0, 4\]"),
        (lambda m: m(torch.randn(4, 2, 5), lengths=torch.tensor([1])), "lengths must be 2 integers"),
        (lambda m: m(torch.randn(4, 2, 5), lengths=torch.tensor([1.0, 2.0])), "lengths must be 2 integers"),
        (lambda m: m(torch.randn(2, 4, 2, 5)), "2-D"),
        (lambda m: m(pack_padded_sequence(torch.randn(4, 2, 5), [4, 2]), lengths=[4, 2]), "not both"),
        (lambda m: fastseq.nn.RNN(5, 6, nonlinearity="gelu"), "nonlinearity must be 'tanh' or 'relu'"),
        (lambda m: fastseq.nn.RNN(5, 0), "hidden_size must be an int >= 1"),
        (lambda m: fastseq.nn.RNN(5, 6, dropout=1.5), r"dropout must be a number in \[0, 1\]"),
    ],
)
def test_module_bad_inputs_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=f"fastseq RNN: .*{match}"):
        call(fastseq.nn.RNN(5, 6))


def _replaced(index, value):
    args = _layer_inputs()
    args[index] = value
    return args


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (_replaced(0, torch.randn(4, 5)), {}, r"x must be a floating \(T, B, I\) tensor"),
        (_replaced(0, torch.randint(0, 3, (4, 3, 5))), {}, r"x must be a floating \(T, B, I\)"),
        (_replaced(1, torch.randn(2, 6)), {}, r"h0 must have shape \(3, 6\), got \(2, 6\)"),
        (_replaced(2, torch.randn(6, 5, 1)), {}, r"w_ih must be \(H, I\)"),
        (_replaced(2, torch.randn(6, 4)), {}, r"w_ih must have shape \(6, 5\), got \(6, 4\)"),
        (_replaced(3, torch.randn(6, 5)), {}, r"w_hh must have shape \(6, 6\)"),
        (_replaced(3, torch.randn(6, 6).double()), {}, "w_hh must be torch.float32 on cpu"),
        (_replaced(4, torch.randn(7)), {}, r"bias must have shape \(6,\)"),
        (_layer_inputs(), dict(lengths=torch.tensor([5, 1, 1])), r"lengths must lie in \[0, 4\]"),
        (_layer_inputs(), dict(lengths=[[1, 2, 3]]), "lengths must be 3 integers"),
        (_layer_inputs(), dict(nonlinearity="sigmoid"), "nonlinearity must be one of"),
    ],
)
def test_op_bad_inputs_raise_clear_errors_before_any_kernel(args, kwargs, match):
    with pytest.raises(ValueError, match=f"fastseq rnn_layer: .*{match}"):
        rnn_ops.rnn_layer(*args, **kwargs)


GPU_CONFIGS = {"one_layer": (dict(), 40, 37), "two_layers_bidirectional":
               (dict(num_layers=2, bidirectional=True), 300, 5), "relu": (dict(nonlinearity="relu"), 64, 9)}


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize(("config", "dtype"),
                         [(c, d) for c in sorted(GPU_CONFIGS)
                          for d in (torch.float32, torch.float16, torch.bfloat16)
                          if c != "relu" or d == torch.float32], ids=str)
@pytest.mark.parametrize("with_lengths", [False, True])
def test_gpu_backends_within_tolerance_rule(backend, config, dtype, with_lengths):
    """The Triton steps and the persistent kernel on the GPU against the float64 loop on the CPU,
    within the tolerance rule with the plain-PyTorch loop (cuBLAS) in the same dtype; a length-0
    row, a length-1 row and full rows (relu in float32 only, as on the CPU)."""
    kwargs, hidden, batch = GPU_CONFIGS[config]
    truth = fastseq.nn.RNN(13, hidden, **kwargs).double()
    ours, low = (fastseq.nn.RNN(13, hidden, **kwargs).to("cuda", dtype) for _ in range(2))
    ours.load_state_dict(truth.state_dict()), low.load_state_dict(truth.state_dict())
    x64 = torch.randn(11, batch, 13, dtype=torch.float64, requires_grad=True)
    x = x64.detach().to("cuda", dtype).requires_grad_()
    lengths = torch.tensor([11, 3, 1, 0, 7]).repeat(batch)[:batch] if with_lengths else None
    on_gpu = None if lengths is None else lengths.cuda()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the forced backend really runs
        got = _run(ours, x, None, backend, lengths=on_gpu)
    want = _run(truth, x64, None, "reference", lengths=lengths)
    want_low = _run(low, x.detach().requires_grad_(), None, "reference", lengths=on_gpu)
    for i, (g, t, lo) in enumerate(zip(got, want, want_low, strict=True)):
        assert_within_rule(g.cpu(), t, lo.cpu(), f"tensor {i}", factor=2.0 if i < 3 else 3.0)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("shape", [(0, 3), (5, 0)], ids=["no_steps", "empty_batch"])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_gpu_backends_on_empty_inputs(backend, shape, with_lengths):
    steps, batch = shape
    ours = fastseq.nn.RNN(4, 16, bidirectional=True).cuda()
    x = torch.randn(steps, batch, 4, device="cuda", requires_grad=True)
    h0 = torch.randn(2, batch, 16, device="cuda", requires_grad=True)
    lengths = torch.full((batch,), steps, device="cuda") if with_lengths else None
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the forced backend really runs
        with fastseq.use_backend(backend):
            y, h = ours(x, h0, lengths=lengths)
            (y.sum() + h.sum()).backward()
    assert y.shape == (steps, batch, 32) and h.shape == (2, batch, 16)
    if steps == 0:
        torch.testing.assert_close(h, h0.detach())
        assert torch.equal(h0.grad, torch.ones_like(h0))


@pytest.mark.skipif(not _extension.cuda_built(), reason="extension built without its CUDA kernels")
def test_persistent_kernel_plan():
    """Hidden units per block of the persistent RNN kernels, for an H100 (132 SMs, 227 KiB per
    block): one row of W_hh a unit, up to 32 units a block, every block resident."""
    plan = _extension.load().rnn_persistent_units
    h100 = (132, 227 * 1024, 228 * 1024)  # SMs, shared memory per block, per SM
    assert plan(256, 4, *h100) == 1  # 256 blocks of one unit: two per SM fit
    assert plan(1024, 2, *h100) == 4  # 256 blocks of 4 units
    assert plan(2048, 2, *h100) == 8  # 256 blocks of 8 units, 32 KiB each
    assert plan(4096, 4, *h100) == 0  # 16 units of 4096 float32 rows: 256 KiB, over the limit
