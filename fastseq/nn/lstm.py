"""``LSTM`` and ``LSTMCell``: drop-ins for torch's, running fastseq's fused LSTM layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from fastseq.ops.layer_norm_lstm import run_layer_norm_lstm_layer
from fastseq.ops.lstm import checked_lengths, run_lstm_layer


def _fail(message):
    raise ValueError(f"fastseq LSTM: {message}")


def _stacked(states):
    """Final states of every layer and direction, (L * D, B, F): a view for one layer and one
    direction, where a stack would copy (a kernel launch per state on the GPU)."""
    return states[0].unsqueeze(0) if len(states) == 1 else torch.stack(states)


class LSTM(nn.Module):
    """``torch.nn.LSTM`` on fastseq kernels: same constructor, parameters, state dicts and outputs.

    Takes batched or unbatched input, ``batch_first``, optional ``(h0, c0)``, and a
    ``PackedSequence`` (returned packed, as torch does). Beyond torch: ``lengths=`` (B,) on a
    padded batch runs each sequence for its own length at no cost over the padded run, with no
    packing; outputs past a sequence's length are zeros. Inter-layer dropout draws from torch's
    generator, so ``torch.manual_seed`` makes it reproducible. Not a subclass of ``nn.LSTM`` on
    purpose: ``torch.compile`` refuses to trace those, and this module compiles with
    ``fullgraph=True``.
    """

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, proj_size=0, device=None, dtype=None):
        super().__init__()
        for name, value, least in (("input_size", input_size, 0), ("hidden_size", hidden_size, 1),
                                   ("num_layers", num_layers, 1), ("proj_size", proj_size, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                _fail(f"{name} must be an int >= {least}, got {value!r}")
        if proj_size < 0 or proj_size >= hidden_size:
            _fail(f"proj_size must be in [0, hidden_size={hidden_size}), got {proj_size}")
        if not 0 <= dropout <= 1:
            _fail(f"dropout must be in [0, 1], got {dropout}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self.proj_size = bidirectional, proj_size
        factory = dict(device=device, dtype=dtype)
        directions = 2 if bidirectional else 1
        out_size = proj_size or hidden_size
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else out_size * directions
            for suffix in ("", "_reverse")[:directions]:
                shapes = {"weight_ih": (4 * hidden_size, layer_input),
                          "weight_hh": (4 * hidden_size, out_size)}
                if bias:
                    shapes.update(bias_ih=(4 * hidden_size,), bias_hh=(4 * hidden_size,))
                if proj_size:
                    shapes["weight_hr"] = (proj_size, hidden_size)
                for name, shape in shapes.items():
                    self.register_parameter(f"{name}_l{layer}{suffix}",
                                            nn.Parameter(torch.empty(shape, **factory)))
        self.reset_parameters()

    def reset_parameters(self):
        """torch.nn.LSTM's initialisation: every weight uniform in +-1/sqrt(hidden_size)."""
        bound = 1.0 / self.hidden_size**0.5
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def flatten_parameters(self):
        """Accepted for compatibility with ``torch.nn.LSTM``: fastseq keeps no flat weight buffer."""

    def extra_repr(self):
        s = f"{self.input_size}, {self.hidden_size}"
        for name, default in (("num_layers", 1), ("bias", True), ("batch_first", False),
                              ("dropout", 0.0), ("bidirectional", False), ("proj_size", 0)):
            if getattr(self, name) != default:
                s += f", {name}={getattr(self, name)}"
        return s

    def forward(self, input, hx=None, lengths=None):
        """Run every layer and direction over ``input``.

        Args:
            input: ``(T, B, I)`` (``(B, T, I)`` with ``batch_first``), unbatched ``(T, I)``, or a
                ``PackedSequence``; the parameters' dtype (or autocast's, where it is on).
            hx: optional ``(h0, c0)``, each ``(L * D, B, P)`` and ``(L * D, B, H)`` (no batch
                dimension for unbatched input); zeros when None. ``P`` is ``proj_size or H``.
            lengths: optional ``(B,)`` integers (tensor or list) in ``[0, T]``: sequence ``b`` runs
                for ``lengths[b]`` steps; its outputs past that are zeros and its final states are
                those at its last step. Not with a ``PackedSequence``.

        Returns:
            ``(output, (h_n, c_n))`` as ``torch.nn.LSTM``: ``output`` ``(T, B, D * P)`` (or packed,
            or batch-first), ``h_n`` ``(L * D, B, P)``, ``c_n`` ``(L * D, B, H)``.
        """
        packed = isinstance(input, PackedSequence)
        if packed:
            if lengths is not None:
                _fail("pass either a PackedSequence or lengths=, not both")
            padded, lengths = pad_packed_sequence(input, batch_first=False)
            x, unbatched = padded, False
        else:
            unbatched = input.dim() == 2
            if input.dim() not in (2, 3):
                _fail(f"input must be 2-D (unbatched) or 3-D, got shape {tuple(input.shape)}")
            x = input.unsqueeze(1) if unbatched else (input.transpose(0, 1) if self.batch_first
                                                      else input)
        x, hx = _in_compute_dtype(x, hx, self.weight_ih_l0.dtype)
        h0, c0 = self._initial_state(x, hx, unbatched)
        lengths = self._check_lengths(lengths, x)
        y, h_n, c_n = self._run_layers(x, h0, c0, lengths)
        if packed:
            output = pack_padded_sequence(y, lengths.cpu(), enforce_sorted=False)
        elif unbatched:
            output, h_n, c_n = y.squeeze(1), h_n.squeeze(1), c_n.squeeze(1)
        else:
            output = y.transpose(0, 1) if self.batch_first else y
        return output, (h_n, c_n)

    def _check_lengths(self, lengths, x):
        if lengths is None:
            return None
        return checked_lengths(lengths, x.shape[0], x.shape[1], x.device, _fail)

    def _initial_state(self, x, hx, unbatched):
        layers = self.num_layers * (2 if self.bidirectional else 1)
        batch = x.shape[1]
        out_size = self.proj_size or self.hidden_size
        if x.shape[-1] != self.input_size:
            _fail(f"input has {x.shape[-1]} features, expected input_size={self.input_size}")
        if hx is None:
            zeros = torch.zeros(layers, batch, self.hidden_size, dtype=x.dtype, device=x.device)
            return (zeros[..., :out_size] if self.proj_size else zeros), zeros
        h0, c0 = hx
        if unbatched:
            h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        for name, t, size in (("h0", h0, out_size), ("c0", c0, self.hidden_size)):
            if t.shape != (layers, batch, size):
                _fail(f"{name} must have shape {(layers, batch, size)}, got {tuple(t.shape)}")
            if t.dtype != x.dtype or t.device != x.device:
                _fail(f"{name} is {t.dtype} on {t.device} but input is {x.dtype} on {x.device}")
        return h0, c0

    def _weights(self, layer, suffix):
        w_ih = getattr(self, f"weight_ih_l{layer}{suffix}")
        w_hh = getattr(self, f"weight_hh_l{layer}{suffix}")
        bias = None
        if self.bias:
            bias = getattr(self, f"bias_ih_l{layer}{suffix}") + getattr(self, f"bias_hh_l{layer}{suffix}")
        w_hr = getattr(self, f"weight_hr_l{layer}{suffix}") if self.proj_size else None
        return w_ih, w_hh, bias, w_hr

    def _layer(self, x, h0, c0, layer, suffix, lengths):
        """One layer in one direction (``suffix`` "" or "_reverse"): (y, h_n, c_n)."""
        weights = _cast(self._weights(layer, suffix), x.dtype)
        return run_lstm_layer(x, h0, c0, *weights, lengths=lengths, reverse=bool(suffix))

    def _run_layers(self, x, h0, c0, lengths):
        directions = 2 if self.bidirectional else 1
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            outs = []
            for d in range(directions):
                index = layer * directions + d
                y, h, c = self._layer(x, h0[index], c0[index], layer, "_reverse" * d, lengths)
                outs.append(y)
                h_n.append(h)
                c_n.append(c)
            x = torch.cat(outs, dim=-1) if directions == 2 else outs[0]
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)
        return x, _stacked(h_n), _stacked(c_n)


