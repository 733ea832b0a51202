"""One LayerNorm-LSTM layer (one direction) as a torch op: ``torch.ops.fastseq.layer_norm_lstm_layer``.

The model is :func:`fastseq.reference.lstm.layer_norm_lstm_layer` (Ba et al. 2016, as haste's
LayerNormLSTM): the input and recurrent projections are each layer-normalised over their 4H
features, and the cell over its H before its tanh. Backends:

* ``cpu``: the C++ layer (``torch.ops.fastseq.layer_norm_lstm_forward`` / ``_backward``,
  csrc/cpu/layer_norm_lstm.cpp), float32 and float64: one GEMM for the input projection of all
  steps, then every block of sequences runs through the steps on its own thread with a GEMM and
  fused pointwise and LayerNorm math per step; backward through time in C++. bfloat16 runs it in
  float32 (inputs converted on the way in, outputs rounded once on the way out, gradients
  converted back by autograd), as the fused GPU kernels compute in float32 too;
* ``triton``: the same plan driven from Python, a cuBLAS GEMM and one fused Triton kernel per step
  (kernels/layer_norm_lstm.py), float32, bfloat16 and float16, H up to 4096;
* ``reference``: the plain-PyTorch loop, differentiated by autograd; every other case, and the only
  backend with double backward.

Eager calls skip the dispatcher's custom-op layers, as :mod:`fastseq.ops.lstm`'s do.

Both fused backends save the same tensors for the backward: the activated gates, the cells, the
state entering each step (transposed, (H, T, B)), the normalised projections x_hat and r_hat, and
per row [1/std of x W_ih^T, 1/std of h W_hh^T, mean and 1/std of c]. Cells and statistics are kept
in at least float32.
"""

from __future__ import annotations

import functools

import torch

from fastseq import _backend, _extension
from fastseq.ops import eager
from fastseq.ops.checks import fail
from fastseq.ops.lstm import (
    cell_dtype,
    check_like_x,
    checked_lengths,
    contiguous_in,
    layer_sizes,
    output_grads,
)
from fastseq.reference import lstm as reference

CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)  # bfloat16: computed in float32
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TRITON_MAX_HIDDEN = 4096  # one program holds a row's 4H features
_SAVED = 6  # gates, cells, h_in, x_hat, r_hat, stats


# torch.compile runs the choice while tracing and keeps its answer (it looks up the extension,
# which Dynamo cannot trace); its arguments are constants there. A compiled module therefore keeps
# the backend it was traced with.
@torch.compiler.assume_constant_result
def _backend_for(device: torch.device, dtype: torch.dtype, hidden: int) -> str:
    reasons = {"cuda": "no CUDA LayerNorm-LSTM kernel"}
    if dtype not in CPU_DTYPES:
        reasons["cpu"] = f"dtype {dtype} (the C++ layer takes float32, float64 and bfloat16)"
    elif not _extension.has_op("layer_norm_lstm_forward"):
        reasons["cpu"] = "the C++ LayerNorm-LSTM layer is not built"
    if dtype not in TRITON_DTYPES:
        reasons["triton"] = f"dtype {dtype}"
    elif hidden > TRITON_MAX_HIDDEN:
        reasons["triton"] = f"hidden size {hidden} > {TRITON_MAX_HIDDEN}"
    return _backend.choose("layer_norm_lstm", device, reasons)


_fail = functools.partial(fail, "layer_norm_lstm_layer")


def _check_inputs(x, h0, c0, w_ih, w_hh, bias, ln_ih, ln_hh, ln_c_weight, ln_c_bias, lengths):
    """Shapes, dtypes and devices of a layer's inputs, before any kernel runs; returns lengths as
    int64 on x's device (or None)."""
    steps, batch, input_size, hidden = layer_sizes(x, w_ih, _fail)
    check_like_x(x, {"h0": (h0, (batch, hidden)), "c0": (c0, (batch, hidden)),
                     "w_ih": (w_ih, (4 * hidden, input_size)), "w_hh": (w_hh, (4 * hidden, hidden)),
                     "bias": (bias, (4 * hidden,)), "ln_ih": (ln_ih, (4 * hidden,)),
                     "ln_hh": (ln_hh, (4 * hidden,)), "ln_c_weight": (ln_c_weight, (hidden,)),
                     "ln_c_bias": (ln_c_bias, (hidden,))}, _fail)
    return None if lengths is None else checked_lengths(lengths, steps, batch, x.device, _fail)


