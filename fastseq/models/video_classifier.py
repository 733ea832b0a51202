"""Action recognition: each frame of a clip embedded on its own, the frames' embeddings read in order
by an LSTM (or a Transformer encoder), one label per clip.

A clip is ``(T, C, H, W)``; a batch ``(B, T, C, H, W)`` of clips padded to the longest, with
``lengths=`` ``(B,)`` its clips' own frame counts. The frame encoder (a small CNN, or fastseq's
:class:`~fastseq.models.ViT` and its pooled output) runs over all ``B * T`` frames at once, one
batched call; padded frames are encoded too, but nothing of them reaches the logits: fastseq's LSTM
runs each clip for its own length (no packing; ``torch.nn.LSTM`` after
:func:`fastseq.nn.to_torch_nn` gets a ``PackedSequence``), the Transformer masks them out of its
attention as padding keys, and the pooling (last / mean / max) reads valid frames only.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from fastseq.models.inputs import check_lengths, check_positive_ints, describe
from fastseq.models.lstm_tagging import POOLINGS, pool
from fastseq.models.vit import ViT, ViTConfig
from fastseq.nn import LSTM, TransformerEncoder, TransformerEncoderLayer, lstm_over_lengths

FRAME_ENCODERS = ("cnn", "vit")
TEMPORALS = ("lstm", "transformer")


@dataclasses.dataclass
class VideoClassifierConfig:
    """Sizes and options of a :class:`VideoClassifier`."""

    num_classes: int
    image_size: int = 16  # frames are image_size x image_size
    in_chans: int = 1
    frame_encoder: str = "cnn"  # "cnn": conv blocks; "vit": fastseq's ViT, its pooled output
    cnn_channels: tuple[int, ...] = (16, 32)  # one conv block each, each halving the frame's side
    patch_size: int = 4  # the ViT's patches
    encoder_depth: int = 2  # the ViT's blocks
    encoder_heads: int = 4  # the ViT's heads
    embed_dim: int = 64  # a frame's embedding
    temporal: str = "lstm"  # "lstm" or "transformer": what reads the frames in order
    hidden_size: int = 64  # the LSTM's, per direction
    num_layers: int = 1  # LSTM or Transformer layers
    bidirectional: bool = False  # the LSTM's
    num_heads: int = 4  # the temporal Transformer's
    dim_feedforward: int = 128  # the temporal Transformer's
    max_frames: int = 64  # the temporal Transformer's learned positions
    pooling: str = "last"  # over each clip's own frames: "last", "mean" or "max"
    dropout: float = 0.0  # on the frame embeddings and before the head (and inside the Transformer)

    def __post_init__(self):
        self.cnn_channels = tuple(self.cnn_channels)
        check_positive_ints(self, ("num_classes", "image_size", "in_chans", "embed_dim", "hidden_size",
                                   "num_layers", "max_frames"), "VideoClassifierConfig")
        for name, value, allowed in (("frame_encoder", self.frame_encoder, FRAME_ENCODERS),
                                     ("temporal", self.temporal, TEMPORALS),
                                     ("pooling", self.pooling, POOLINGS)):
            if value not in allowed:
                raise ValueError(f"VideoClassifierConfig: {name} must be one of {allowed}, got {value!r}")
        if self.frame_encoder == "cnn":
            if not self.cnn_channels or any(isinstance(c, bool) or not isinstance(c, int) or c < 1
                                            for c in self.cnn_channels):
                raise ValueError(f"VideoClassifierConfig: cnn_channels must be positive ints, got "
                                 f"{self.cnn_channels!r}")
            if self.image_size % 2 ** len(self.cnn_channels):
                raise ValueError(f"VideoClassifierConfig: image_size ({self.image_size}) must be a multiple "
                                 f"of 2**len(cnn_channels) = {2 ** len(self.cnn_channels)} (each block "
                                 "halves the frame)")
        if self.temporal == "transformer" and self.embed_dim % self.num_heads:
            raise ValueError(f"VideoClassifierConfig: embed_dim ({self.embed_dim}) must be a multiple of "
                             f"num_heads ({self.num_heads})")


def check_clips(clips, channels: int, size: int, model: str, name: str = "clips") -> None:
    """Refuse anything but a floating-point ``(B, T, channels, size, size)`` tensor with ``T >= 1``."""
    want = (channels, size, size)
    if not isinstance(clips, torch.Tensor) or clips.dim() != 5 or tuple(clips.shape[2:]) != want \
            or not clips.is_floating_point():
        raise ValueError(f"fastseq {model}: {name} must be a floating-point (B, T, "
                         f"{', '.join(map(str, want))}) tensor, got {describe(clips)}")
    if clips.shape[1] == 0:
        raise ValueError(f"fastseq {model}: {name} have no frames (T = 0)")


class FrameCNN(nn.Module):
    """Frames ``(N, C, H, W)`` -> embeddings ``(N, embed_dim)``: blocks of a 3x3 convolution of stride
    2 (halving the side; cheaper than a full-size convolution and a pooling, for every frame of every
    clip) and ReLU, then a linear layer over the flattened map and its maximum over positions. The
    flattened map keeps *where* things are in the frame (motion is read from that); the maximum says
    *what* is there wherever it is, which the position-by-position weights of the flattened map would
    have to learn again at every position. A LayerNorm last: the sparse frames' embeddings come out
    of the convolutions small, and an LSTM fed small inputs learns slowly (on the moving digits of
    ``examples/classify_moving_digits.py``, 33% held-out accuracy after 400 steps without it, 79%
    with it)."""

    def __init__(self, config: VideoClassifierConfig):
        super().__init__()
        blocks, channels = [], config.in_chans
        for width in config.cnn_channels:
            blocks += [nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.ReLU()]
            channels = width
        self.features = nn.Sequential(*blocks)
        side = config.image_size >> len(config.cnn_channels)
        self.proj = nn.Linear(channels * (side * side + 1), config.embed_dim)
        self.norm = nn.LayerNorm(config.embed_dim)

    def forward(self, frames):
        maps = self.features(frames)
        return self.norm(self.proj(torch.cat([maps.flatten(1), maps.amax((2, 3))], 1)))


def frame_vit(config: VideoClassifierConfig) -> ViT:
    """fastseq's ViT without its head: frames ``(N, C, H, W)`` -> the class token ``(N, embed_dim)``
    (learned positions over the patches, so that it too knows where things are)."""
    return ViT(ViTConfig(img_size=config.image_size, patch_size=config.patch_size, in_chans=config.in_chans,
                         num_classes=0, embed_dim=config.embed_dim, depth=config.encoder_depth,
                         num_heads=config.encoder_heads, mlp_ratio=2.0))


class TemporalLSTM(nn.Module):
    """Frame embeddings ``(B, T, embed_dim)``, ``lengths`` -> ``(B, T, directions * hidden_size)``,
    each clip run for its own frames (zeros past them)."""

    def __init__(self, config: VideoClassifierConfig):
        super().__init__()
        self.lstm = LSTM(config.embed_dim, config.hidden_size, config.num_layers, batch_first=True,
                         bidirectional=config.bidirectional,
                         dropout=config.dropout if config.num_layers > 1 else 0.0)

    def forward(self, x, lengths):
        return lstm_over_lengths(self.lstm, x, lengths)[0]


class TemporalTransformer(nn.Module):
    """Frame embeddings ``(B, T, embed_dim)``, ``lengths`` -> ``(B, T, embed_dim)``: learned positions
    added, then pre-norm Transformer encoder layers in which a clip's padded frames are padding keys
    (no frame attends to them; their own outputs are computed and ignored)."""

    def __init__(self, config: VideoClassifierConfig):
        super().__init__()
        self.max_frames = config.max_frames
        self.positions = nn.Parameter(torch.randn(config.max_frames, config.embed_dim) * 0.02)
        layer = TransformerEncoderLayer(config.embed_dim, config.num_heads, config.dim_feedforward,
                                        config.dropout, activation="gelu", batch_first=True, norm_first=True)
        # enable_nested_tensor=False: torch.nn's build would refuse it for pre-norm layers, with a warning
        self.encoder = TransformerEncoder(layer, config.num_layers, nn.LayerNorm(config.embed_dim),
                                          enable_nested_tensor=False)

    def forward(self, x, lengths):
        frames = x.shape[1]
        if frames > self.max_frames:
            raise ValueError(f"fastseq VideoClassifier: clips have {frames} frames, more than "
                             f"max_frames={self.max_frames}")
        padding = None if lengths is None else torch.arange(frames, device=x.device) >= lengths[:, None]
        return self.encoder(x + self.positions[:frames], src_key_padding_mask=padding)


class VideoClassifier(nn.Module):
    """``forward(clips (B, T, in_chans, image_size, image_size), lengths=None)`` -> logits
    ``(B, num_classes)``; ``lengths`` ``(B,)`` in ``[1, T]``: each clip's real frames, the first
    ``lengths[b]`` (all ``T`` when None)."""

    def __init__(self, config: VideoClassifierConfig):
        super().__init__()
        self.config = config
        self.frames = FrameCNN(config) if config.frame_encoder == "cnn" else frame_vit(config)
        self.drop = nn.Dropout(config.dropout)
        if config.temporal == "lstm":
            self.temporal = TemporalLSTM(config)
            width = config.hidden_size * (2 if config.bidirectional else 1)
        else:
            self.temporal = TemporalTransformer(config)
            width = config.embed_dim
        self.head = nn.Linear(width, config.num_classes)

    def embed_frames(self, clips):
        """Clips ``(B, T, C, H, W)`` -> frame embeddings ``(B, T, embed_dim)``, every frame in one call."""
        batch, frames = clips.shape[:2]
        return self.frames(clips.flatten(0, 1)).view(batch, frames, -1)

    def forward(self, clips, lengths=None):
        config = self.config
        check_clips(clips, config.in_chans, config.image_size, "VideoClassifier")
        lengths = check_lengths(lengths, clips.shape[0], clips.shape[1], "VideoClassifier")
        out = self.temporal(self.drop(self.embed_frames(clips)), lengths)
        # "last" of a bidirectional LSTM: the forward direction's last frame, the backward's first
        split = config.hidden_size if config.temporal == "lstm" else None
        return self.head(self.drop(pool(out, lengths, config.pooling, split)))