class LayerNormLSTM(LSTM):
    """LayerNorm-LSTM (Ba et al. 2016; haste's LayerNormLSTM) with ``LSTM``'s interface.

    Each layer and direction has, besides LSTM's weights and biases, LayerNorm gains for the input
    and the recurrent projection (``layernorm_ih_weight_l{k}``, ``layernorm_hh_weight_l{k}``, 4H)
    and a LayerNorm for the cell before its tanh (``layernorm_c_weight_l{k}``,
    ``layernorm_c_bias_l{k}``, H), initialised to the identity. Gates keep torch's (i, f, g, o)
    order. Takes everything ``LSTM`` takes except ``proj_size``; ``eps`` is the LayerNorm epsilon.
    """

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, eps=1e-5, device=None, dtype=None):
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, 0, device, dtype)
        self.eps = eps
        factory = dict(device=device, dtype=dtype)
        for layer in range(num_layers):
            for suffix in ("", "_reverse")[: 2 if bidirectional else 1]:
                for name, size, value in (("layernorm_ih_weight", 4 * hidden_size, 1.0),
                                          ("layernorm_hh_weight", 4 * hidden_size, 1.0),
                                          ("layernorm_c_weight", hidden_size, 1.0),
                                          ("layernorm_c_bias", hidden_size, 0.0)):
                    self.register_parameter(f"{name}_l{layer}{suffix}",
                                            nn.Parameter(torch.full((size,), value, **factory)))

    def reset_parameters(self):
        """LSTM's uniform initialisation for the weights and biases; LayerNorms to the identity."""
        super().reset_parameters()
        for name, param in self.named_parameters():
            if name.startswith("layernorm_"):
                nn.init.constant_(param, 0.0 if "_bias_" in name else 1.0)

    def _layer(self, x, h0, c0, layer, suffix, lengths):
        w_ih, w_hh, bias, _ = _cast(self._weights(layer, suffix), x.dtype)
        norms = _cast([getattr(self, f"layernorm_{n}_l{layer}{suffix}")
                       for n in ("ih_weight", "hh_weight", "c_weight", "c_bias")], x.dtype)
        # forward() has checked the input, the state and lengths; the parameters are its own.
        return run_layer_norm_lstm_layer(x, h0, c0, w_ih, w_hh, bias, *norms, lengths=lengths,
                                         reverse=bool(suffix), eps=self.eps)