# ------------------------------------------------------------------------------------------------
# The Triton backend: a Python loop over the steps, one GEMM and one fused kernel each.

def _active_rows(lengths, steps, batch, device):
    """(T, B, 1) bool: which (step, row) are inside their sequence; None without lengths."""
    if lengths is None:
        return None
    return (torch.arange(steps, device=device)[:, None] < lengths[None, :])[..., None]


def _triton_forward(x, h0, c0, w_ih, w_hh, bias, ln_ih, ln_hh, ln_c_weight, ln_c_bias, lengths,
                    reverse, eps, save):
    from fastseq.kernels import layer_norm_lstm as kernels

    steps, batch, _ = x.shape
    hidden = c0.shape[1]
    acc = cell_dtype(x.dtype)
    q = (x.flatten(0, 1) @ w_ih.t()).to(acc)
    x_hat, _, rstd = torch.native_layer_norm(q, [4 * hidden], None, None, eps)
    stats = x.new_zeros(steps, batch, 4, dtype=acc)
    stats[..., 0] = rstd.view(steps, batch)
    x_hat = x_hat.to(x.dtype).view(steps, batch, 4 * hidden)
    y = x.new_empty(steps, batch, hidden)
    kept = steps if save else 1  # without saving, one step's scratch serves every step
    gates = x.new_empty(kept, batch, 4 * hidden)
    r_hat = x.new_empty(kept, batch, 4 * hidden)
    cells = x.new_empty(kept, batch, hidden, dtype=acc)
    h_in = x.new_empty(hidden, steps, batch) if save else None
    h, c = h0.clone(), c0.to(acc, copy=True)
    for t in reference.step_order(steps, reverse):
        k = t if save else 0
        if save:
            h_in[:, t] = h.t()
        torch.mm(h, w_hh.t(), out=r_hat[k])
        kernels.cell_forward(r_hat[k], x_hat[t], ln_ih, ln_hh, bias, ln_c_weight, ln_c_bias, h, c,
                             y[t], gates[k], stats[t], cells[k], lengths, t, eps)
    return y, h, c.to(c0.dtype), gates, cells, h_in, x_hat, r_hat, stats


def _triton_backward(grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, ln_ih, ln_hh, ln_c_weight,
                     ln_c_bias, lengths, reverse, has_bias, gates, cells, h_in, x_hat, r_hat,
                     stats, needs_grad_x, needs_grad_weights):
    from fastseq.kernels import layer_norm_lstm as kernels

    steps, batch, _ = x.shape
    hidden = c0.shape[1]
    acc = cell_dtype(x.dtype)
    dh, dc = grad_h_n.clone(), grad_c_n.to(acc, copy=True)
    dpre, dr = torch.empty_like(gates), torch.empty_like(gates)
    part_w = x.new_empty(steps, batch, hidden, dtype=acc)
    part_b = torch.empty_like(part_w)
    c_prev = c0.to(acc)
    order = list(reference.step_order(steps, reverse))
    for k in range(steps - 1, -1, -1):
        t = order[k]
        kernels.cell_backward(gates[t], cells[t], c_prev if k == 0 else cells[order[k - 1]],
                              r_hat[t], stats[t], ln_hh, ln_c_weight, ln_c_bias, grad_y[t], dh, dc,
                              dpre[t], dr[t], part_w[t], part_b[t], lengths, t)
        dh.addmm_(dr[t], w_hh)
    # Over all steps at once: the input LayerNorm's backward, the GEMMs and the parameter sums.
    # Padding rows have d pre = 0; their x_hat is left out (not finite for a constant row at
    # eps = 0).
    d = dpre.to(acc)
    xh = x_hat.to(acc)
    active = _active_rows(lengths, steps, batch, x.device)
    if active is not None:
        xh = torch.where(active, xh, 0)
    e = d * ln_ih.to(acc)
    dq = (e - e.mean(-1, keepdim=True) - xh * (e * xh).mean(-1, keepdim=True)) * stats[..., :1]
    if active is not None:
        dq = torch.where(active, dq, 0)
    dq = dq.to(x.dtype).flatten(0, 1)
    flat_dr = dr.flatten(0, 1)
    grad_x = (dq @ w_ih).view_as(x) if needs_grad_x else None
    grad_w_ih = dq.t() @ x.flatten(0, 1) if needs_grad_weights else None
    grad_w_hh = flat_dr.t() @ h_in.flatten(1).t() if needs_grad_weights else None
    sums = [d.sum((0, 1)) if has_bias else None, (d * xh).sum((0, 1)),
            (d * r_hat.to(acc)).sum((0, 1)), part_w.sum((0, 1)), part_b.sum((0, 1))]
    like = [w_ih, ln_ih, ln_hh, ln_c_weight, ln_c_bias]
    gbias, *g_norms = [s if s is None else s.to(p.dtype) for s, p in zip(sums, like, strict=True)]
    return grad_x, dh, dc.to(c0.dtype), grad_w_ih, grad_w_hh, gbias, *g_norms


