"""One LayerNorm-LSTM layer (one direction) as a torch op: ``torch.ops.fastseq.layer_norm_lstm_layer``.

The model is :func:`fastseq.reference.lstm.layer_norm_lstm_layer` (Ba et al. 2016, as haste's
LayerNormLSTM): the input and recurrent projections are each layer-normalised over their 4H
features, and the cell over its H before its tanh. Backends:

* ``cpu``: the C++ layer (``torch.ops.fastseq.layer_norm_lstm_forward`` / ``_backward``,
  csrc/cpu/layer_norm_lstm.cpp), float32 and float64: one GEMM for the input projection of all
  steps, then every block of sequences runs through the steps on its own thread with a GEMM and
  fused pointwise and LayerNorm math per step; backward through time in C++;
* ``reference``: the plain-PyTorch loop, differentiated by autograd; every other device and dtype.
"""

from __future__ import annotations

import torch

from fastseq import _backend, _extension
from fastseq.reference import lstm as reference

KERNEL_DTYPES = (torch.float32, torch.float64)
_SAVED = 6  # gates, cells, h_in, x_hat, r_hat, stats


# torch.compile runs the choice while tracing and keeps its answer (it looks up the extension,
# which Dynamo cannot trace); its arguments are constants there.
@torch.compiler.assume_constant_result
def _backend_for(device: torch.device, dtype: torch.dtype) -> str:
    reasons = {"triton": "no Triton LayerNorm-LSTM kernel", "cuda": "no CUDA LayerNorm-LSTM kernel"}
    if dtype not in KERNEL_DTYPES:
        reasons["cpu"] = f"dtype {dtype} (the C++ layer takes float32 and float64)"
    elif not _extension.cpu_built() or not hasattr(torch.ops.fastseq, "layer_norm_lstm_forward"):
        reasons["cpu"] = "the C++ LayerNorm-LSTM layer is not built"
    return _backend.choose("layer_norm_lstm", device, reasons)


