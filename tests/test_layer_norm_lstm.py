"""LayerNorm-LSTM: the C++ layer (torch.ops.fastseq.layer_norm_lstm_layer) against the
plain-PyTorch reference, forward and every gradient, and the LayerNormLSTM module."""

import os
import subprocess
import sys
import warnings

import pytest
import torch
from tolerance import assert_within_rule

import fastseq
from fastseq import _extension
from fastseq.ops import layer_norm_lstm as layer_norm_lstm_ops
from fastseq.ops.layer_norm_lstm import layer_norm_lstm_layer
from fastseq.reference import lstm as ref

_CPP = _extension.load() is not None and hasattr(torch.ops.fastseq, "layer_norm_lstm_forward")
needs_cpp = pytest.mark.skipif(not _CPP, reason="extension built without its CPU kernels")
# The fused backends that run here (Triton under the interpreter), with the dtypes each takes.
FUSED = [b for b in ("cpu", "triton")
         if b in fastseq.available_backends("cpu") and (b != "cpu" or _CPP)]
CASES = [pytest.param(b, d, id=f"{b}-{n}") for b in FUSED
         for d, n in ((torch.float32, "fp32"), (torch.float64, "fp64"), (torch.bfloat16, "bf16"))
         if (b, d) != ("triton", torch.float64)]

NAMES = ["x", "h0", "c0", "w_ih", "w_hh", "bias", "ln_ih", "ln_hh", "ln_c_weight", "ln_c_bias"]