# ------------------------------------------------------------------------------------------------
# The op.

def _layer_forward(x, h0, c0, w_ih, w_hh, bias, ln_ih, ln_hh, ln_c_weight, ln_c_bias, lengths,
                   reverse, eps, save, backend):
    """The body of :func:`layer_norm_lstm_op`."""
    _extension.load()  # a graph loaded by torch.export may run this before anything else did
    args = (x, h0, c0, w_ih, w_hh, bias, ln_ih, ln_hh, ln_c_weight, ln_c_bias, lengths, reverse, eps)
    if backend == "cpu":
        return tuple(torch.ops.fastseq.layer_norm_lstm_forward(*args, save))
    out = _triton_forward(*args, save)
    return out if save else (*out[:3], *(x.new_empty(0) for _ in range(_SAVED)))


@torch.library.custom_op("fastseq::layer_norm_lstm_layer", mutates_args=())
def layer_norm_lstm_op(
    x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
    bias: torch.Tensor | None, ln_ih: torch.Tensor, ln_hh: torch.Tensor, ln_c_weight: torch.Tensor,
    ln_c_bias: torch.Tensor, lengths: torch.Tensor | None, reverse: bool, eps: float, save: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h_n, c_n) and, with ``save``, what the backward takes (empty tensors otherwise), on
    ``backend`` ("cpu" or "triton")."""
    return _layer_forward(x, h0, c0, w_ih, w_hh, bias, ln_ih, ln_hh, ln_c_weight, ln_c_bias, lengths,
                          reverse, eps, save, backend)


@layer_norm_lstm_op.register_fake
def _(x, h0, c0, w_ih, w_hh, bias, ln_ih, ln_hh, ln_c_weight, ln_c_bias, lengths, reverse, eps,
      save, backend):
    steps, batch, _ = x.shape
    hidden = c0.shape[1]
    outputs = (x.new_empty(steps, batch, hidden), torch.empty_like(h0), torch.empty_like(c0))
    if not save:
        return (*outputs, *(x.new_empty(0) for _ in range(_SAVED)))
    rows = (steps, batch)
    acc = cell_dtype(x.dtype)
    return (*outputs, x.new_empty(*rows, 4 * hidden), x.new_empty(*rows, hidden, dtype=acc),
            x.new_empty(hidden, *rows), x.new_empty(*rows, 4 * hidden),
            x.new_empty(*rows, 4 * hidden), x.new_empty(*rows, 4, dtype=acc))


def _layer_grad(grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, ln_ih, ln_hh, ln_c_weight,
                ln_c_bias, lengths, reverse, eps, has_bias, gates, cells, h_in, x_hat, r_hat, stats,
                needs_grad_x, needs_grad_weights, backend):
    """The body of :func:`layer_norm_lstm_grad_op`."""
    _extension.load()  # a graph loaded by torch.export may run this before anything else did
    if backend == "cpu":
        grads = torch.ops.fastseq.layer_norm_lstm_backward(
            grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, ln_ih, ln_hh, ln_c_weight,
            ln_c_bias, lengths, reverse, eps, has_bias, gates, cells, h_in, x_hat, r_hat, stats,
            needs_grad_x, needs_grad_weights)
    else:
        grads = _triton_backward(grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, ln_ih, ln_hh,
                                 ln_c_weight, ln_c_bias, lengths, reverse, has_bias, gates, cells,
                                 h_in, x_hat, r_hat, stats, needs_grad_x, needs_grad_weights)
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@torch.library.custom_op("fastseq::layer_norm_lstm_layer_grad", mutates_args=())
def layer_norm_lstm_grad_op(
    grad_y: torch.Tensor, grad_h_n: torch.Tensor, grad_c_n: torch.Tensor, x: torch.Tensor,
    h0: torch.Tensor, c0: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
    ln_ih: torch.Tensor, ln_hh: torch.Tensor, ln_c_weight: torch.Tensor, ln_c_bias: torch.Tensor,
    lengths: torch.Tensor | None, reverse: bool, eps: float, has_bias: bool, gates: torch.Tensor,
    cells: torch.Tensor, h_in: torch.Tensor, x_hat: torch.Tensor, r_hat: torch.Tensor,
    stats: torch.Tensor, needs_grad_x: bool, needs_grad_weights: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (x, h0, c0, w_ih, w_hh, bias, ln_ih, ln_hh, ln_c_weight, ln_c_bias) of
    :func:`layer_norm_lstm_op` (bias's empty when the layer has none; x's unless
    ``needs_grad_x`` and w_ih's and w_hh's unless ``needs_grad_weights`` empty too: GEMMs left
    out)."""
    return _layer_grad(grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, ln_ih, ln_hh, ln_c_weight,
                       ln_c_bias, lengths, reverse, eps, has_bias, gates, cells, h_in, x_hat, r_hat,
                       stats, needs_grad_x, needs_grad_weights, backend)


