"""One Elman RNN layer in plain PyTorch: the eager loop that the fused kernel is measured against.

Formulas are torch.nn.RNN's: ``h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh)`` with
``act`` tanh or relu; here ``bias`` = ``b_ih + b_hh``.
"""

from __future__ import annotations

import torch

from fastseq.reference.lstm import step_order

ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu}


def rnn_layer(x, h0, w_ih, w_hh, bias=None, lengths=None, reverse=False, nonlinearity="tanh"):
    """Run one layer over x (T, B, I) from h0 (B, H); returns (y (T, B, H), h_n (B, H)).

    ``lengths`` (B,): steps at or past ``lengths[b]`` are padding (state kept, output zero); the
    reverse direction starts at each sequence's last valid step, as torch does on packed input.
    Differentiable by autograd.
    """
    act = ACTIVATIONS[nonlinearity]
    steps, batch, _ = x.shape
    flat = x.flatten(0, 1)
    pre_x = (flat @ w_ih.t() if bias is None else torch.addmm(bias, flat, w_ih.t())).view(
        steps, batch, w_ih.shape[0])
    h = h0
    ys = [None] * steps
    for t in step_order(steps, reverse):
        h_new = act(pre_x[t] + h @ w_hh.t())
        if lengths is not None:
            active = (t < lengths).to(x.device)[:, None]
            h_new = torch.where(active, h_new, h)
            ys[t] = torch.where(active, h_new, 0)
        else:
            ys[t] = h_new
        h = h_new
    y = torch.stack(ys) if steps else x.new_zeros(0, batch, h0.shape[1])
    return y, h.clone() if not steps else h  # h_n never aliases h0
