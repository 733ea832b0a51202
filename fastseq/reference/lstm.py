"""One LSTM layer in plain PyTorch: the eager loop that fused kernels are measured against.

Gate order and formulas are torch.nn.LSTM's: ``pre = x W_ih^T + h W_hh^T + b``, ``i, f, g, o``
chunks, ``c = f c + i g``, ``m = o tanh(c)``, ``h = m`` or ``W_hr m`` with a projection.
"""

from __future__ import annotations

import torch


def cell_forward(pre: torch.Tensor, c_prev: torch.Tensor):
    """Pointwise cell: ``pre`` (B, 4H) and ``c_prev`` (B, H) -> (activated gates, c, m)."""
    i, f, g, o = pre.chunk(4, dim=-1)
    i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
    c = f * c_prev + i * g
    return torch.cat((i, f, g, o), dim=-1), c, o * c.tanh()


def cell_backward(dm, dc, gates, c_prev, c):
    """Gradients of :func:`cell_forward`: returns (d pre (B, 4H), d c_prev (B, H))."""
    i, f, g, o = gates.chunk(4, dim=-1)
    tanh_c = c.tanh()
    dc = dc + dm * o * (1 - tanh_c * tanh_c)
    d_pre = torch.cat((dc * g * i * (1 - i), dc * c_prev * f * (1 - f), dc * i * (1 - g * g),
                       dm * tanh_c * o * (1 - o)), dim=-1)
    return d_pre, dc * f


def step_order(length: int, reverse: bool):
    """Processing order of the time steps."""
    return range(length - 1, -1, -1) if reverse else range(length)


def lstm_layer(x, h0, c0, w_ih, w_hh, bias=None, w_hr=None, lengths=None, reverse=False):
    """Run one layer over x (T, B, I) from (h0 (B, P), c0 (B, H)); returns (y, h_n, c_n).

    ``lengths`` (B,): steps at or past ``lengths[b]`` are padding (state kept, output zero); the
    reverse direction starts at each sequence's last valid step, as torch does on packed input.
    Differentiable by autograd.
    """
    h, c = h0, c0
    pre_x = x @ w_ih.t() if bias is None else torch.addmm(bias, x.flatten(0, 1), w_ih.t()).view(
        *x.shape[:2], w_ih.shape[0])
    ys = [None] * x.shape[0]
    for t in step_order(x.shape[0], reverse):
        _, c_new, m = cell_forward(pre_x[t] + h @ w_hh.t(), c)
        h_new = m if w_hr is None else m @ w_hr.t()
        if lengths is not None:
            active = (t < lengths).to(x.device)[:, None]
            c_new = torch.where(active, c_new, c)
            h_new = torch.where(active, h_new, h)
            ys[t] = torch.where(active, h_new, torch.zeros_like(h_new))
        else:
            ys[t] = h_new
        h, c = h_new, c_new
    return torch.stack(ys), h, c


def layer_norm(x, weight, bias=None, eps=1e-5):
    """LayerNorm over the last dimension, with a gain and an optional shift."""
    return torch.nn.functional.layer_norm(x, x.shape[-1:], weight, bias, eps)


def layer_norm_lstm_layer(x, h0, c0, w_ih, w_hh, bias, ln_ih, ln_hh, ln_c_weight, ln_c_bias,
                          lengths=None, reverse=False, eps=1e-5):
    """One layer of the LayerNorm-LSTM (Ba et al. 2016, as haste's LayerNormLSTM) over x (T, B, I).

    ``pre = LN(x W_ih^T) * ln_ih + LN(h W_hh^T) * ln_hh + bias`` with gates in torch's order
    (i, f, g, o), ``c = f c + i g`` (the carried, un-normalised state), and
    ``h = o tanh(LN(c) * ln_c_weight + ln_c_bias)``. The input and recurrent projections are
    normalised separately over their 4H features; the cell over its H. ``lengths`` as in
    :func:`lstm_layer`. Returns (y (T, B, H), h_n, c_n); differentiable by autograd.
    """
    steps, batch, _ = x.shape
    pre_x = layer_norm(x.flatten(0, 1) @ w_ih.t(), ln_ih, eps=eps).view(steps, batch, w_ih.shape[0])
    if bias is not None:
        pre_x = pre_x + bias
    h, c = h0, c0
    ys = [None] * steps
    for t in step_order(steps, reverse):
        i, f, g, o = (pre_x[t] + layer_norm(h @ w_hh.t(), ln_hh, eps=eps)).chunk(4, dim=-1)
        c_new = f.sigmoid() * c + i.sigmoid() * g.tanh()
        h_new = o.sigmoid() * layer_norm(c_new, ln_c_weight, ln_c_bias, eps).tanh()
        if lengths is not None:
            active = (t < lengths)[:, None]
            c_new, h_new = torch.where(active, c_new, c), torch.where(active, h_new, h)
            ys[t] = torch.where(active, h_new, 0)
        else:
            ys[t] = h_new
        h, c = h_new, c_new
    y = torch.stack(ys) if ys else x.new_zeros(0, batch, h0.shape[1])
    if not steps:  # h_n and c_n never alias the initial state (nor each other, through it)
        h, c = h.clone(), c.clone()
    return y, h, c