@layer_norm_lstm_grad_op.register_fake
def _(grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias,
      lengths, reverse, eps, has_bias, gates, cells, h_in, x_hat, r_hat, stats, needs_grad_x,
      needs_grad_weights, backend):
    def like(t, needed=True):
        return torch.empty_like(t) if needed else x.new_empty(0)

    return (like(x, needs_grad_x), like(h0), like(c0), like(w_ih, needs_grad_weights),
            like(w_hh, needs_grad_weights), x.new_empty(w_ih.shape[0] if has_bias else 0),
            *(torch.empty_like(t) for t in (ln_ih, ln_hh, ln_c_weight, ln_c_bias)))


def _setup(ctx, inputs, output):
    x, h0, c0, w_ih, w_hh, bias, ln_ih, ln_hh, ln_c_weight, ln_c_bias, lengths, reverse, eps, _, \
        backend = inputs
    ctx.save_for_backward(x, h0, c0, w_ih, w_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias, lengths,
                          *output[3:])
    ctx.reverse, ctx.eps, ctx.has_bias, ctx.backend = reverse, eps, bias is not None, backend
    ctx.set_materialize_grads(False)  # no zero fills for the saved outputs (as lstm_layer)
    ctx.needs_grad_x = ctx.needs_input_grad[0]  # each a GEMM over every step, as lstm_layer
    ctx.needs_grad_weights = any(ctx.needs_input_grad[3:5])


def _backward_through(layer_grad):
    """The layer's backward, its gradients computed by ``layer_grad``: the gradient op (what a
    traced graph holds) or its body (eager calls)."""
    def backward(ctx, grad_y, grad_h_n, grad_c_n, *_unused):
        x, h0, c0, w_ih, w_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias, lengths, *saved = \
            ctx.saved_tensors
        grads = layer_grad(*output_grads(grad_y, grad_h_n, grad_c_n, x, h0, c0), x, h0, c0, w_ih,
                           w_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias, lengths, ctx.reverse,
                           ctx.eps, ctx.has_bias, *saved, ctx.needs_grad_x,
                           ctx.needs_grad_weights, ctx.backend)
        gx, gh0, gc0, gw_ih, gw_hh, gbias, *g_norms = grads
        weights = ctx.needs_grad_weights
        return (gx if ctx.needs_grad_x else None, gh0, gc0, gw_ih if weights else None,
                gw_hh if weights else None, gbias if ctx.has_bias else None, *g_norms, None, None,
                None, None, None)

    return backward