class LSTMCell(nn.LSTMCell):
    """``torch.nn.LSTMCell`` on fastseq's fused cell: same parameters, signature and outputs."""

    def forward(self, input, hx=None):
        """One step: ``input`` ``(B, I)`` or unbatched ``(I,)``, ``hx`` an optional ``(h, c)`` of
        ``(B, H)`` each (zeros when None); returns the next ``(h, c)``, as ``torch.nn.LSTMCell``."""
        unbatched = input.dim() == 1
        x = input.unsqueeze(0) if unbatched else input
        if x.dim() != 2 or x.shape[1] != self.input_size:
            _fail(f"LSTMCell input must be (B, {self.input_size}) or ({self.input_size},), "
                  f"got {tuple(input.shape)}")
        x, hx = _in_compute_dtype(x, hx, self.weight_ih.dtype)
        state = (x.shape[0], self.hidden_size)
        if hx is None:
            h0 = c0 = torch.zeros(state, dtype=x.dtype, device=x.device)
        else:
            h0, c0 = (t.unsqueeze(0) if unbatched else t for t in hx)
            for name, t in (("h0", h0), ("c0", c0)):
                if t.shape != state:
                    _fail(f"LSTMCell {name} must have shape {state}, got {tuple(t.shape)}")
                if t.dtype != x.dtype or t.device != x.device:
                    _fail(f"LSTMCell {name} is {t.dtype} on {t.device} but input is {x.dtype} on "
                          f"{x.device}")
        bias = self.bias_ih + self.bias_hh if self.bias else None
        w_ih, w_hh, bias = _cast((self.weight_ih, self.weight_hh, bias), x.dtype)
        _, h, c = run_lstm_layer(x.unsqueeze(0), h0, c0, w_ih, w_hh, bias)
        return (h.squeeze(0), c.squeeze(0)) if unbatched else (h, c)


def _in_compute_dtype(x, hx, weight_dtype):
    """``(x, hx)`` in the dtype the layers compute in, as ``torch.nn.LSTM`` decides it: where
    autocast is on for x's device, its dtype (weights and state are cast to it as well); else the
    weights' own, which the input must already have (no silent cast, as torch raises too)."""
    device_type = x.device.type
    if (x.is_floating_point() and torch.amp.is_autocast_available(device_type)
            and torch.is_autocast_enabled(device_type)):
        dtype = torch.get_autocast_dtype(device_type)
        return x.to(dtype), (None if hx is None else tuple(t.to(dtype) for t in hx))
    if x.dtype != weight_dtype:
        _fail(f"input dtype {x.dtype} must match the weights' dtype {weight_dtype} (cast the "
              "input, or the module with .to(dtype), or run under torch.autocast)")
    return x, hx


def _cast(tensors, dtype):
    """``tensors`` in ``dtype`` (a differentiable cast where it changes anything), None kept."""
    return [t if t is None or t.dtype == dtype else t.to(dtype) for t in tensors]


def lstm_over_lengths(lstm, x, lengths=None, hx=None):
    """Run a batch-first ``lstm`` over padded ``x`` ``(B, T, I)``, each sequence for its own
    ``lengths[b]`` steps (all ``T`` when None).

    fastseq's :class:`LSTM` takes ``lengths=`` directly; a ``torch.nn.LSTM`` (the same model
    after :func:`fastseq.nn.to_torch_nn`) gets a ``PackedSequence``, as torch.nn code does it.
    Returns ``(output (B, T, D * P), (h_n, c_n))``, the output zeros past each length.
    """
    if lengths is None:
        return lstm(x, hx)
    if isinstance(lstm, LSTM):
        return lstm(x, hx, lengths=lengths)
    packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
    out, state = lstm(packed, hx)
    return pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])[0], state
