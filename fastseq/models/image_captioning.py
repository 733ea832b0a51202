"""An image captioner: a conditional language model over an image's patch features, with attention.

The image encoder turns ``(B, C, H, W)`` images into a sequence of patch features ``(B, P, width)``,
one per ``patch_size`` square, row by row, with learned positions:

- ``encoder="vit"``: the Vision Transformer's patch embedding and pre-norm blocks
  (:mod:`fastseq.models.vit`), without a class token: every patch token is kept;
- ``encoder="cnn"``: two 3x3 convolutions at full resolution, then a ``patch_size``-strided one
  down to the patch grid.

The decoder writes the caption a word at a time, attending over the patches:

- ``decoder="lstm"``: a ``fastseq.nn.LSTMCell`` with the Bahdanau or Luong attention of
  :mod:`fastseq.models.seq2seq` (input feeding for Luong), its state started from the mean patch;
- ``decoder="transformer"``: a pre-norm ``fastseq.nn.TransformerDecoder`` whose cross-attention
  reads the patches; generation decodes over its KV cache (:meth:`TransformerDecoder.new_cache`).

Training uses teacher forcing; :meth:`ImageCaptioner.generate` decodes greedily or with beam search
(:func:`fastseq.models.decoding.beam_search`); :meth:`ImageCaptioner.attention_maps` says where
each word looked. ``fastseq.nn.to_torch_nn(model)`` puts the decoder on torch.nn's modules; the
ViT blocks call fastseq's ``scaled_dot_product_attention`` in both builds (torch.nn has no ViT).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from fastseq.models.decoding import beam_search
from fastseq.models.inputs import check_decoding, check_positive_ints, check_token_ids, describe
from fastseq.models.seq2seq import ATTENTIONS, Attention, EncodedSource
from fastseq.models.transformer_seq2seq import sinusoids
from fastseq.models.vit import Block, PatchEmbed, ViTConfig
from fastseq.nn import LSTMCell, Transformer, TransformerDecoder, TransformerDecoderLayer

ENCODERS = ("vit", "cnn")
DECODERS = ("lstm", "transformer")


@dataclasses.dataclass
class ImageCaptionerConfig:
    """Image geometry, sizes, the encoder and decoder kinds and the special tokens of an
    :class:`ImageCaptioner`. ``width`` is the patch features' and the decoder's."""

    vocab_size: int
    image_height: int = 8
    image_width: int = 32
    in_chans: int = 1
    patch_size: int = 4
    encoder: str = "vit"
    decoder: str = "transformer"
    width: int = 64
    encoder_layers: int = 2  # ViT blocks (the CNN has its fixed three convolutions)
    encoder_heads: int = 4
    decoder_layers: int = 2  # Transformer decoder layers (the LSTM decoder is one cell)
    decoder_heads: int = 4
    mlp_ratio: float = 2.0  # feed-forward width / width, in the ViT blocks and the decoder layers
    attention: str = "luong"  # the LSTM decoder's: "luong" or "bahdanau"
    dropout: float = 0.0
    max_len: int = 32  # longest caption, BOS included (the Transformer's positions)
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self):
        what = "ImageCaptionerConfig"
        check_positive_ints(self, ("vocab_size", "image_height", "image_width", "in_chans", "patch_size",
                                   "width", "encoder_layers", "encoder_heads", "decoder_layers",
                                   "decoder_heads", "max_len"), what)
        for name, value, choices in (("encoder", self.encoder, ENCODERS), ("decoder", self.decoder, DECODERS),
                                     ("attention", self.attention, ATTENTIONS)):
            if value not in choices:
                raise ValueError(f"{what}: {name} must be one of {choices}, got {value!r}")
        for name in ("image_height", "image_width"):
            if getattr(self, name) % self.patch_size:
                raise ValueError(f"{what}: {name} ({getattr(self, name)}) must be a multiple of "
                                 f"patch_size ({self.patch_size})")
        for name in ("encoder_heads", "decoder_heads"):
            if self.width % getattr(self, name):
                raise ValueError(f"{what}: width ({self.width}) must be a multiple of {name} "
                                 f"({getattr(self, name)})")
        for name in ("pad_id", "bos_id", "eos_id"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ValueError(f"{what}: {name} must be an int in [0, {self.vocab_size}), got {value!r}")

    @property
    def grid(self) -> tuple[int, int]:
        """Patches per column and per row: ``(image_height, image_width) / patch_size``."""
        return self.image_height // self.patch_size, self.image_width // self.patch_size

    @property
    def num_patches(self) -> int:
        rows, columns = self.grid
        return rows * columns


def check_images(images, config: ImageCaptionerConfig, model: str, name: str = "images") -> None:
    """Refuse anything but a floating ``(B, in_chans, image_height, image_width)`` tensor (the
    shared :func:`fastseq.models.inputs.check_images` takes square images only)."""
    want = (config.in_chans, config.image_height, config.image_width)
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != want \
            or not images.is_floating_point():
        raise ValueError(f"fastseq {model}: {name} must be a floating (B, {', '.join(map(str, want))}) "
                         f"tensor, got {describe(images)}")


# -- encoders: images (B, C, H, W) -> patch features (B, P, width) --------------------------------


class ViTEncoder(nn.Module):
    """The ViT's patch embedding, learned positions, pre-norm blocks and final norm; no class
    token: the output is every patch's token."""

    def __init__(self, config: ImageCaptionerConfig):
        super().__init__()
        vit = ViTConfig(img_size=config.patch_size,  # unread by the parts taken: the grid is ours
                        patch_size=config.patch_size, in_chans=config.in_chans, num_classes=0,
                        embed_dim=config.width, depth=config.encoder_layers, num_heads=config.encoder_heads,
                        mlp_ratio=config.mlp_ratio, class_token=False, global_pool="avg",
                        dropout=config.dropout)
        self.patch_embed = PatchEmbed(vit)
        self.pos_embed = nn.Parameter(torch.randn(1, config.num_patches, config.width) * 0.02)
        self.blocks = nn.Sequential(*(Block(vit) for _ in range(config.encoder_layers)))
        self.norm = nn.LayerNorm(config.width, eps=vit.norm_eps)

    def forward(self, images):
        return self.norm(self.blocks(self.patch_embed(images) + self.pos_embed))


