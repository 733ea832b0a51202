"""One LSTM layer (one direction) as torch ops: ``torch.ops.fastseq.lstm_layer`` and its gradient.

The forward runs the whole recurrence and returns ``(y, h_n, c_n)`` plus what the backward needs
(activated gates, cell states, and the pre-projection outputs when ``w_hr`` is given). Backends:

* ``cpu``: the C++ layer (``torch.ops.fastseq.lstm_layer_forward`` / ``_backward``): one GEMM for
  the input projection of all steps, one GEMM and a fused vectorised cell per step, and backward
  through time in C++ with the weight gradients as GEMMs over all steps;
* ``triton``: the same plan driven from Python, cuBLAS GEMMs plus the fused Triton cell;
* ``cuda``: the input projection and weight gradients as cuBLAS GEMMs, and the whole recurrence
  in one persistent kernel with W_hh kept in shared memory (``lstm_recurrence_forward`` /
  ``_backward``, csrc/cuda/lstm.cu); no projections, and only where the weights fit on chip.
  The default on the GPU where it can run: faster than the ``triton`` plan
  (benchmarks/results/nvidia-h200/lstm.md);
* ``reference``: the same plan with the cell written in PyTorch.

Eager calls run the op's body and autograd directly (:mod:`fastseq.ops.eager`: a tenth of a
millisecond less per training step, what a small ``LSTMCell`` step costs); ``torch.compile`` and
``torch.export`` trace the registered ops.

Padding is handled by ``lengths`` (B,): steps at or past ``lengths[b]`` keep the state and output
zeros, at no extra cost over the padded run.
"""

from __future__ import annotations

import functools

import torch

from fastseq import _backend, _extension
from fastseq.ops import eager
from fastseq.ops.checks import KERNEL_DTYPES, fail, out_of_range, values_known
from fastseq.reference import lstm as reference

_fail = functools.partial(fail, "lstm_layer")


# torch.compile runs the choice while tracing and keeps its answer (the extension lookup is not
# traceable; its arguments are constants there), as layer_norm_lstm's: a compiled module keeps
# the backend it was traced with.
@torch.compiler.assume_constant_result
def _backend_for(device: torch.device, dtype: torch.dtype, hidden: int, projection: bool) -> str:
    """The backend of one layer call: ``hidden`` is W_hh's width (P with a projection).

    float16 on the CPU goes to the C++ layer as well, which :func:`lstm_layer` runs in float32:
    its result is rounded once, not at every step as the float16 reference loop rounds.
    """
    reasons = {}
    if dtype not in KERNEL_DTYPES:
        reasons["triton"] = reasons["cpu"] = reasons["cuda"] = f"dtype {dtype}"
    if not _extension.has_op("lstm_layer_forward"):
        reasons["cpu"] = "the C++ LSTM layer is not built"
    if device.type == "cuda":
        reasons.setdefault("cuda", _persistent_unsupported(device, dtype, hidden, projection))
    reasons = {name: why for name, why in reasons.items() if why}
    return _backend.choose("lstm", device, reasons, prefer="cuda")


def _persistent_unsupported(device, dtype, hidden, projection) -> str | None:
    """Why the persistent CUDA kernel cannot run this layer, or None."""
    if projection:
        return "projections (proj_size)"
    return persistent_unsupported("lstm_persistent_units", device, dtype, hidden)


@functools.cache  # it asks the driver for the device's properties
def persistent_unsupported(plan: str, device, dtype, hidden) -> str | None:
    """Why a persistent CUDA recurrence (its block plan ``fastseq._C.<plan>``) cannot run a layer
    of ``hidden`` units in ``dtype`` on ``device``, or None."""
    ext = _extension.load()
    if not _extension.cuda_built() or not hasattr(ext, plan):
        return "the CUDA kernels are not built"
    props = torch.cuda.get_device_properties(device)
    units = getattr(ext, plan)(hidden, dtype.itemsize, props.multi_processor_count,
                               props.shared_memory_per_block_optin,
                               props.shared_memory_per_multiprocessor)
    return None if units else f"hidden size {hidden}: W_hh does not fit on chip"


