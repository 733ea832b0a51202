"""``to_torch_nn``: the same model with every fastseq drop-in replaced by its torch.nn original.

The copy holds the same weights and computes the same function on torch's own kernels: the
baseline a model's benchmark compares against, and a way to hand a model trained with fastseq to
code that expects plain torch.nn modules.
"""

from __future__ import annotations

import copy

from torch import nn

from fastseq.nn.lstm import LSTM, LayerNormLSTM, LSTMCell
from fastseq.nn.multihead_attention import MultiheadAttention
from fastseq.nn.rnn import RNN
from fastseq.nn.transformer import (
    Transformer,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)


def to_torch_nn(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in which each fastseq ``LSTM``, ``LSTMCell``, ``RNN``,
    ``MultiheadAttention`` and ``Transformer*`` module is the torch.nn module of the same
    arguments, holding the same parameters (in the same dtype, device and train/eval mode).

    Raises ValueError for a module torch.nn has no equivalent of (``LayerNormLSTM``, a
    Transformer layer with ``rotary``).
    """
    model = copy.deepcopy(model)
    twin = _twin(model)
    if twin is not None:
        return twin
    _replace_children(model)
    return model


def _replace_children(module: nn.Module) -> None:
    for name, child in module.named_children():
        twin = _twin(child)
        if twin is None:
            _replace_children(child)
        else:
            setattr(module, name, twin)


def _twin(module: nn.Module) -> nn.Module | None:
    """The torch.nn module equivalent to a fastseq one, loaded with its state; None for others."""
    twin = _build(module)
    if twin is None:
        return None
    reference = next(module.parameters(), None)
    if reference is not None:
        twin = twin.to(device=reference.device, dtype=reference.dtype)
    twin.load_state_dict(module.state_dict())
    return twin.train(module.training)


def _build(module: nn.Module) -> nn.Module | None:
    if isinstance(module, LayerNormLSTM):
        raise ValueError("to_torch_nn: torch.nn has no LayerNormLSTM")
    if isinstance(module, LSTM):
        return nn.LSTM(module.input_size, module.hidden_size, module.num_layers, module.bias,
                       module.batch_first, module.dropout, module.bidirectional, module.proj_size)
    if isinstance(module, LSTMCell):
        return nn.LSTMCell(module.input_size, module.hidden_size, module.bias)
    if isinstance(module, RNN):
        return nn.RNN(module.input_size, module.hidden_size, module.num_layers,
                      nonlinearity=module.nonlinearity, bias=module.bias,
                      batch_first=module.batch_first, dropout=module.dropout,
                      bidirectional=module.bidirectional)
    if isinstance(module, MultiheadAttention):
        return nn.MultiheadAttention(module.embed_dim, module.num_heads, module.dropout,
                                     bias=module.in_proj_bias is not None,
                                     add_bias_kv=module.bias_k is not None,
                                     add_zero_attn=module.add_zero_attn, kdim=module.kdim,
                                     vdim=module.vdim, batch_first=module.batch_first)
    if isinstance(module, TransformerEncoderLayer | TransformerDecoderLayer):
        return _layer(module)
    if isinstance(module, TransformerEncoder):
        return nn.TransformerEncoder(_layer(module.layers[0]), module.num_layers,
                                     _norm(module.norm), enable_nested_tensor=module.enable_nested_tensor,
                                     mask_check=module.mask_check)
    if isinstance(module, TransformerDecoder):
        return nn.TransformerDecoder(_layer(module.layers[0]), module.num_layers, _norm(module.norm))
    if isinstance(module, Transformer):
        return nn.Transformer(module.d_model, module.nhead, custom_encoder=_build(module.encoder),
                              custom_decoder=_build(module.decoder), batch_first=module.batch_first)
    return None


def _norm(norm):
    return None if norm is None else copy.deepcopy(norm)


def _layer(layer):
    if layer.rotary is not None:
        raise ValueError("to_torch_nn: torch.nn's Transformer layers have no rotary embeddings")
    decoder = isinstance(layer, TransformerDecoderLayer)
    kind = nn.TransformerDecoderLayer if decoder else nn.TransformerEncoderLayer
    return kind(layer.d_model, layer.self_attn.num_heads, layer.linear1.out_features, layer.dropout.p,
                layer.activation, layer.norm1.eps, layer.batch_first, layer.norm_first,
                bias=layer.linear1.bias is not None)