def _inputs(steps, batch, input_size, hidden, dtype=torch.float64, bias=True, seed=0):
    """Random layer inputs in float64, LayerNorms moved off the identity so that they matter."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift

    inputs = [rand(steps, batch, input_size), rand(batch, hidden, scale=0.5),
              rand(batch, hidden, scale=0.5), rand(4 * hidden, input_size, scale=0.3),
              rand(4 * hidden, hidden, scale=0.3), rand(4 * hidden, scale=0.1) if bias else None,
              rand(4 * hidden, scale=0.3, shift=1.0), rand(4 * hidden, scale=0.3, shift=1.0),
              rand(hidden, scale=0.3, shift=1.0), rand(hidden, scale=0.3)]
    return [t if t is None else t.to(dtype) for t in inputs]


def _run(inputs, lengths, reverse, upstream, backend):
    """Outputs (y, h_n, c_n) and the gradients of every input under a fixed upstream gradient."""
    leaves = [t if t is None else t.detach().requires_grad_() for t in inputs]
    with fastseq.use_backend(backend):
        outputs = layer_norm_lstm_layer(*leaves, lengths=lengths, reverse=reverse)
    present = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(outputs, present, [u.to(outputs[0].dtype) for u in upstream])
    return outputs, grads


def _check(backend, steps, batch, input_size, hidden, dtype, lengths=None, reverse=False,
           bias=True):
    truth_in = _inputs(steps, batch, input_size, hidden, bias=bias)
    g = torch.Generator().manual_seed(1)
    upstream = [torch.randn(steps, batch, hidden, dtype=torch.float64, generator=g),
                torch.randn(batch, hidden, dtype=torch.float64, generator=g),
                torch.randn(batch, hidden, dtype=torch.float64, generator=g)]
    truth = _run(truth_in, lengths, reverse, upstream, "reference")
    low_in = [t if t is None else t.to(dtype) for t in truth_in]
    got = _run(low_in, lengths, reverse, upstream, backend)
    low = _run(low_in, lengths, reverse, upstream, "reference")
    names = ["y", "h_n", "c_n"] + [n for n, t in zip(NAMES, truth_in, strict=True) if t is not None]
    for name, g, t, lo in zip(names, [*got[0], *got[1]], [*truth[0], *truth[1]],
                              [*low[0], *low[1]], strict=True):
        if dtype == torch.float64:
            torch.testing.assert_close(g, t, msg=name)
        else:
            # The cell's LayerNorm divides by the spread of c, which amplifies rounding, and a
            # gradient goes back through every step: the float32 error is noise that the order of
            # the sums sets, and the reference's own error is one draw of it. Over seeds both sat
            # at 3 to 32 float32 ulps of the largest value, and the reference's moved 2.5x with
            # nothing but ATen's vector width; so 4x its error, plus 16 ulps of the largest value.
            # (bfloat16: the fused kernels compute in float32, far inside the bfloat16
            # reference's error, and take the rule's own floor.)
            ulps = 16 * torch.finfo(dtype).eps * t.abs().max().item()
            assert_within_rule(g, t, lo, name, factor=4.0,
                               floor=ulps if dtype == torch.float32 else None)


@pytest.mark.parametrize("backend, dtype", CASES)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("shape", [(5, 3, 7, 9), (7, 5, 33, 37), (1, 1, 4, 16), (4, 18, 6, 20)],
                         ids=["small", "ragged", "one_step_one_row", "many_rows"])
def test_fused_layer_matches_reference(backend, dtype, reverse, shape):
    _check(backend, *shape, dtype, reverse=reverse)


@pytest.mark.parametrize("backend, dtype", CASES)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("steps, lengths", [(6, [6, 3, 1, 0, 5]), (3, [2]), (1, [1, 0, 1])],
                         ids=["packed", "unpacked_one_row", "unpacked_one_step"])
def test_fused_layer_with_lengths_and_no_bias(backend, dtype, reverse, steps, lengths):
    """Lengths from full to zero: padding keeps the state and outputs zeros; a reverse sequence
    shorter than T starts from h0. Under 4 rows over the sequence the C++ layer's recurrent GEMMs
    run unpacked, accumulating onto the carry that padding rows keep."""
    _check(backend, steps, len(lengths), 5, 21, dtype, lengths=torch.tensor(lengths),
           reverse=reverse, bias=False)


@needs_cpp
def test_cpp_layer_over_many_rows():
    """Parameter gradients summed over T B = 4096 rows (a running float32 sum would drift)."""
    _check("cpu", 32, 128, 8, 16, torch.float32)


@pytest.mark.parametrize("backend", FUSED)
def test_saved_outputs_are_a_function_of_the_inputs(backend):
    """Padding rows of what the forward saves are written too (opcheck and AOT tracing compare
    two calls)."""
    inputs = _inputs(4, 3, 5, 6, dtype=torch.float32)
    args = (*inputs, torch.tensor([4, 1, 0]), False, 1e-5, True, backend)
    first = torch.ops.fastseq.layer_norm_lstm_layer(*args)
    torch.randn(1 << 16).exp_()  # dirty the allocator's free memory
    second = torch.ops.fastseq.layer_norm_lstm_layer(*args)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", FUSED)
def test_eager_calls_equal_the_registered_op(backend):
    """Eager calls run the op's autograd without the dispatcher (fastseq/ops/eager.py); the
    registered op, which torch.compile and torch.export trace, gives the same bits."""
    inputs = _inputs(4, 3, 5, 6, dtype=torch.float32)
    lengths = torch.tensor([4, 1, 3])
    results = []
    for layer in (layer_norm_lstm_ops._EagerLayer.apply, torch.ops.fastseq.layer_norm_lstm_layer):
        leaves = [t.detach().requires_grad_() for t in inputs]
        y, h_n, c_n, *_ = layer(*leaves, lengths, True, 1e-5, True, backend)
        grads = torch.autograd.grad((y.sin().sum(), h_n.square().sum(), c_n.sum()), leaves)
        results.append((y, h_n, c_n, *grads))
    for got, want in zip(*results, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("backend", FUSED)
def test_torch_func_per_sample_gradients_and_grad_of_grad(backend):
    """torch.func transforms run the fused layer (fastseq/ops/eager.py): per-sample gradients
    (vmap of grad) equal autograd's example by example; a grad of a grad raises."""
    inputs = _inputs(3, 2, 4, 5, dtype=torch.float32)
    xs = torch.stack([inputs[0], inputs[0].flip(0)])

    def loss(x, *weights):
        y, h_n, c_n = layer_norm_lstm_layer(x, *weights)
        return y.sin().sum() + h_n.square().sum() + c_n.sum()

    with fastseq.use_backend(backend):
        with warnings.catch_warnings():  # batching rules of their own: no fallback warning
            warnings.simplefilter("error", UserWarning)
            grads = torch.func.vmap(torch.func.grad(loss, argnums=tuple(range(1, 10))),
                                    in_dims=(0, *[None] * 9))(xs, *inputs[1:])
        for i, x in enumerate(xs):
            leaves = [t.detach().requires_grad_() for t in inputs[1:]]
            want = torch.autograd.grad(loss(x, *leaves), leaves)
            for name, got, w in zip(NAMES[1:], grads, want, strict=True):
                torch.testing.assert_close(got[i], w, msg=name)
        inner = torch.func.grad(loss)
        with pytest.raises(RuntimeError, match="differentiable once"):
            torch.func.grad(lambda x: inner(x, *inputs[1:]).square().sum())(inputs[0])
        with pytest.raises(RuntimeError, match="differentiable once"):
            torch.func.jacrev(torch.func.jacrev(lambda x: loss(x, *inputs[1:])))(inputs[0])


