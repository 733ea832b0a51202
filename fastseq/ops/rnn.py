"""One Elman RNN layer (one direction) as torch ops: ``torch.ops.fastseq.rnn_layer`` and its gradient.

``h_t = act(x_t W_ih^T + h_{t-1} W_hh^T + bias)``, ``act`` tanh or relu, as ``torch.nn.RNN``. The
forward returns ``(y, h_n)``; the backward needs only ``y`` of what the forward computed (the
activations' derivatives are functions of the outputs), so nothing else is kept. Backends:

* ``cpu``: the C++ layer (``torch.ops.fastseq.rnn_layer_forward`` / ``_backward``,
  csrc/cpu/rnn.cpp): one GEMM for the input projection of all steps, then per step a GEMM on
  W_hh packed once per call and the activation fused behind it, all steps in one parallel region;
  backward through time in C++ with grad_x and the weight gradients as GEMMs over all steps.
  With ``lengths`` it works on the real rows only, as a PackedSequence lays them out. float32,
  float64 and bfloat16 (float16 runs in float32 between two casts);
* ``triton``: the input projection and the weight gradients as cuBLAS GEMMs over all steps,
  and each step's recurrent product with its whole pointwise tail in one Triton launch
  (:mod:`fastseq.kernels.rnn`): forward and backward through time. float32, float16, bfloat16;
  the default on the GPU;
* ``cuda``: the same GEMMs, and the whole recurrence in one persistent kernel with W_hh kept in
  shared memory (``rnn_recurrence_forward`` / ``_backward``, csrc/cuda/rnn.cu), where W_hh fits
  on chip. Not the default until a GPU benchmark shows it faster than the ``triton`` steps;
  ``fastseq.use_backend("cuda")`` takes it;
* ``reference``: the plain-PyTorch loop of :mod:`fastseq.reference.rnn`, and its backward
  through time written out below. float64 on the GPU takes it, with a one-time warning.

Eager calls run the op's body and autograd directly (:mod:`fastseq.ops.eager`); ``torch.compile``
and ``torch.export`` trace the registered ops.

Padding is handled by ``lengths`` (B,): steps at or past ``lengths[b]`` keep the state and output
zeros; they need not be sorted.
"""

from __future__ import annotations

import functools

import torch

from fastseq import _backend, _extension
from fastseq.ops import eager
from fastseq.ops.checks import KERNEL_DTYPES, fail, warn_once
from fastseq.ops.lstm import (
    check_like_x,
    checked_lengths,
    contiguous_in,
    input_projection,
    persistent_unsupported,
    previous_states,
)
from fastseq.reference import rnn as reference
from fastseq.reference.lstm import step_order

_fail = functools.partial(fail, "rnn_layer")

NONLINEARITIES = tuple(reference.ACTIVATIONS)
# float16 runs the C++ layer in float32 (run_rnn_layer casts); float64 is there for exact tests.
_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


# torch.compile runs the choice while tracing and keeps its answer, as the LSTM's does.
@torch.compiler.assume_constant_result
def _backend_for(device: torch.device, dtype: torch.dtype, hidden: int) -> str:
    """The backend of one layer call: the C++ layer on the CPU, the Triton steps on the GPU."""
    reasons = {}
    if dtype not in KERNEL_DTYPES:
        reasons["triton"] = reasons["cuda"] = f"dtype {dtype}"
    if dtype not in _CPU_DTYPES:
        reasons["cpu"] = f"dtype {dtype}"
    elif not _extension.has_op("rnn_layer_forward"):
        reasons["cpu"] = "the C++ RNN layer is not built"
    if device.type == "cuda":
        reasons.setdefault("cuda", persistent_unsupported("rnn_persistent_units", device, dtype,
                                                          hidden))
    return _backend.choose("rnn", device, {name: why for name, why in reasons.items() if why})