layer_norm_lstm_op.register_autograd(_backward_through(layer_norm_lstm_grad_op),
                                     setup_context=_setup)


@layer_norm_lstm_op.register_vmap
def _vmap_layer(info, in_dims, *args):
    """The layer under vmap (torch.func): one call per vmapped member."""
    return eager.one_call_per_member(layer_norm_lstm_op, info.batch_size, in_dims, args)


@layer_norm_lstm_grad_op.register_vmap
def _vmap_layer_grad(info, in_dims, *args):
    """The gradient under vmap: one call per member, whose weight gradients are its own."""
    return eager.one_call_per_member(layer_norm_lstm_grad_op, info.batch_size, in_dims, args)


_EagerLayer = eager.autograd_function(
    "LayerNormLSTMLayer", _layer_forward, _setup,
    _backward_through(eager.gradient(layer_norm_lstm_grad_op, _layer_grad)),
    layer_norm_lstm_op, _backward_through(eager.differentiable_once(layer_norm_lstm_grad_op)))


def layer_norm_lstm_layer(x, h0, c0, w_ih, w_hh, bias, ln_ih, ln_hh, ln_c_weight, ln_c_bias,
                          lengths=None, reverse=False, eps=1e-5):
    """One LayerNorm-LSTM layer; returns ``(y (T, B, H), h_n (B, H), c_n (B, H))``. Differentiable
    once (double backward: the reference backend).

    Shapes as :func:`fastseq.ops.lstm.lstm_layer` (no projection), plus the LayerNorm gains
    ``ln_ih``, ``ln_hh`` (4H) and the cell's ``ln_c_weight``, ``ln_c_bias`` (H); ``lengths`` (B,)
    integers; formulas in :func:`fastseq.reference.lstm.layer_norm_lstm_layer`. Raises
    ValueError, naming the argument, on inputs of the wrong shape, dtype or device.
    """
    lengths = _check_inputs(x, h0, c0, w_ih, w_hh, bias, ln_ih, ln_hh, ln_c_weight, ln_c_bias,
                            lengths)
    return run_layer_norm_lstm_layer(x, h0, c0, w_ih, w_hh, bias, ln_ih, ln_hh, ln_c_weight,
                                     ln_c_bias, lengths, reverse, eps)


def run_layer_norm_lstm_layer(x, h0, c0, w_ih, w_hh, bias, ln_ih, ln_hh, ln_c_weight, ln_c_bias,
                              lengths=None, reverse=False, eps=1e-5):
    """:func:`layer_norm_lstm_layer` without its input checks, for callers that made them
    (``fastseq.nn.LayerNormLSTM`` checks once per call, not once per layer); ``lengths`` int64 on
    x's device."""
    backend = _backend_for(x.device, x.dtype, c0.shape[-1])
    if backend == "reference":
        return reference.layer_norm_lstm_layer(x, h0, c0, w_ih, w_hh, bias, ln_ih, ln_hh,
                                               ln_c_weight, ln_c_bias, lengths, reverse, eps)
    dtype = x.dtype
    # The C++ layer has no bfloat16 kernels: it runs in float32 between two differentiable casts.
    compute = torch.float32 if backend == "cpu" and dtype == torch.bfloat16 else dtype
    tensors = contiguous_in(compute, (x, h0, c0, w_ih, w_hh, bias, ln_ih, ln_hh, ln_c_weight,
                                      ln_c_bias))
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    outputs = eager.call(layer_norm_lstm_op, _EagerLayer, *tensors, lengths, reverse, float(eps),
                         save, backend, differentiable=save)[:3]
    return outputs if compute == dtype else tuple(t.to(dtype) for t in outputs)