@torch.library.custom_op("fastseq::layer_norm_lstm_layer", mutates_args=())
def layer_norm_lstm_op(
    x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
    bias: torch.Tensor | None, ln_ih: torch.Tensor, ln_hh: torch.Tensor, ln_c_weight: torch.Tensor,
    ln_c_bias: torch.Tensor, lengths: torch.Tensor | None, reverse: bool, eps: float, save: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h_n, c_n) and, with ``save``, what the backward takes (empty tensors otherwise)."""
    return tuple(torch.ops.fastseq.layer_norm_lstm_forward(
        x, h0, c0, w_ih, w_hh, bias, ln_ih, ln_hh, ln_c_weight, ln_c_bias, lengths, reverse, eps,
        save))


@layer_norm_lstm_op.register_fake
def _(x, h0, c0, w_ih, w_hh, bias, ln_ih, ln_hh, ln_c_weight, ln_c_bias, lengths, reverse, eps,
      save):
    steps, batch, _ = x.shape
    hidden = c0.shape[1]
    outputs = (x.new_empty(steps, batch, hidden), torch.empty_like(h0), torch.empty_like(c0))
    if not save:
        return (*outputs, *(x.new_empty(0) for _ in range(_SAVED)))
    rows = (steps, batch)
    return (*outputs, x.new_empty(*rows, 4 * hidden), x.new_empty(*rows, hidden),
            x.new_empty(hidden, *rows), x.new_empty(*rows, 4 * hidden),
            x.new_empty(*rows, 4 * hidden), x.new_empty(*rows, 4))


@torch.library.custom_op("fastseq::layer_norm_lstm_layer_grad", mutates_args=())
def layer_norm_lstm_grad_op(
    grad_y: torch.Tensor, grad_h_n: torch.Tensor, grad_c_n: torch.Tensor, x: torch.Tensor,
    h0: torch.Tensor, c0: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
    ln_ih: torch.Tensor, ln_hh: torch.Tensor, ln_c_weight: torch.Tensor, ln_c_bias: torch.Tensor,
    lengths: torch.Tensor | None, reverse: bool, eps: float, has_bias: bool, gates: torch.Tensor,
    cells: torch.Tensor, h_in: torch.Tensor, x_hat: torch.Tensor, r_hat: torch.Tensor,
    stats: torch.Tensor,
) -> list[torch.Tensor]:
    """Gradients [x, h0, c0, w_ih, w_hh, bias, ln_ih, ln_hh, ln_c_weight, ln_c_bias] of
    :func:`layer_norm_lstm_op` (bias's empty when the layer has none)."""
    grads = torch.ops.fastseq.layer_norm_lstm_backward(
        grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias,
        lengths, reverse, eps, has_bias, gates, cells, h_in, x_hat, r_hat, stats)
    return [g if g is not None else x.new_empty(0) for g in grads]


@layer_norm_lstm_grad_op.register_fake
def _(grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias,
      lengths, reverse, eps, has_bias, gates, cells, h_in, x_hat, r_hat, stats):
    like = (x, h0, c0, w_ih, w_hh)
    return [*(torch.empty_like(t) for t in like), x.new_empty(w_ih.shape[0] if has_bias else 0),
            *(torch.empty_like(t) for t in (ln_ih, ln_hh, ln_c_weight, ln_c_bias))]


def _setup(ctx, inputs, output):
    x, h0, c0, w_ih, w_hh, bias, ln_ih, ln_hh, ln_c_weight, ln_c_bias, lengths, reverse, eps, _ = inputs
    ctx.save_for_backward(x, h0, c0, w_ih, w_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias, lengths,
                          *output[3:])
    ctx.reverse, ctx.eps, ctx.has_bias = reverse, eps, bias is not None


def _backward(ctx, grad_y, grad_h_n, grad_c_n, *_unused):
    x, h0, c0, w_ih, w_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias, lengths, *saved = ctx.saved_tensors
    grads = layer_norm_lstm_grad_op(grad_y.contiguous(), grad_h_n.contiguous(),
                                    grad_c_n.contiguous(), x, h0, c0, w_ih, w_hh, ln_ih, ln_hh,
                                    ln_c_weight, ln_c_bias, lengths, ctx.reverse, ctx.eps,
                                    ctx.has_bias, *saved)
    gx, gh0, gc0, gw_ih, gw_hh, gbias, *g_norms = grads
    return (gx, gh0, gc0, gw_ih, gw_hh, gbias if ctx.has_bias else None, *g_norms, None, None,
            None, None)


layer_norm_lstm_op.register_autograd(_backward, setup_context=_setup)


def layer_norm_lstm_layer(x, h0, c0, w_ih, w_hh, bias, ln_ih, ln_hh, ln_c_weight, ln_c_bias,
                          lengths=None, reverse=False, eps=1e-5):
    """One LayerNorm-LSTM layer; returns ``(y (T, B, H), h_n (B, H), c_n (B, H))``. Differentiable.

    Shapes as :func:`fastseq.ops.lstm.lstm_layer` (no projection), plus the LayerNorm gains
    ``ln_ih``, ``ln_hh`` (4H) and the cell's ``ln_c_weight``, ``ln_c_bias`` (H); formulas in
    :func:`fastseq.reference.lstm.layer_norm_lstm_layer`. The C++ layer runs float32 and float64
    on the CPU; everything else runs the reference loop.
    """
    if _backend_for(x.device, x.dtype) == "reference":
        return reference.layer_norm_lstm_layer(x, h0, c0, w_ih, w_hh, bias, ln_ih, ln_hh,
                                               ln_c_weight, ln_c_bias, lengths, reverse, eps)
    tensors = [t if t is None else t.contiguous()
               for t in (x, h0, c0, w_ih, w_hh, bias, ln_ih, ln_hh, ln_c_weight, ln_c_bias)]
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    lengths = lengths if lengths is None else lengths.contiguous()
    y, h_n, c_n, *_ = layer_norm_lstm_op(*tensors, lengths, reverse, float(eps), save)
    return y, h_n, c_n