class CNNEncoder(nn.Module):
    """Two 3x3 convolutions at full resolution (``width / 2`` channels), a ``patch_size``-strided
    convolution to the patch grid, learned positions (a convolution alone cannot tell the decoder
    which digit comes first) and a LayerNorm."""

    def __init__(self, config: ImageCaptionerConfig):
        super().__init__()
        channels = max(1, config.width // 2)
        self.conv1 = nn.Conv2d(config.in_chans, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.down = nn.Conv2d(channels, config.width, config.patch_size, config.patch_size)
        self.pos_embed = nn.Parameter(torch.randn(1, config.num_patches, config.width) * 0.02)
        self.norm = nn.LayerNorm(config.width)

    def forward(self, images):
        x = F.gelu(self.conv2(F.gelu(self.conv1(images))))
        return self.norm(self.down(x).flatten(2).transpose(1, 2) + self.pos_embed)


# -- decoders: patch features (B, P, width) and caption tokens -> next-token logits --------------
# Each one has forward (teacher forcing), attention (per-token weights over the patches) and the
# three pieces beam search runs: start (the state for B * beams rows), step and reorder.


class LSTMDecoder(nn.Module):
    """An LSTM cell attending over the patches at every step (:class:`seq2seq.Attention`): the
    step of :class:`fastseq.models.Seq2Seq`, with its state started from the mean patch."""

    def __init__(self, config: ImageCaptionerConfig):
        super().__init__()
        width = config.width
        self.kind = config.attention
        self.embedding = nn.Embedding(config.vocab_size, width, padding_idx=config.pad_id)
        self.bridge = nn.Linear(width, 2 * width)  # mean patch -> (h0, c0)
        self.cell = LSTMCell(2 * width, width)  # the word and the context (Bahdanau) / last output (Luong)
        self.attention = Attention(width, config.attention)
        self.combine = nn.Linear(2 * width, width, bias=False)
        self.head = nn.Linear(width, config.vocab_size)
        self.drop = nn.Dropout(config.dropout)

    def _source(self, patches):
        """The patches as :class:`EncodedSource` (all valid) and the first state ``(h, c, feed)``."""
        valid = torch.ones(patches.shape[:2], dtype=torch.bool, device=patches.device)
        h0, c0 = torch.tanh(self.bridge(patches.mean(1))).chunk(2, -1)
        return EncodedSource(patches, self.attention.key_proj(patches), valid), (h0, c0, torch.zeros_like(h0))

    def _step(self, token, state, source):
        """One step for ``token`` ``(B,)``: ``(attentional vector (B, width), state, weights (B, P))``."""
        h, c, feed = state
        embedded = self.drop(self.embedding(token))
        if self.kind == "bahdanau":  # scores from the previous state; the context is the cell's input
            feed, weights = self.attention(h, source)
        h, c = self.cell(torch.cat([embedded, feed], -1), (h, c))
        if self.kind == "luong":  # scores from the new state; the output is fed to the next step
            context, weights = self.attention(h, source)
        else:
            context = feed
        out = torch.tanh(self.combine(torch.cat([h, context], -1)))
        return out, (h, c, out if self.kind == "luong" else feed), weights

    def _unroll(self, patches, tokens):
        source, state = self._source(patches)
        outs, weights = [], []
        for t in range(tokens.shape[1]):
            out, state, w = self._step(tokens[:, t], state, source)
            outs.append(out)
            weights.append(w)
        return torch.stack(outs, 1), torch.stack(weights, 1)

    def forward(self, patches, tokens):
        return self.head(self.drop(self._unroll(patches, tokens)[0]))

    def attention_weights(self, patches, tokens):
        return self._unroll(patches, tokens)[1]

    def start(self, patches, beam_size: int, max_len: int):
        source, state = self._source(patches)
        return source.repeat(beam_size), tuple(t.repeat_interleave(beam_size, 0) for t in state)

    def step(self, token, state):
        source, recurrent = state
        out, recurrent, _ = self._step(token, recurrent, source)
        return F.log_softmax(self.head(out), -1), (source, recurrent)

    def reorder(self, state, index):
        source, recurrent = state  # a source's beams share its patches: only the LSTM state moves
        return source, tuple(t.index_select(0, index) for t in recurrent)


class TransformerCaptionDecoder(nn.Module):
    """Word embeddings scaled by ``sqrt(width)`` plus sinusoidal positions, a pre-norm
    ``fastseq.nn.TransformerDecoder`` (GELU) cross-attending to the patches, and an output layer
    tied to the embedding."""

    def __init__(self, config: ImageCaptionerConfig):
        super().__init__()
        width = config.width
        self.embedding = nn.Embedding(config.vocab_size, width, padding_idx=config.pad_id)
        self.register_buffer("sinusoids", sinusoids(config.max_len, width), persistent=False)
        layer = TransformerDecoderLayer(width, config.decoder_heads, int(width * config.mlp_ratio),
                                        config.dropout, activation="gelu", batch_first=True, norm_first=True)
        self.decoder = TransformerDecoder(layer, config.decoder_layers, nn.LayerNorm(width))
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(width, config.vocab_size, bias=False)
        nn.init.normal_(self.embedding.weight, std=width**-0.5)
        self.head.weight = self.embedding.weight

    def _embed(self, tokens, offset: int = 0):
        x = self.embedding(tokens) * math.sqrt(self.embedding.embedding_dim)
        return self.drop(x + self.sinusoids[offset:offset + tokens.shape[1]].to(x.dtype))

    def _decode(self, patches, tokens):
        # The mask is for torch.nn's decoder (see fastseq.nn.to_torch_nn), which needs it with the
        # hint; fastseq's runs the causal kernel without reading it.
        causal = Transformer.generate_square_subsequent_mask(tokens.shape[1], device=tokens.device)
        return self.decoder(self._embed(tokens), patches, tgt_mask=causal, tgt_is_causal=True)

    def forward(self, patches, tokens):
        return self.head(self._decode(patches, tokens))

    def attention_weights(self, patches, tokens):
        """The last layer's cross-attention weights, averaged over heads. fastseq's attention
        kernel returns no weights, so they are recomputed here from that layer's queries and the
        patches' keys with a plain softmax (a diagnostic path: the kernel's output is unchanged)."""
        layer = self.decoder.layers[-1]
        captured = {}
        # Pre-norm: the cross-attention's queries come from norm2's output.
        hook = layer.norm2.register_forward_hook(lambda module, args, out: captured.update(query=out))
        try:
            self._decode(patches, tokens)
        finally:
            hook.remove()
        attention = layer.multihead_attn
        q = attention.query_heads(captured["query"])
        k, _ = attention.key_value_heads(patches)
        return (q @ k.transpose(-1, -2) / math.sqrt(attention.head_dim)).softmax(-1).mean(1)

    def start(self, patches, beam_size: int, max_len: int):
        return self.decoder.new_cache(patches.repeat_interleave(beam_size, 0), max_len), 0

    def step(self, token, state):
        cache, position = state
        out = self.decoder(self._embed(token[:, None], position), cache=cache)
        return F.log_softmax(self.head(out[:, 0]), -1), (cache, position + 1)

    def reorder(self, state, index):
        state[0].reorder(index, memory=False)  # a source's beams share its patches' keys/values
        return state


class ImageCaptioner(nn.Module):
    """``forward(images (B, C, H, W), captions_in (B, T))`` -> logits ``(B, T, vocab_size)``;
    ``captions_in`` starts with BOS (teacher forcing). :meth:`encode` gives the patch features
    ``(B, P, width)``, :meth:`generate` the captions, :meth:`attention_maps` where each word looked."""

    def __init__(self, config: ImageCaptionerConfig):
        super().__init__()
        self.config = config
        self.encoder = ViTEncoder(config) if config.encoder == "vit" else CNNEncoder(config)
        self.decoder = LSTMDecoder(config) if config.decoder == "lstm" else TransformerCaptionDecoder(config)

    def _check_tokens(self, images, tokens, name: str):
        config = self.config
        check_token_ids(tokens, config.vocab_size, "ImageCaptioner", name)
        if tokens.shape[1] > config.max_len:
            raise ValueError(f"fastseq ImageCaptioner: {name} has {tokens.shape[1]} positions, more than "
                             f"max_len={config.max_len}")
        if isinstance(images, torch.Tensor) and images.dim() and tokens.shape[0] != images.shape[0]:
            raise ValueError(f"fastseq ImageCaptioner: images and {name} must have the same batch size, "
                             f"got {tuple(images.shape)} and {tuple(tokens.shape)}")

    def encode(self, images):
        """``images`` ``(B, in_chans, image_height, image_width)`` -> patch features ``(B, P, width)``."""
        check_images(images, self.config, "ImageCaptioner")
        return self.encoder(images)

    def forward(self, images, captions_in):
        self._check_tokens(images, captions_in, "captions_in")
        return self.decoder(self.encode(images), captions_in)

    @torch.no_grad()
    def attention_maps(self, images, tokens):
        """Where each word of ``tokens`` ``(B, T)`` (a caption without BOS, as :meth:`generate`
        returns it) looked: ``(B, T, P)`` weights over the patches (row-major over
        ``config.grid``), each row summing to 1. Row ``t`` is the attention of the step that
        produced ``tokens[:, t]``: the LSTM's attention, or the Transformer's last cross-attention
        averaged over its heads. Call ``eval()`` first to turn dropout off."""
        self._check_tokens(images, tokens, "tokens")
        bos = torch.full((tokens.shape[0], 1), self.config.bos_id, dtype=tokens.dtype, device=tokens.device)
        captions_in = torch.cat([bos, tokens], 1)[:, :tokens.shape[1]]  # what each step read
        return self.decoder.attention_weights(self.encode(images), captions_in)

    @torch.no_grad()
    def generate(self, images, max_len: int | None = None, beam_size: int = 1, length_penalty: float = 1.0,
                 stop_at_eos: bool = True):
        """Caption ``images``: ``(B, L)`` tokens after BOS, ending at EOS (``eos_id`` fills the rest),
        ``L <= max_len`` (default: the config's); ``beam_size=1`` is greedy; ``stop_at_eos=False``
        decodes ``max_len`` tokens whatever they are. The Transformer decoder runs each new token
        through its KV cache. Call ``eval()`` first to turn dropout off."""
        config = self.config
        max_len = config.max_len if max_len is None else max_len
        check_decoding(max_len, beam_size, "ImageCaptioner")
        if max_len > config.max_len:
            raise ValueError(f"fastseq ImageCaptioner: max_len must be at most the config's "
                             f"max_len={config.max_len}, got {max_len}")
        patches = self.encode(images)
        state = self.decoder.start(patches, beam_size, max_len)
        # Greedy search keeps every row where it is: no reordering to pay for.
        reorder = self.decoder.reorder if beam_size > 1 else (lambda state, index: state)
        tokens, _ = beam_search(self.decoder.step, reorder, state, images.shape[0], beam_size=beam_size,
                                max_len=max_len, bos_id=config.bos_id,
                                eos_id=config.eos_id if stop_at_eos else None,
                                length_penalty=length_penalty, device=images.device)
        return tokens