def _warn_if_fallback(backend, x):
    """Announce, once, the reference path where it was not asked for (float64 on a GPU, an
    unbuilt extension)."""
    if torch.compiler.is_compiling() or backend != "reference" \
            or _backend.forced_backend() is not None:
        return
    if x.device.type != "cpu":
        warn_once("rnn_layer", f"no {x.device.type} kernel for the Elman RNN in {x.dtype}")
    elif not _extension.has_op("rnn_layer_forward"):
        warn_once("rnn_layer", "the C++ RNN layer is not built")


def _check_inputs(x, h0, w_ih, w_hh, bias, lengths, nonlinearity):
    """Shapes, dtypes and devices of :func:`rnn_layer`'s inputs, before any kernel runs; returns
    lengths as int64 on x's device (or None)."""
    for name, t in (("x", x), ("w_ih", w_ih)):
        if not isinstance(t, torch.Tensor):
            _fail(f"{name} must be a tensor, got {type(t).__name__}")
    if x.dim() != 3 or not x.is_floating_point():
        _fail(f"x must be a floating (T, B, I) tensor, got {x.dtype} {tuple(x.shape)}")
    if w_ih.dim() != 2:
        _fail(f"w_ih must be (H, I), got shape {tuple(w_ih.shape)}")
    if nonlinearity not in NONLINEARITIES:
        _fail(f"nonlinearity must be one of {NONLINEARITIES}, got {nonlinearity!r}")
    steps, batch, input_size = x.shape
    hidden = w_ih.shape[0]
    check_like_x(x, {"h0": (h0, (batch, hidden)), "w_ih": (w_ih, (hidden, input_size)),
                     "w_hh": (w_hh, (hidden, hidden)), "bias": (bias, (hidden,))}, _fail)
    return None if lengths is None else checked_lengths(lengths, steps, batch, x.device, _fail)


def _triton_forward(x, h0, w_ih, w_hh, bias, lengths, reverse, nonlinearity):
    """The layer on Triton steps: the input projection in one GEMM, then one launch a step."""
    from fastseq.kernels import rnn as kernels

    interpreted = _backend.triton_interpreted()
    pre_x = input_projection(x, w_ih, bias)
    y = torch.empty_like(pre_x)
    # With padding the state and the output differ: two state buffers, each step reading one and
    # writing the other. Without, the state is the previous step's output.
    buffers = (torch.empty_like(h0), torch.empty_like(h0)) if lengths is not None else None
    h = h0
    for k, t in enumerate(step_order(x.shape[0], reverse)):
        h_next = buffers[k % 2] if buffers is not None else None
        kernels.step_forward(h, w_hh, pre_x[t], y[t], h_next, lengths, t, nonlinearity, interpreted)
        h = y[t] if h_next is None else h_next
    return y, h.clone() if h is h0 or buffers is None else h  # h_n never aliases an input or y


def _layer_forward(x, h0, w_ih, w_hh, bias, lengths, reverse, nonlinearity, backend):
    """The body of :func:`rnn_layer_op`."""
    _extension.load()  # a graph loaded by torch.export may run this before anything else did
    if backend == "cpu":
        return tuple(torch.ops.fastseq.rnn_layer_forward(x, h0, w_ih, w_hh, bias, lengths, reverse,
                                                         nonlinearity))
    if backend == "triton":
        return _triton_forward(x, h0, w_ih, w_hh, bias, lengths, reverse, nonlinearity)
    if backend == "cuda":
        return tuple(torch.ops.fastseq.rnn_recurrence_forward(
            input_projection(x, w_ih, bias), h0, w_hh, lengths, reverse, nonlinearity))
    return reference.rnn_layer(x, h0, w_ih, w_hh, bias, lengths, reverse, nonlinearity)