def checked_lengths(lengths, steps, batch, device, fail):
    """``lengths`` as int64 (B,) on ``device``, after checking that they are ``batch`` integers in
    [0, steps]. The range reads the values: not under torch.compile, and under vmap (lengths
    per vmapped sequence) the layer's batching rule checks it. ``fail(message)`` raises."""
    lengths = torch.as_tensor(lengths)
    if lengths.shape != (batch,) or lengths.is_floating_point() or lengths.is_complex() \
            or lengths.dtype == torch.bool:
        fail(f"lengths must be {batch} integers, got {tuple(lengths.shape)} {lengths.dtype}")
    lengths = lengths.to(device=device, dtype=torch.int64)
    if values_known(lengths) and lengths.numel() and not _vmapped(lengths):
        _check_range(lengths, steps, fail)
    return lengths.contiguous()


def layer_sizes(x, w_ih, fail):
    """``(steps, batch, input_size, hidden)`` of a layer's ``x`` (T, B, I) and ``w_ih`` (4H, I),
    after checking that both are tensors of those ranks and x is floating point."""
    for name, t in (("x", x), ("w_ih", w_ih)):
        if not isinstance(t, torch.Tensor):
            fail(f"{name} must be a tensor, got {type(t).__name__}")
    if x.dim() != 3 or not x.is_floating_point():
        fail(f"x must be a floating (T, B, I) tensor, got {x.dtype} {tuple(x.shape)}")
    if w_ih.dim() != 2 or w_ih.shape[0] % 4:
        fail(f"w_ih must be (4H, I), got shape {tuple(w_ih.shape)}")
    return (*x.shape, w_ih.shape[0] // 4)


def check_like_x(x, expected, fail):
    """Each ``name: (tensor or None, shape)`` of ``expected`` has that shape, x's dtype and x's
    device: a layer never casts its inputs behind the caller's back."""
    for name, (tensor, shape) in expected.items():
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            fail(f"{name} must be a tensor, got {type(tensor).__name__}")
        if tuple(tensor.shape) != shape:
            fail(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")
        if tensor.dtype != x.dtype or tensor.device != x.device:
            fail(f"{name} must be {x.dtype} on {x.device} (as x), got {tensor.dtype} on "
                 f"{tensor.device}")


def _check_inputs(x, h0, c0, w_ih, w_hh, bias, w_hr, lengths):
    """Shapes, dtypes and devices of :func:`lstm_layer`'s inputs, before any kernel runs; returns
    lengths as int64 on x's device (or None)."""
    steps, batch, input_size, hidden = layer_sizes(x, w_ih, _fail)
    out = hidden if w_hr is None or not isinstance(w_hr, torch.Tensor) else w_hr.shape[0]
    check_like_x(x, {"h0": (h0, (batch, out)), "c0": (c0, (batch, hidden)),
                     "w_ih": (w_ih, (4 * hidden, input_size)), "w_hh": (w_hh, (4 * hidden, out)),
                     "bias": (bias, (4 * hidden,)), "w_hr": (w_hr, (out, hidden))}, _fail)
    return None if lengths is None else checked_lengths(lengths, steps, batch, x.device, _fail)


def _vmapped(t):
    """Whether ``t`` is batched by vmap at some level of functorch's wrappers."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_batchedtensor(t):
            return True
        t = functorch.get_unwrapped(t)
    return False


def _check_range(lengths, steps, fail):
    if out_of_range(lengths, lengths, 0, steps):
        fail(f"lengths must lie in [0, {steps}] (the sequence length), got {lengths.tolist()}")


def contiguous_in(dtype, tensors):
    """``tensors`` contiguous and in ``dtype``, None kept. A ``.to()`` costs most of a microsecond
    even with nothing to do, which a one-step LSTMCell would pay ten times: only those that
    change run."""
    return [t if t is None else (t if t.dtype == dtype else t.to(dtype)).contiguous()
            for t in tensors]


def cell_dtype(dtype):
    """Dtype of the carried cell state: at least float32."""
    return torch.promote_types(dtype, torch.float32)


def _cells(backend):
    """(cell_forward, cell_backward) of the Python-driven loop of ``backend``. They write into
    the step's slices of the saved tensors, so that a step costs the GEMM and one cell launch:

    * ``cell_forward(pre, c_prev, gates, c, m)`` fills gates (B, 4H), c and m (B, H);
    * ``cell_backward(dm, dc, gates, c_prev, c, dpre)`` fills dpre (B, 4H), returns d c_prev.
    """
    if backend != "triton":
        def reference_forward(pre, c_prev, gates, c, m):
            for out, value in zip((gates, c, m), reference.cell_forward(pre, c_prev), strict=True):
                out.copy_(value)

        def reference_backward(dm, dc, gates, c_prev, c, dpre):
            d_pre, dc_prev = reference.cell_backward(dm, dc, gates, c_prev, c)
            dpre.copy_(d_pre)
            return dc_prev

        return reference_forward, reference_backward
    from fastseq.kernels import lstm as kernels

    def backward(dm, dc, gates, c_prev, c, dpre):
        dc_prev = torch.empty_like(c)  # in c's dtype
        kernels.cell_backward(dm.contiguous(), dc.contiguous(), gates, c_prev.contiguous(), c, dpre,
                              dc_prev)
        return dc_prev

    return kernels.cell_forward, backward


def _active(lengths, t, like):
    return None if lengths is None else (t < lengths)[:, None]


def input_projection(x, w_ih, bias):
    """x W_ih^T + bias for every step at once: (T, B, G) for w_ih (G, I)."""
    flat = x.flatten(0, 1)
    pre = flat @ w_ih.t() if bias is None else torch.addmm(bias, flat, w_ih.t())
    return pre.view(x.shape[0], x.shape[1], w_ih.shape[0])


def _persistent_forward(x, h0, c0, w_ih, w_hh, bias, lengths, reverse):
    y, h_n, c_n, gates, cells = torch.ops.fastseq.lstm_recurrence_forward(
        input_projection(x, w_ih, bias), h0, c0, w_hh, lengths, reverse)
    return y, h_n, c_n, gates, cells, x.new_empty(0)


def _loop_forward(cell, x, h0, c0, w_ih, w_hh, bias, w_hr, lengths, reverse):
    steps, batch, _ = x.shape
    hidden = c0.shape[1]
    pre_x = input_projection(x, w_ih, bias)
    y = x.new_zeros(steps, batch, h0.shape[1])
    gates = x.new_empty(steps, batch, 4 * hidden)
    # The cell state is carried in float32 whatever the input dtype: it integrates over every
    # step, and rounding it to bfloat16 each step lets the error drift.
    cells = x.new_empty(steps, batch, hidden, dtype=cell_dtype(x.dtype))
    pre_proj = x.new_empty(steps, batch, hidden) if w_hr is not None else x.new_empty(0)
    h, c = h0, c0.to(cells.dtype)
    for t in reference.step_order(steps, reverse):
        active = _active(lengths, t, h)
        # The cell's output m goes straight to where it is kept: y, or the pre-projection outputs.
        if w_hr is not None:
            m = pre_proj[t]
        else:
            m = y[t] if active is None else torch.empty_like(y[t])
        cell(torch.addmm(pre_x[t], h, w_hh.t()), c, gates[t], cells[t], m)
        h_new = m
        if w_hr is not None:
            h_new = torch.mm(m, w_hr.t(), out=y[t]) if active is None else m @ w_hr.t()
        c_new = cells[t]
        if active is not None:  # padding: the state passes through, the output is zero
            torch.where(active, c_new, c, out=c_new)
            h_new = torch.where(active, h_new, h)
            y[t] = torch.where(active, h_new, 0)
        h, c = h_new, c_new
    # h_n and c_n are copies: an op may return neither an input (h0, c0) nor a view of another
    # output (y, cells).
    return y, h.clone(), c.to(c0.dtype, copy=True), gates, cells, pre_proj


def previous_states(states, first, lengths, reverse):
    """State before each step, (T, B, F): the stored state of the previous step, or ``first``.

    In the reverse direction a sequence starts at its last valid step: before it lies ``first``.
    """
    shifted = torch.empty_like(states)
    if states.shape[0] == 0:
        return shifted
    if reverse:
        shifted[:-1], shifted[-1] = states[1:], first
        if lengths is not None:
            steps = torch.arange(states.shape[0], device=states.device)[:, None]
            starts = (steps + 1 >= lengths.to(states.device)[None, :])[..., None]
            shifted = torch.where(starts, first, shifted)
    else:
        shifted[1:], shifted[0] = states[:-1], first
    return shifted


def _loop_backward(cell_bwd, grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, w_hr, lengths,
                   reverse, gates, cells, pre_proj, y, has_bias, needs_grad_x, needs_grad_weights,
                   needs_grad_state):
    steps, batch, _ = x.shape
    c_prev_all = previous_states(cells, c0.to(cells.dtype), lengths, reverse)
    dpre_all = torch.empty_like(gates)  # every step's slice is written below
    dh_all = torch.zeros_like(y) if w_hr is not None else None
    dh, dc = grad_h_n, grad_c_n.to(cells.dtype)
    order = reversed(reference.step_order(steps, reverse))
    for k, t in enumerate(order):
        active = _active(lengths, t, dh)
        dh_t = dh + (grad_y[t] if active is None else torch.where(active, grad_y[t], 0))
        dm = dh_t if w_hr is None else dh_t @ w_hr
        dpre = dpre_all[t]
        dc_prev = cell_bwd(dm, dc, gates[t], c_prev_all[t], cells[t], dpre)
        if active is not None:  # padding steps pass dh and dc through, and no gradient to pre
            dpre.masked_fill_(~active, 0)
            dc_prev = torch.where(active, dc_prev, dc)
        if dh_all is not None:
            dh_all[t] = dh_t if active is None else torch.where(active, dh_t, 0)
        if k == steps - 1 and not needs_grad_state:
            break  # what is left is d h0 and d c0
        dh_prev = dpre @ w_hh
        if active is not None:
            dh_prev = torch.where(active, dh_prev, dh)
        dh, dc = dh_prev, dc_prev
    gx, gw_ih, gw_hh, gbias, gw_hr = _gemm_grads(dpre_all, dh_all, x, h0, w_ih, y, pre_proj, lengths,
                                                 reverse, has_bias, needs_grad_x, needs_grad_weights)
    if not needs_grad_state:
        return gx, None, None, gw_ih, gw_hh, gbias, gw_hr, dpre_all
    # With no steps dh is grad_h_n itself, which an op may not return.
    return (gx, dh.clone() if dh is grad_h_n else dh, dc.to(c0.dtype, copy=True), gw_ih, gw_hh,
            gbias, gw_hr, dpre_all)


def _persistent_backward(grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, w_hr, lengths, reverse,
                         gates, cells, pre_proj, y, has_bias, needs_grad_x, needs_grad_weights,
                         needs_grad_state):
    dpre_all, dh0, dc0 = torch.ops.fastseq.lstm_recurrence_backward(
        grad_y, grad_h_n, grad_c_n, c0, w_hh, lengths, reverse, gates, cells)
    gx, gw_ih, gw_hh, gbias, _ = _gemm_grads(dpre_all, None, x, h0, w_ih, y, pre_proj, lengths,
                                             reverse, has_bias, needs_grad_x, needs_grad_weights)
    if not needs_grad_state:  # the kernel computes them on the way
        dh0 = dc0 = None
    return gx, dh0, dc0, gw_ih, gw_hh, gbias, None, dpre_all


def _gemm_grads(dpre_all, dh_all, x, h0, w_ih, y, pre_proj, lengths, reverse, has_bias,
                needs_grad_x, needs_grad_weights):
    """What does not feed the recurrence, over all steps at once: (grad_x, grad_w_ih, grad_w_hh,
    grad_bias, grad_w_hr) from d pre (T, B, 4H) and, with a projection, dh (T, B, P); None for
    what is not needed."""
    flat = dpre_all.flatten(0, 1)
    grad_x = (flat @ w_ih).view_as(x) if needs_grad_x else None
    if not needs_grad_weights:
        return grad_x, None, None, None, None
    h_prev_all = previous_states(y, h0, lengths, reverse)
    grad_w_ih = flat.t() @ x.flatten(0, 1)
    grad_w_hh = flat.t() @ h_prev_all.flatten(0, 1)
    grad_bias = flat.sum(0) if has_bias else None
    grad_w_hr = dh_all.flatten(0, 1).t() @ pre_proj.flatten(0, 1) if dh_all is not None else None
    return grad_x, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr


def _layer_forward(x, h0, c0, w_ih, w_hh, bias, w_hr, lengths, reverse, save, backend):
    """The body of :func:`lstm_layer_op`."""
    _extension.load()  # a graph loaded by torch.export may run this before anything else did
    if backend == "cpu":
        return tuple(torch.ops.fastseq.lstm_layer_forward(x, h0, c0, w_ih, w_hh, bias, w_hr,
                                                          lengths, reverse, save))
    if backend == "cuda":
        out = _persistent_forward(x, h0, c0, w_ih, w_hh, bias, lengths, reverse)
    else:
        forward, _ = _cells(backend)
        out = _loop_forward(forward, x, h0, c0, w_ih, w_hh, bias, w_hr, lengths, reverse)
    return tuple(out) if save else (*out[:3], *(x.new_empty(0) for _ in range(3)))


@torch.library.custom_op("fastseq::lstm_layer", mutates_args=())
def lstm_layer_op(
    x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
    bias: torch.Tensor | None, w_hr: torch.Tensor | None, lengths: torch.Tensor | None,
    reverse: bool, save: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer over contiguous x (T, B, I) on ``backend``; returns (y, h_n, c_n, gates, cells,
    pre_proj).

    Without ``save`` (nothing needs a gradient) the last three are empty and the C++ layer keeps
    no per-step state. ``cpu`` takes float32 and bfloat16 (:func:`lstm_layer` casts float16).
    """
    return _layer_forward(x, h0, c0, w_ih, w_hh, bias, w_hr, lengths, reverse, save, backend)


@lstm_layer_op.register_fake
def _(x, h0, c0, w_ih, w_hh, bias, w_hr, lengths, reverse, save, backend):
    steps, batch, _ = x.shape
    hidden = c0.shape[1]
    outputs = (x.new_empty(steps, batch, h0.shape[1]), torch.empty_like(h0), torch.empty_like(c0))
    if not save:
        return (*outputs, *(x.new_empty(0) for _ in range(3)))
    pre_proj = x.new_empty(steps, batch, hidden) if w_hr is not None else x.new_empty(0)
    # Saved cell states: x's dtype for the C++ layer, at least float32 for the others.
    cells = x.new_empty(steps, batch, hidden,
                        dtype=x.dtype if backend == "cpu" else cell_dtype(x.dtype))
    return (*outputs, x.new_empty(steps, batch, 4 * hidden), cells, pre_proj)


def _layer_grad(grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, w_hr, lengths, reverse, gates,
                cells, pre_proj, y, has_bias, needs_grad_x, needs_grad_weights, needs_grad_state,
                backend):
    """The body of :func:`lstm_layer_grad_op`."""
    _extension.load()  # a graph loaded by torch.export may run this before anything else did
    args = (grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, w_hr, lengths, reverse, gates, cells,
            pre_proj, y, has_bias, needs_grad_x, needs_grad_weights, needs_grad_state)
    if backend == "cpu":
        grads = torch.ops.fastseq.lstm_layer_backward(*args)
    elif backend == "cuda":
        grads = _persistent_backward(*args)
    else:
        grads = _loop_backward(_cells(backend)[1], *args)
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@torch.library.custom_op("fastseq::lstm_layer_grad", mutates_args=())
def lstm_layer_grad_op(
    grad_y: torch.Tensor, grad_h_n: torch.Tensor, grad_c_n: torch.Tensor, x: torch.Tensor,
    h0: torch.Tensor, c0: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
    w_hr: torch.Tensor | None, lengths: torch.Tensor | None, reverse: bool, gates: torch.Tensor,
    cells: torch.Tensor, pre_proj: torch.Tensor, y: torch.Tensor, has_bias: bool,
    needs_grad_x: bool, needs_grad_weights: bool, needs_grad_state: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    """Gradients [x, h0, c0, w_ih, w_hh, bias, w_hr] of :func:`lstm_layer_op` (empty when absent
    or not needed: grad_x unless ``needs_grad_x``, the weights' unless ``needs_grad_weights``,
    h0's and c0's unless ``needs_grad_state``), and the gradient of the pre-activations (T, B,
    4H), of which the weight gradients are products (the vmap rule forms them per sequence).

    ``backend`` is the one the forward ran: what it saved is in that backend's format.
    """
    return _layer_grad(grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, w_hr, lengths, reverse,
                       gates, cells, pre_proj, y, has_bias, needs_grad_x, needs_grad_weights,
                       needs_grad_state, backend)


@lstm_layer_grad_op.register_fake
def _(grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, w_hr, lengths, reverse, gates, cells,
      pre_proj, y, has_bias, needs_grad_x, needs_grad_weights, needs_grad_state, backend):
    def like(t, needed=needs_grad_weights):
        return torch.empty_like(t) if needed and t is not None else x.new_empty(0)

    bias = x.new_empty(4 * c0.shape[1]) if has_bias else None
    return (like(x, needs_grad_x), like(h0, needs_grad_state), like(c0, needs_grad_state),
            like(w_ih), like(w_hh), like(bias), like(w_hr), torch.empty_like(gates))


def _setup(ctx, inputs, output):
    x, h0, c0, w_ih, w_hh, bias, w_hr, lengths, reverse, _save, backend = inputs
    y, _, _, gates, cells, pre_proj = output
    ctx.save_for_backward(x, h0, c0, w_ih, w_hh, w_hr, lengths, gates, cells, pre_proj, y)
    ctx.reverse, ctx.has_bias, ctx.backend = reverse, bias is not None, backend
    # Each of grad_x and the weight gradients is a GEMM over every step, and the initial state's
    # is the last step's dh GEMM: only those asked for run (a first layer's x is often data, a
    # zero initial state needs no gradient, a frozen layer needs no weight gradients).
    ctx.needs_grad_x = ctx.needs_input_grad[0]
    ctx.needs_grad_weights = any(ctx.needs_input_grad[3:7])
    ctx.needs_grad_state = any(ctx.needs_input_grad[1:3])
    # The saved outputs (gates, cells, pre_proj) never get a gradient: materialised, their zeros
    # would be (T, B, 4H) and more of fills on every backward (a tenth of it at B=16, H=256).
    ctx.set_materialize_grads(False)


def output_grads(grad_y, grad_h_n, grad_c_n, x, h0, c0):
    """The gradients of a layer's (y, h_n, c_n) as the kernels take them: contiguous, and zeros
    for an output that was not used (None when the op does not materialise gradients)."""
    steps, batch, _ = x.shape
    return (x.new_zeros(steps, batch, h0.shape[1]) if grad_y is None else grad_y.contiguous(),
            torch.zeros_like(h0) if grad_h_n is None else grad_h_n.contiguous(),
            torch.zeros_like(c0) if grad_c_n is None else grad_c_n.contiguous())


def _backward_through(layer_grad):
    """The layer's backward, its gradients computed by ``layer_grad``: the gradient op (what a
    traced graph holds) or its body (eager calls)."""
    def backward(ctx, grad_y, grad_h_n, grad_c_n, *_unused):
        x, h0, c0, w_ih, w_hh, w_hr, lengths, gates, cells, pre_proj, y = ctx.saved_tensors
        grads = layer_grad(*output_grads(grad_y, grad_h_n, grad_c_n, x, h0, c0),
                           x, h0, c0, w_ih, w_hh, w_hr, lengths, ctx.reverse, gates, cells,
                           pre_proj, y, ctx.has_bias, ctx.needs_grad_x, ctx.needs_grad_weights,
                           ctx.needs_grad_state, ctx.backend)
        gx, gh0, gc0, gw_ih, gw_hh, gbias, gw_hr, _ = grads
        weights, state = ctx.needs_grad_weights, ctx.needs_grad_state
        return (gx if ctx.needs_grad_x else None, gh0 if state else None, gc0 if state else None,
                gw_ih if weights else None, gw_hh if weights else None,
                gbias if weights and ctx.has_bias else None,
                gw_hr if weights and w_hr is not None else None, None, None, None, None)

    return backward


lstm_layer_op.register_autograd(_backward_through(lstm_layer_grad_op), setup_context=_setup)


@lstm_layer_op.register_vmap
def _vmap_layer(info, in_dims, x, h0, c0, w_ih, w_hh, bias, w_hr, lengths, reverse, save, backend):
    """vmap of the layer (``torch.func``; the forward of per-sample gradients): with shared weights
    the vmapped dimension folds into the batch, one layer call for all the sequences at once;
    batched weights (an ensemble) take one call per member."""
    n = info.batch_size
    steps, batch = _steps_and_batch(x, in_dims[0])
    if lengths is not None and in_dims[7] is not None and lengths.numel():
        _check_range(lengths, steps, _value_error)  # what checked_lengths could not read
    if any(dim is not None for dim in in_dims[3:7]):
        return eager.one_call_per_member(lstm_layer_op, n, in_dims, (x, h0, c0, w_ih, w_hh, bias,
                                                                   w_hr, lengths, reverse, save,
                                                                   backend))
    folded = (_fold(x, in_dims[0], n, sequence=True), _fold(h0, in_dims[1], n),
              _fold(c0, in_dims[2], n), w_ih, w_hh, bias, w_hr,
              None if lengths is None else _fold(lengths, in_dims[7], n))
    outputs = lstm_layer_op(*folded, reverse, save, backend)
    # Views, vmapped along dimension 1 for (T, N B, F) and 0 for the final states (N B, F): the
    # gradient's rule folds them back without a copy.
    unfolded, dims = [], []
    for index, t in enumerate(outputs):
        if t.numel() == 0 and t.dim() == 1:  # what save=False leaves empty
            unfolded.append(t), dims.append(None)
        elif index in (1, 2):
            unfolded.append(t.view(n, batch, -1)), dims.append(0)
        else:
            unfolded.append(t.view(steps, n, batch, -1)), dims.append(1)
    return tuple(unfolded), tuple(dims)


def _steps_and_batch(x, dim):
    """(T, B) of a sequence (T, B, F) vmapped along ``dim`` (None: not vmapped)."""
    return [size for d, size in enumerate(x.shape) if d != dim][:2]


_value_error = functools.partial(fail, "lstm_layer")


def _fold(t, dim, n, sequence=False):
    """``t`` (vmapped along ``dim``, or shared when None) with its n copies stacked into the batch:
    (T, N B, F) for a sequence, (N B, ...) for a state or lengths."""
    at = 1 if sequence else 0
    t = t.expand(n, *t.shape).movedim(0, at) if dim is None else t.movedim(dim, at)
    return t.flatten(at, at + 1).contiguous()


@lstm_layer_grad_op.register_vmap
def _vmap_layer_grad(info, in_dims, *args):
    """The gradient under vmap (per-sample gradients, jacrev): with shared weights and no
    projection one gradient call for all the vmapped sequences folded into the batch, each
    sequence's weight gradients then formed from its own rows of d pre (a batched GEMM); else
    one call per sequence."""
    n = info.batch_size
    (grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, w_hr, lengths, reverse, gates, cells,
     pre_proj, y, has_bias, needs_grad_x, needs_grad_weights, needs_grad_state, backend) = args
    if w_hr is not None or any(dim is not None for dim in in_dims[6:9]):
        return eager.one_call_per_member(lstm_layer_grad_op, n, in_dims, args)
    steps, batch = _steps_and_batch(x, in_dims[3])
    seq = [_fold(t, dim, n, sequence=True) for t, dim in
           zip((grad_y, x, gates, cells, y), (in_dims[0], in_dims[3], in_dims[11], in_dims[12],
                                              in_dims[14]), strict=True)]
    fgrad_y, fx, fgates, fcells, fy = seq
    fh0, fc0 = _fold(h0, in_dims[4], n), _fold(c0, in_dims[5], n)
    flengths = None if lengths is None else _fold(lengths, in_dims[9], n)
    gx, gh0, gc0, *_, dpre = lstm_layer_grad_op(
        fgrad_y, _fold(grad_h_n, in_dims[1], n), _fold(grad_c_n, in_dims[2], n), fx, fh0, fc0,
        w_ih, w_hh, None, flengths, reverse, fgates, fcells, pre_proj, fy, has_bias, needs_grad_x,
        False, needs_grad_state, backend)

    def per_sequence(t):  # (T, N B, F) -> (N, T, B, F)
        return t.view(steps, n, batch, t.shape[-1]).movedim(1, 0)

    empty = x.new_empty(0)
    grads = [per_sequence(gx) if needs_grad_x else empty,
             gh0.view(n, batch, -1) if needs_grad_state else empty,
             gc0.view(n, batch, -1) if needs_grad_state else empty]
    d = per_sequence(dpre).flatten(1, 2).transpose(1, 2)  # (N, 4H, T B)
    if needs_grad_weights:
        h_prev = previous_states(fy, fh0, flengths, reverse)
        grads += [d @ per_sequence(fx).flatten(1, 2), d @ per_sequence(h_prev).flatten(1, 2),
                  d.sum(2) if has_bias else empty]
    else:
        grads += [empty, empty, empty]
    grads += [empty, per_sequence(dpre)]
    return tuple(grads), tuple(None if g is empty else 0 for g in grads)


_EagerLayer = eager.autograd_function(
    "LSTMLayer", _layer_forward, _setup,
    _backward_through(eager.gradient(lstm_layer_grad_op, _layer_grad)),
    lstm_layer_op, _backward_through(eager.differentiable_once(lstm_layer_grad_op)))


def lstm_layer(x, h0, c0, w_ih, w_hh, bias=None, w_hr=None, lengths=None, reverse=False):
    """Run one LSTM layer; returns ``(y (T, B, P), h_n (B, P), c_n (B, H))``. Differentiable.

    ``x`` (T, B, I), ``h0`` (B, P), ``c0`` (B, H), ``w_ih`` (4H, I), ``w_hh`` (4H, P), ``bias``
    (4H) = ``b_ih + b_hh``, ``w_hr`` (P, H) for projections (else P = H), all of x's dtype and
    device; ``lengths`` (B,) integers. Raises ValueError, naming the argument, on inputs of the
    wrong shape, dtype or device. float16 on the CPU runs the C++ layer in float32 between two
    differentiable casts.
    """
    lengths = _check_inputs(x, h0, c0, w_ih, w_hh, bias, w_hr, lengths)
    return run_lstm_layer(x, h0, c0, w_ih, w_hh, bias, w_hr, lengths, reverse)


def run_lstm_layer(x, h0, c0, w_ih, w_hh, bias=None, w_hr=None, lengths=None, reverse=False):
    """:func:`lstm_layer` without its input checks, for callers that made them (the modules of
    ``fastseq.nn`` check once per call, not once per layer or step); ``lengths`` int64 on x's
    device. Inputs are made contiguous here (the kernels take dense rows)."""
    dtype = x.dtype
    backend = _backend_for(x.device, dtype, w_hh.shape[1], w_hr is not None)
    compute = torch.float32 if backend == "cpu" and dtype == torch.float16 else dtype
    tensors = contiguous_in(compute, (x, h0, c0, w_ih, w_hh, bias, w_hr))
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    lengths = lengths if lengths is None else lengths.contiguous()
    outputs = eager.call(lstm_layer_op, _EagerLayer, *tensors, lengths, reverse, save, backend,
                         differentiable=save)[:3]
    return outputs if compute == dtype else tuple(t.to(dtype) for t in outputs)