@pytest.mark.parametrize("backend", FUSED)
def test_double_backward_raises_instead_of_returning_zeros(backend):
    """Differentiable once on the fused backends: a second backward through the gradient op
    raises (its body would give silent zeros)."""
    leaves = [t.requires_grad_() for t in _inputs(3, 2, 4, 5, dtype=torch.float32)]
    with fastseq.use_backend(backend):
        y = layer_norm_lstm_layer(*leaves)[0]
    (grad,) = torch.autograd.grad(y.square().sum(), leaves[0], create_graph=True)
    with pytest.raises(RuntimeError, match="autograd"):
        torch.autograd.grad(grad.square().sum(), leaves[3])


@pytest.mark.parametrize("backend", FUSED)
def test_zero_eps_with_zero_padding_keeps_gradients_finite(backend):
    """With eps = 0 a zero-padded step's input LayerNorm divides by zero; padding must not read it."""
    inputs = _inputs(4, 3, 5, 6, dtype=torch.float32, bias=False)
    lengths = torch.tensor([4, 2, 0], dtype=torch.int32)  # any integer dtype
    inputs[0][2:, 1] = 0
    inputs[0][:, 2] = 0
    leaves = [t if t is None else t.requires_grad_() for t in inputs]
    with fastseq.use_backend(backend):
        y, h_n, c_n = layer_norm_lstm_layer(*leaves, lengths=lengths, eps=0.0)
    grads = torch.autograd.grad((y.sum(), h_n.sum(), c_n.sum()), [t for t in leaves if t is not None])
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("used", [0, 1, 2], ids=["y", "h_n", "c_n"])
def test_gradients_when_only_one_output_is_used(backend, used):
    """Unused outputs reach the backward as None (no zero fills): gradients equal the reference's."""
    inputs = _inputs(5, 3, 4, 6, dtype=torch.float32)
    grads = []
    for name in (backend, "reference"):
        leaves = [t.detach().requires_grad_() for t in inputs]
        with fastseq.use_backend(name):
            out = layer_norm_lstm_layer(*leaves)[used]
        grads.append(torch.autograd.grad(out.square().sum(), leaves))
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("frozen", ["x", "w_ih_w_hh"])
def test_gradients_with_a_frozen_input_or_frozen_weights(backend, frozen):
    """Inputs without requires_grad get no gradient (their GEMMs are left out); the others equal
    the reference's."""
    inputs = _inputs(5, 3, 4, 6, dtype=torch.float32)
    skip = {"x"} if frozen == "x" else {"w_ih", "w_hh"}
    grads = []
    for name in (backend, "reference"):
        leaves = [t.detach().requires_grad_(n not in skip) for n, t in zip(NAMES, inputs,
                                                                           strict=True)]
        with fastseq.use_backend(name):
            y, h_n, c_n = layer_norm_lstm_layer(*leaves)
        wanted = [t for t in leaves if t.requires_grad]
        grads.append(torch.autograd.grad(y.square().sum() + c_n.sum(), wanted))
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@needs_cpp
def test_cpp_backward_leaves_out_what_is_not_asked_for():
    inputs = _inputs(4, 3, 5, 6, dtype=torch.float32)
    args = (*inputs, None, False, 1e-5)
    out = torch.ops.fastseq.layer_norm_lstm_forward(*args, True)
    upstream = [torch.randn_like(t) for t in out[:3]]
    x, h0, c0, w_ih, w_hh, bias, *norms = inputs
    grad_args = (*upstream, x, h0, c0, w_ih, w_hh, *norms, None, False, 1e-5, True, *out[3:])
    full = torch.ops.fastseq.layer_norm_lstm_backward(*grad_args, True, True)
    part = torch.ops.fastseq.layer_norm_lstm_backward(*grad_args, False, False)
    for index, (a, b) in enumerate(zip(part, full, strict=True)):
        if index in (0, 3, 4):  # grad_x, grad_w_ih, grad_w_hh
            assert a is None, f"gradient {index}"
        else:
            assert torch.equal(a, b), f"gradient {index}"


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("shape", [(0, 3, 4, 5), (4, 0, 4, 5)], ids=["no_steps", "empty_batch"])
def test_fused_layer_empty_inputs(backend, shape):
    inputs = _inputs(*shape, dtype=torch.float32)
    (y, h_n, c_n), grads = _run(inputs, None, False,
                                [torch.ones(shape[0], shape[1], shape[3]),
                                 torch.ones(shape[1], shape[3]), torch.ones(shape[1], shape[3])],
                                backend)
    assert y.shape == (shape[0], shape[1], shape[3])
    torch.testing.assert_close(h_n, inputs[1])
    torch.testing.assert_close(c_n, inputs[2])
    for g, t in zip(grads, [t for t in inputs if t is not None], strict=True):
        assert g.shape == t.shape