@torch.library.custom_op("fastseq::rnn_layer", mutates_args=())
def rnn_layer_op(
    x: torch.Tensor, h0: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
    bias: torch.Tensor | None, lengths: torch.Tensor | None, reverse: bool, nonlinearity: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer over contiguous x (T, B, I) on ``backend``; returns (y (T, B, H), h_n (B, H))."""
    return _layer_forward(x, h0, w_ih, w_hh, bias, lengths, reverse, nonlinearity, backend)


@rnn_layer_op.register_fake
def _(x, h0, w_ih, w_hh, bias, lengths, reverse, nonlinearity, backend):
    steps, batch, _ = x.shape
    return x.new_empty(steps, batch, w_hh.shape[0]), torch.empty_like(h0)


def _gemm_grads(dpre_all, x, h0, w_ih, y, lengths, reverse, has_bias, needs_grad_x,
                needs_grad_weights):
    """What does not feed the recurrence, over all steps at once, from d pre (T, B, H):
    (grad_x, grad_w_ih, grad_w_hh, grad_bias), None for what is not needed."""
    flat = dpre_all.flatten(0, 1)
    grad_x = (flat @ w_ih).view_as(x) if needs_grad_x else None
    if not needs_grad_weights:
        return grad_x, None, None, None
    grad_w_ih = flat.t() @ x.flatten(0, 1)
    grad_w_hh = flat.t() @ previous_states(y, h0, lengths, reverse).flatten(0, 1)
    return grad_x, grad_w_ih, grad_w_hh, flat.sum(0) if has_bias else None


def _loop_backward(grad_y, grad_h_n, x, h0, w_ih, w_hh, y, lengths, reverse, nonlinearity, has_bias,
                   needs_grad_x, needs_grad_weights, needs_grad_state):
    """Backward through time in plain PyTorch (the ``reference`` backend's gradient)."""
    dpre_all = torch.zeros_like(y)
    dh = grad_h_n
    for t in reversed(step_order(x.shape[0], reverse)):
        g = dh + grad_y[t]
        dpre = g * (1 - y[t] * y[t]) if nonlinearity == "tanh" else torch.where(y[t] > 0, g, 0)
        if lengths is None:
            dh = dpre @ w_hh
        else:  # padding steps pass dh through, and no gradient to pre
            active = (t < lengths)[:, None]
            dpre = torch.where(active, dpre, 0)
            dh = torch.where(active, dpre @ w_hh, dh)
        dpre_all[t] = dpre
    grad_x, grad_w_ih, grad_w_hh, grad_bias = _gemm_grads(
        dpre_all, x, h0, w_ih, y, lengths, reverse, has_bias, needs_grad_x, needs_grad_weights)
    # With no steps dh is grad_h_n itself, which an op may not return.
    grad_h0 = (dh.clone() if dh is grad_h_n else dh) if needs_grad_state else None
    return grad_x, grad_h0, grad_w_ih, grad_w_hh, grad_bias


def _triton_backward(grad_y, grad_h_n, x, h0, w_ih, w_hh, y, lengths, reverse, nonlinearity,
                     has_bias, needs_grad_x, needs_grad_weights, needs_grad_state):
    """Backward through time on Triton steps (one launch a step, plus one for the gradient of
    h0), then the GEMMs over all steps."""
    from fastseq.kernels import rnn as kernels

    interpreted = _backend.triton_interpreted()
    dpre_all = torch.empty_like(y)
    dh = grad_h_n.to(torch.float32, copy=True)  # the carry sums over every step: float32
    later = None  # the step processed after t in the forward
    for t in reversed(step_order(x.shape[0], reverse)):
        kernels.step_backward(None if later is None else dpre_all[later], w_hh, dh, grad_y[t], y[t],
                              dpre_all[t], lengths, t, later, nonlinearity, interpreted)
        later = t
    if needs_grad_state and later is not None:
        kernels.step_backward(dpre_all[later], w_hh, dh, None, None, None, lengths, None, later,
                              nonlinearity, interpreted)
    grad_x, grad_w_ih, grad_w_hh, grad_bias = _gemm_grads(
        dpre_all, x, h0, w_ih, y, lengths, reverse, has_bias, needs_grad_x, needs_grad_weights)
    grad_h0 = dh.to(h0.dtype) if needs_grad_state else None
    return grad_x, grad_h0, grad_w_ih, grad_w_hh, grad_bias


def _persistent_backward(grad_y, grad_h_n, x, h0, w_ih, w_hh, y, lengths, reverse, nonlinearity,
                         has_bias, needs_grad_x, needs_grad_weights, needs_grad_state):
    """Backward through time in one persistent CUDA launch, then the GEMMs over all steps."""
    dpre_all, grad_h0 = torch.ops.fastseq.rnn_recurrence_backward(grad_y, grad_h_n, w_hh, y, lengths,
                                                                  reverse, nonlinearity)
    grad_x, grad_w_ih, grad_w_hh, grad_bias = _gemm_grads(
        dpre_all, x, h0, w_ih, y, lengths, reverse, has_bias, needs_grad_x, needs_grad_weights)
    return grad_x, grad_h0 if needs_grad_state else None, grad_w_ih, grad_w_hh, grad_bias


def _layer_grad(grad_y, grad_h_n, x, h0, w_ih, w_hh, y, lengths, reverse, nonlinearity, has_bias,
                needs_grad_x, needs_grad_weights, needs_grad_state, backend):
    """The body of :func:`rnn_layer_grad_op`."""
    _extension.load()
    args = (grad_y, grad_h_n, x, h0, w_ih, w_hh, y, lengths, reverse, nonlinearity, has_bias,
            needs_grad_x, needs_grad_weights, needs_grad_state)
    if backend == "cpu":
        grads = torch.ops.fastseq.rnn_layer_backward(*args)
    elif backend == "triton":
        grads = _triton_backward(*args)
    elif backend == "cuda":
        grads = _persistent_backward(*args)
    else:
        grads = _loop_backward(*args)
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@torch.library.custom_op("fastseq::rnn_layer_grad", mutates_args=())
def rnn_layer_grad_op(
    grad_y: torch.Tensor, grad_h_n: torch.Tensor, x: torch.Tensor, h0: torch.Tensor,
    w_ih: torch.Tensor, w_hh: torch.Tensor, y: torch.Tensor, lengths: torch.Tensor | None,
    reverse: bool, nonlinearity: str, has_bias: bool, needs_grad_x: bool,
    needs_grad_weights: bool, needs_grad_state: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients [x, h0, w_ih, w_hh, bias] of :func:`rnn_layer_op` (empty when absent or not
    needed: grad_x unless ``needs_grad_x``, the weights' unless ``needs_grad_weights``, h0's unless
    ``needs_grad_state``)."""
    return _layer_grad(grad_y, grad_h_n, x, h0, w_ih, w_hh, y, lengths, reverse, nonlinearity,
                       has_bias, needs_grad_x, needs_grad_weights, needs_grad_state, backend)


@rnn_layer_grad_op.register_fake
def _(grad_y, grad_h_n, x, h0, w_ih, w_hh, y, lengths, reverse, nonlinearity, has_bias, needs_grad_x,
      needs_grad_weights, needs_grad_state, backend):
    def like(t, needed=needs_grad_weights):
        return torch.empty_like(t) if needed else x.new_empty(0)

    bias = x.new_empty(w_hh.shape[0]) if has_bias else x.new_empty(0)
    return (like(x, needs_grad_x), like(h0, needs_grad_state), like(w_ih), like(w_hh),
            like(bias, needs_grad_weights and has_bias))


def _setup(ctx, inputs, output):
    x, h0, w_ih, w_hh, bias, lengths, reverse, nonlinearity, backend = inputs
    y, _ = output
    ctx.save_for_backward(x, h0, w_ih, w_hh, lengths, y)
    ctx.reverse, ctx.nonlinearity, ctx.backend = reverse, nonlinearity, backend
    ctx.has_bias = bias is not None
    # Each of grad_x and the weight gradients is a GEMM over every step, and h0's is the last
    # step's dh GEMM: only those asked for run.
    ctx.needs_grad_x = ctx.needs_input_grad[0]
    ctx.needs_grad_state = ctx.needs_input_grad[1]
    ctx.needs_grad_weights = any(ctx.needs_input_grad[2:5])
    ctx.set_materialize_grads(False)  # an unused output's gradient is zeros made below, once


def _backward_through(layer_grad):
    """The layer's backward, its gradients computed by ``layer_grad``: the gradient op (what a
    traced graph holds) or its body (eager calls)."""
    def backward(ctx, grad_y, grad_h_n):
        x, h0, w_ih, w_hh, lengths, y = ctx.saved_tensors
        grad_y = torch.zeros_like(y) if grad_y is None else grad_y.contiguous()
        grad_h_n = torch.zeros_like(h0) if grad_h_n is None else grad_h_n.contiguous()
        gx, gh0, gw_ih, gw_hh, gbias = layer_grad(
            grad_y, grad_h_n, x, h0, w_ih, w_hh, y, lengths, ctx.reverse, ctx.nonlinearity,
            ctx.has_bias, ctx.needs_grad_x, ctx.needs_grad_weights, ctx.needs_grad_state,
            ctx.backend)
        weights = ctx.needs_grad_weights
        return (gx if ctx.needs_grad_x else None, gh0 if ctx.needs_grad_state else None,
                gw_ih if weights else None, gw_hh if weights else None,
                gbias if weights and ctx.has_bias else None, None, None, None, None)

    return backward


rnn_layer_op.register_autograd(_backward_through(rnn_layer_grad_op), setup_context=_setup)

_EagerLayer = eager.autograd_function(
    "RNNLayer", _layer_forward, _setup,
    _backward_through(eager.gradient(rnn_layer_grad_op, _layer_grad)),
    rnn_layer_op, _backward_through(eager.differentiable_once(rnn_layer_grad_op)))


def rnn_layer(x, h0, w_ih, w_hh, bias=None, lengths=None, reverse=False, nonlinearity="tanh"):
    """Run one Elman RNN layer; returns ``(y (T, B, H), h_n (B, H))``. Differentiable.

    ``x`` (T, B, I), ``h0`` (B, H), ``w_ih`` (H, I), ``w_hh`` (H, H), ``bias`` (H) = ``b_ih +
    b_hh``, all of x's dtype and device; ``lengths`` (B,) integers in [0, T], in any order;
    ``nonlinearity`` ``"tanh"`` or ``"relu"``. Raises ValueError, naming the argument, on inputs
    of the wrong shape, dtype or device. float16 on the CPU runs the C++ layer in float32 between
    two differentiable casts.
    """
    lengths = _check_inputs(x, h0, w_ih, w_hh, bias, lengths, nonlinearity)
    return run_rnn_layer(x, h0, w_ih, w_hh, bias, lengths, reverse, nonlinearity)


def run_rnn_layer(x, h0, w_ih, w_hh, bias=None, lengths=None, reverse=False, nonlinearity="tanh"):
    """:func:`rnn_layer` without its input checks, for callers that made them (``fastseq.nn.RNN``
    checks once per call, not once per layer); ``lengths`` int64 on x's device."""
    dtype = x.dtype
    backend = _backend_for(x.device, dtype, w_hh.shape[0])
    _warn_if_fallback(backend, x)
    compute = torch.float32 if backend == "cpu" and dtype == torch.float16 else dtype
    tensors = contiguous_in(compute, (x, h0, w_ih, w_hh, bias))
    differentiable = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                     for t in tensors)
    lengths = lengths if lengths is None else lengths.contiguous()
    outputs = eager.call(rnn_layer_op, _EagerLayer, *tensors, lengths, reverse, nonlinearity,
                         backend, differentiable=differentiable)
    return outputs if compute == dtype else tuple(t.to(dtype) for t in outputs)
