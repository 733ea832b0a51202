"""``RNN``: a drop-in for ``torch.nn.RNN`` (the Elman RNN), running fastseq's fused RNN layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from fastseq.nn.lstm import _cast, _stacked
from fastseq.ops.lstm import checked_lengths
from fastseq.ops.rnn import NONLINEARITIES, run_rnn_layer


def _fail(message):
    raise ValueError(f"fastseq RNN: {message}")


class RNN(nn.Module):
    """``torch.nn.RNN`` on fastseq kernels: same constructor, parameters, initialisation, state
    dicts and outputs.

    Takes batched or unbatched input, ``batch_first``, an optional ``h0``, and a
    ``PackedSequence`` (returned packed, as torch does). Beyond torch: ``lengths=`` (B,) on a
    padded batch runs each sequence for its own length, with no packing, and the padding costs
    no arithmetic; outputs past a sequence's length are zeros. Inter-layer dropout draws from
    torch's generator. Not a subclass of ``nn.RNN``, as ``fastseq.nn.LSTM`` is not one of
    ``nn.LSTM`` (``torch.compile`` refuses to trace those).
    """

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False, device=None, dtype=None):
        super().__init__()
        for name, value, least in (("input_size", input_size, 0), ("hidden_size", hidden_size, 1),
                                   ("num_layers", num_layers, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                _fail(f"{name} must be an int >= {least}, got {value!r}")
        if nonlinearity not in NONLINEARITIES:
            _fail(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout <= 1:
            _fail(f"dropout must be a number in [0, 1], got {dropout!r}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.nonlinearity, self.bias, self.batch_first = nonlinearity, bias, batch_first
        self.dropout, self.bidirectional = float(dropout), bidirectional
        factory = dict(device=device, dtype=dtype)
        directions = 2 if bidirectional else 1
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else hidden_size * directions
            for suffix in ("", "_reverse")[:directions]:
                shapes = {"weight_ih": (hidden_size, layer_input),
                          "weight_hh": (hidden_size, hidden_size)}
                if bias:
                    shapes.update(bias_ih=(hidden_size,), bias_hh=(hidden_size,))
                for name, shape in shapes.items():
                    self.register_parameter(f"{name}_l{layer}{suffix}",
                                            nn.Parameter(torch.empty(shape, **factory)))
        self.reset_parameters()

    def reset_parameters(self):
        """torch.nn.RNN's initialisation: every weight uniform in +-1/sqrt(hidden_size), drawn in
        the same order (the same seed gives the same weights)."""
        bound = 1.0 / self.hidden_size**0.5
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def flatten_parameters(self):
        """Accepted for compatibility with ``torch.nn.RNN``: fastseq keeps no flat weight buffer."""

    def extra_repr(self):
        s = f"{self.input_size}, {self.hidden_size}"
        for name, default in (("num_layers", 1), ("nonlinearity", "tanh"), ("bias", True),
                              ("batch_first", False), ("dropout", 0.0), ("bidirectional", False)):
            if getattr(self, name) != default:
                s += f", {name}={getattr(self, name)!r}"
        return s

    def forward(self, input, hx=None, lengths=None):
        """Run every layer and direction over ``input``.

        Args:
            input: ``(T, B, I)`` (``(B, T, I)`` with ``batch_first``), unbatched ``(T, I)``, or a
                ``PackedSequence``; the parameters' dtype (or autocast's, where it is on).
            hx: optional ``h0`` ``(L * D, B, H)`` (``(L * D, H)`` for unbatched input); zeros
                when None.
            lengths: optional ``(B,)`` integers (tensor or list) in ``[0, T]``, in any order:
                sequence ``b`` runs for ``lengths[b]`` steps; its outputs past that are zeros and
                its final state is the one at its last step. Not with a ``PackedSequence``.

        Returns:
            ``(output, h_n)`` as ``torch.nn.RNN``: ``output`` ``(T, B, D * H)`` (or packed, or
            batch-first), ``h_n`` ``(L * D, B, H)``.
        """
        packed = isinstance(input, PackedSequence)
        if packed:
            if lengths is not None:
                _fail("pass either a PackedSequence or lengths=, not both")
            x, lengths = pad_packed_sequence(input, batch_first=False)
            unbatched = False
        else:
            if not isinstance(input, torch.Tensor) or input.dim() not in (2, 3):
                _fail(f"input must be a 2-D (unbatched) or 3-D tensor, got "
                      f"{tuple(input.shape) if isinstance(input, torch.Tensor) else type(input).__name__}")
            unbatched = input.dim() == 2
            x = input.unsqueeze(1) if unbatched else (input.transpose(0, 1) if self.batch_first
                                                      else input)
        x, hx = self._in_compute_dtype(x, hx)
        h0 = self._initial_state(x, hx, unbatched)
        if lengths is not None:
            lengths = checked_lengths(lengths, x.shape[0], x.shape[1], x.device, _fail)
        y, h_n = self._run_layers(x, h0, lengths)
        if packed:
            output = pack_padded_sequence(y, lengths.cpu(), enforce_sorted=False)
        elif unbatched:
            output, h_n = y.squeeze(1), h_n.squeeze(1)
        else:
            output = y.transpose(0, 1) if self.batch_first else y
        return output, h_n

    def _in_compute_dtype(self, x, hx):
        """``(x, hx)`` in the dtype the layers compute in, as ``torch.nn.RNN`` decides it: where
        autocast is on for x's device, its dtype; else the weights' own, which the input must
        already have (no silent cast)."""
        device_type = x.device.type
        if (x.is_floating_point() and torch.amp.is_autocast_available(device_type)
                and torch.is_autocast_enabled(device_type)):
            dtype = torch.get_autocast_dtype(device_type)
            return x.to(dtype), (None if hx is None else hx.to(dtype))
        weight_dtype = self.weight_ih_l0.dtype
        if x.dtype != weight_dtype:
            _fail(f"input dtype {x.dtype} must match the weights' dtype {weight_dtype} (cast the "
                  "input, or the module with .to(dtype), or run under torch.autocast)")
        return x, hx

    def _initial_state(self, x, hx, unbatched):
        layers = self.num_layers * (2 if self.bidirectional else 1)
        batch = x.shape[1]
        if x.shape[-1] != self.input_size:
            _fail(f"input has {x.shape[-1]} features, expected input_size={self.input_size}")
        if hx is None:
            return torch.zeros(layers, batch, self.hidden_size, dtype=x.dtype, device=x.device)
        if not isinstance(hx, torch.Tensor):
            _fail(f"hx must be a tensor (h0), got {type(hx).__name__}")
        expected = (layers, self.hidden_size) if unbatched else (layers, batch, self.hidden_size)
        if tuple(hx.shape) != expected:
            _fail(f"h0 must have shape {expected}, got {tuple(hx.shape)}")
        if hx.dtype != x.dtype or hx.device != x.device:
            _fail(f"h0 is {hx.dtype} on {hx.device} but input is {x.dtype} on {x.device}")
        return hx.unsqueeze(1) if unbatched else hx

    def _layer(self, x, h0, layer, suffix, lengths):
        """One layer in one direction (``suffix`` "" or "_reverse"): (y, h_n)."""
        w_ih = getattr(self, f"weight_ih_l{layer}{suffix}")
        w_hh = getattr(self, f"weight_hh_l{layer}{suffix}")
        bias = None
        if self.bias:
            bias = getattr(self, f"bias_ih_l{layer}{suffix}") + getattr(self, f"bias_hh_l{layer}{suffix}")
        w_ih, w_hh, bias = _cast((w_ih, w_hh, bias), x.dtype)
        return run_rnn_layer(x, h0, w_ih, w_hh, bias, lengths=lengths, reverse=bool(suffix),
                             nonlinearity=self.nonlinearity)

    def _run_layers(self, x, h0, lengths):
        directions = 2 if self.bidirectional else 1
        h_n = []
        for layer in range(self.num_layers):
            outs = []
            for d in range(directions):
                y, h = self._layer(x, h0[layer * directions + d], layer, "_reverse" * d, lengths)
                outs.append(y)
                h_n.append(h)
            x = torch.cat(outs, dim=-1) if directions == 2 else outs[0]
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)
        return x, _stacked(h_n)