@needs_cpp
@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_cpp_layer_under_lower_cpu_capabilities(capability):
    """The baseline-ISA row math, which an AVX-512 machine never takes by itself (ATen reads
    ATEN_CPU_CAPABILITY once per process, so the tests run in a child)."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k",
         "matches_reference and cpu-fp32", os.path.abspath(__file__)],
        env=env, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-3000:]


@pytest.mark.parametrize("backend", FUSED)
def test_fake_matches_real_strides_and_shapes(backend):
    inputs = _inputs(3, 2, 4, 5, dtype=torch.float32)
    args = (*inputs, torch.tensor([3, 1]), True, 1e-5, True, backend)
    torch.library.opcheck(torch.ops.fastseq.layer_norm_lstm_layer, args,
                          test_utils=("test_faketensor",))


@pytest.mark.skipif("triton" not in FUSED, reason="Triton unavailable")
def test_forced_backend_falls_back_with_a_warning():
    inputs = _inputs(3, 2, 4, 5, dtype=torch.float64)
    with fastseq.use_backend("triton"), pytest.warns(UserWarning, match="dtype torch.float64"):
        got = layer_norm_lstm_layer(*inputs)
    want = ref.layer_norm_lstm_layer(*inputs)
    torch.testing.assert_close(got, want)


@needs_cpp
@pytest.mark.parametrize("change, match", [
    (lambda a: a.__setitem__(6, a[6][:-1]), "ln_ih must have shape"),
    (lambda a: a.__setitem__(9, a[9].double()), "ln_c_bias must have dtype"),
    (lambda a: a.__setitem__(4, a[4][:, :-1]), "w_hh must have shape"),
    (lambda a: a.__setitem__(10, torch.tensor([4, 1])), r"lengths\[0\] = 4 is outside"),
    (lambda a: a.__setitem__(12, -1.0), "eps must be finite and >= 0"),
    (lambda a: a.__setitem__(10, torch.tensor([3, 1], dtype=torch.int32)), "lengths must be int64"),
], ids=["ln_ih_shape", "ln_c_bias_dtype", "w_hh_shape", "lengths_too_long", "negative_eps",
        "lengths_int32"])
def test_bad_inputs_raise_clear_errors(change, match):
    args = [*_inputs(3, 2, 4, 5, dtype=torch.float32), None, False, 1e-5, False]
    change(args)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fastseq.layer_norm_lstm_forward(*args)


def _layer_norm_lstm_by_hand(module, x, lengths):
    """The LayerNorm-LSTM written out step by step, one sequence at a time, from the module's
    parameters (float64): the oracle for LayerNormLSTM's wiring of layers, directions and lengths."""
    def ln(v, weight, bias=None):
        v = (v - v.mean(-1, keepdim=True)) / (v.var(-1, unbiased=False, keepdim=True) + module.eps).sqrt()
        return v * weight + (0 if bias is None else bias)

    p = dict(module.named_parameters())
    outputs = []
    for b in range(x.shape[1]):
        seq = x[: int(lengths[b]), b]
        for layer in range(module.num_layers):
            outs = []
            for suffix in ("", "_reverse")[: 2 if module.bidirectional else 1]:
                def w(name, suffix=suffix, layer=layer):
                    return p[f"{name}_l{layer}{suffix}"]
                h = c = torch.zeros(module.hidden_size, dtype=x.dtype)
                ys = {}
                order = range(len(seq) - 1, -1, -1) if suffix else range(len(seq))
                for t in order:
                    pre = (ln(w("weight_ih") @ seq[t], w("layernorm_ih_weight"))
                           + ln(w("weight_hh") @ h, w("layernorm_hh_weight")) + w("bias_ih") + w("bias_hh"))
                    i, f, g, o = pre.chunk(4)
                    c = f.sigmoid() * c + i.sigmoid() * g.tanh()
                    h = o.sigmoid() * ln(c, w("layernorm_c_weight"), w("layernorm_c_bias")).tanh()
                    ys[t] = h
                outs.append(torch.stack([ys[t] for t in range(len(seq))]) if len(seq)
                            else seq.new_zeros(0, module.hidden_size))
            seq = torch.cat(outs, -1)
        outputs.append(seq)
    return outputs


