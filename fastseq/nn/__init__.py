"""Drop-in ``torch.nn`` modules built on ``fastseq.ops``."""

from fastseq.nn import functional
from fastseq.nn.attention import Attention, KVCache
from fastseq.nn.convert import to_torch_nn
from fastseq.nn.linear import Linear
from fastseq.nn.lstm import LSTM, LayerNormLSTM, LSTMCell, lstm_over_lengths
from fastseq.nn.multihead_attention import MultiheadAttention
from fastseq.nn.rnn import RNN
from fastseq.nn.rope_scaling import RopeScaling
from fastseq.nn.rotary import RotaryEmbedding
from fastseq.nn.spatial_transformer import CrossAttention, SpatialTransformer
from fastseq.nn.transformer import (
    Transformer,
    TransformerDecoder,
    TransformerDecoderCache,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)

__all__ = [
    "LSTM",
    "Attention",
    "CrossAttention",
    "KVCache",
    "LayerNormLSTM",
    "Linear",
    "LSTMCell",
    "MultiheadAttention",
    "RNN",
    "RopeScaling",
    "RotaryEmbedding",
    "SpatialTransformer",
    "Transformer",
    "TransformerDecoder",
    "TransformerDecoderCache",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "functional",
    "lstm_over_lengths",
    "to_torch_nn",
]