@pytest.mark.parametrize("config", [dict(), dict(num_layers=2, bidirectional=True)], ids=["one", "two_bidir"])
def test_layer_norm_lstm_matches_step_by_step_oracle(config):
    torch.manual_seed(0)
    module = fastseq.nn.LayerNormLSTM(5, 7, **config).double()
    with torch.no_grad():  # move the LayerNorms off the identity so that they are exercised
        for name, param in module.named_parameters():
            if name.startswith("layernorm_"):
                param.add_(torch.randn_like(param) * 0.3)
    x = torch.randn(6, 4, 5, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([6, 2, 1, 0])
    y, (h, c) = module(x, lengths=lengths)
    want = _layer_norm_lstm_by_hand(module, x, lengths)
    for b, seq in enumerate(want):
        torch.testing.assert_close(y[: len(seq), b], seq)
        assert torch.equal(y[len(seq):, b], torch.zeros_like(y[len(seq):, b]))
    weights = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    grads = torch.autograd.grad((y * weights).sum(), [x, *module.parameters()])
    want_loss = sum((seq * weights[: len(seq), b]).sum() for b, seq in enumerate(want) if len(seq))
    want_grads = torch.autograd.grad(want_loss, [x, *module.parameters()])
    for name, g, w in zip(["x", *dict(module.named_parameters())], grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, msg=name)


def test_layer_norm_lstm_state_dict_and_compile():
    module = fastseq.nn.LayerNormLSTM(5, 6, num_layers=2, batch_first=True)
    names = set(module.state_dict())
    assert {"weight_ih_l1", "bias_hh_l0", "layernorm_ih_weight_l0", "layernorm_c_bias_l1"} <= names
    assert set(torch.nn.LSTM(5, 6, num_layers=2).state_dict()) <= names
    assert torch.equal(module.layernorm_c_weight_l0, torch.ones(6))
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 4, 5, requires_grad=True)
    y, _ = compiled(x)
    y.sum().backward()
    torch.testing.assert_close(y, module(x)[0])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("hidden", [19, 700])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_triton_layer_on_the_gpu(dtype, hidden, with_lengths):
    """The Triton backend compiled for real: outputs and gradients against the float64 reference
    on the CPU, within the rule against the same reference on the GPU in ``dtype``."""
    shape = (9, 6, 13, hidden)
    truth_in = _inputs(*shape)
    lengths = torch.tensor([9, 4, 1, 0, 9, 7]) if with_lengths else None
    g = torch.Generator().manual_seed(1)
    upstream = [torch.randn(9, 6, hidden, dtype=torch.float64, generator=g),
                torch.randn(6, hidden, dtype=torch.float64, generator=g),
                torch.randn(6, hidden, dtype=torch.float64, generator=g)]
    truth = _run(truth_in, lengths, True, upstream, "reference")
    low_in = [t.to("cuda", dtype) for t in truth_in]
    cuda_lengths = lengths.cuda() if lengths is not None else None
    cuda_upstream = [u.cuda() for u in upstream]
    got = _run(low_in, cuda_lengths, True, cuda_upstream, "triton")
    low = _run(low_in, cuda_lengths, True, cuda_upstream, "reference")
    for g_, t, lo in zip([*got[0], *got[1]], [*truth[0], *truth[1]], [*low[0], *low[1]],
                         strict=True):
        ulps = 16 * torch.finfo(dtype).eps * t.abs().max().item()
        assert_within_rule(g_.cpu(), t, lo.cpu(), factor=4.0,
                           floor=ulps if dtype == torch.float32 else None)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("index, bad, match", [
    (6, lambda t: t[:-1], r"ln_ih must have shape \(24,\)"),
    (9, lambda t: t[:-2], r"ln_c_bias must have shape \(6,\)"),
    (5, lambda t: t[:-3], r"bias must have shape \(24,\)"),
    (8, lambda t: t.double(), "ln_c_weight must be torch.float32"),
    (1, lambda t: t[:1], r"h0 must have shape \(2, 6\)"),
], ids=["ln_ih", "ln_c_bias", "bias", "ln_c_weight_dtype", "h0"])
def test_functional_checks_inputs_before_any_kernel(backend, index, bad, match):
    inputs = _inputs(3, 2, 4, 6, dtype=torch.float32)
    inputs[index] = bad(inputs[index])
    with fastseq.use_backend(backend), pytest.raises(ValueError, match=match):
        layer_norm_lstm_layer(*inputs)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("lengths", [torch.tensor([1]), torch.tensor([4, 1]),
                                     torch.tensor([2.5, 1.0]), torch.tensor([True, False])],
                         ids=["wrong_size", "past_T", "float", "bool"])
def test_functional_checks_lengths(backend, lengths):
    with fastseq.use_backend(backend), pytest.raises(ValueError, match="lengths must"):
        layer_norm_lstm_layer(*_inputs(3, 2, 4, 6, dtype=torch.float32), lengths=lengths)


@pytest.mark.parametrize("backend", FUSED)
def test_inference_matches_training_forward(backend):
    """Without grad nothing per step is kept; the outputs are the training forward's."""
    inputs = _inputs(5, 3, 4, 6, dtype=torch.float32)
    lengths = torch.tensor([5, 2, 0])
    with fastseq.use_backend(backend):
        with torch.no_grad():
            inference = layer_norm_lstm_layer(*inputs, lengths=lengths, reverse=True)
        training = layer_norm_lstm_layer(*[t.requires_grad_() for t in inputs], lengths=lengths,
                                         reverse=True)
    for a, b in zip(inference, training, strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)
    unsaved = torch.ops.fastseq.layer_norm_lstm_layer(*inputs, lengths, True, 1e-5, False, backend)
    assert all(t.numel() == 0 for t in unsaved[3:])
