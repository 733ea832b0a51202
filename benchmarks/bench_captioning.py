"""The image captioner against its torch.nn build.

Each baseline is the same model holding the same weights with its decoder on torch.nn's modules
(``fastseq.nn.to_torch_nn``: ``nn.TransformerDecoder``, ``nn.LSTMCell``); the ViT encoder's
blocks call fastseq's ``scaled_dot_product_attention`` in both builds (torch.nn has no ViT; the
``vit`` suite compares them with timm), so the ratios measure the decoders. The model: 3x32x32
images in 4x4 patches (64 patch features) through 2 ViT blocks of width 256, a 2000-word
vocabulary. Cases, float32:

* ``train step``: forward on 16-token captions, cross-entropy, backward and an AdamW step, for the
  Transformer decoder (3 layers, 8 heads) and the LSTM decoder (Luong attention);
* ``transformer decode 16 tokens``: greedy captions of 16 tokens, fastseq's over the decoder's KV
  cache against torch.nn's decoder rerun over the whole prefix at every step (what
  ``nn.TransformerDecoder`` offers), and fastseq's own decoder rerun the same way (``rerun``);
* ``lstm decode 16 tokens``: greedy captions with the LSTM decoder, a step at a time in both builds
  (the carried state is their cache).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastseq.bench import Case
from fastseq.benchmarks.training import train_step
from fastseq.models import ImageCaptioner, ImageCaptionerConfig
from fastseq.nn import to_torch_nn

SUITE = "captioning"

# No headlines until a full run's results are committed (a headline must name a measured case).
HEADLINES = ("transformer train step fp32 B32 T16", "transformer decode fp32 B8 16 tokens",
             "lstm train step fp32 B32 T16")
HEADLINE_BASELINES = ("torch.nn",)
SOURCES = ("benchmarks/training.py", "fastseq/models/image_captioning.py", "fastseq/models/vit.py",
           "fastseq/models/seq2seq.py", "fastseq/models/transformer_seq2seq.py",
           "fastseq/models/decoding.py", "fastseq/models/inputs.py", "fastseq/nn/*.py", "fastseq/ops/*.py",
           "kernels/lstm*.py", "kernels/attention*.py", "csrc/cpu/lstm*", "csrc/cpu/linear.h",
           "csrc/cpu/attention*")
MEMORY_SWEEP = "batch"

VOCAB, IMAGE, CAPTION = 2000, 32, 16


def _model(device, decoder: str) -> ImageCaptioner:
    torch.manual_seed(0)
    return ImageCaptioner(ImageCaptionerConfig(
        VOCAB, image_height=IMAGE, image_width=IMAGE, in_chans=3, patch_size=4, decoder=decoder, width=256,
        encoder_layers=2, encoder_heads=8, decoder_layers=3, decoder_heads=8, mlp_ratio=4.0,
        max_len=CAPTION + 1)).to(device)


def _pair(model, train: bool = True):
    """``{"fastseq": model, "torch.nn": its torch.nn build}``, both in training or eval mode."""
    return {"fastseq": model.train(train), "torch.nn": to_torch_nn(model).train(train)}


def _images(device, batch):
    return torch.rand(batch, 3, IMAGE, IMAGE, device=device, generator=torch.Generator(device).manual_seed(0))


def _train(device, decoder, batch):
    model = _model(device, decoder)
    images = _images(device, batch)
    captions = torch.randint(3, VOCAB, (batch, CAPTION + 1), device=device)

    def loss_of(m):
        logits = m(images, captions[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), captions[:, 1:].flatten())

    return Case(suite=SUITE, name=f"{decoder} train step fp32 B{batch} T{CAPTION}",
                params={"decoder": decoder, "pass": "train", "batch": batch, "length": CAPTION},
                dtype=torch.float32,
                variants={name: train_step(m, loss_of) for name, m in _pair(model).items()})


@torch.no_grad()
def greedy_by_rerunning(model, images, steps):
    """Greedy captions as ``nn.TransformerDecoder`` allows them: encode once, then run the decoder
    over the whole prefix at every step and keep the last position's argmax."""
    patches = model.encode(images)
    tokens = torch.full((images.shape[0], 1), model.config.bos_id, device=images.device)
    for _ in range(steps):
        tokens = torch.cat([tokens, model.decoder(patches, tokens)[:, -1].argmax(-1, keepdim=True)], 1)
    return tokens[:, 1:]


def _decode(device, decoder, batch, steps):
    model, twin = _pair(_model(device, decoder), train=False).values()
    images = _images(device, batch)

    def generate(m):
        return lambda: m.generate(images, max_len=steps, stop_at_eos=False)

    if decoder == "transformer":
        variants = {"fastseq": generate(model), "torch.nn": lambda: greedy_by_rerunning(twin, images, steps),
                    "rerun": lambda: greedy_by_rerunning(model, images, steps)}
    else:
        variants = {"fastseq": generate(model), "torch.nn": generate(twin)}
    return Case(suite=SUITE, name=f"{decoder} decode fp32 B{batch} {steps} tokens",
                params={"decoder": decoder, "pass": "decode", "batch": batch, "new_tokens": steps},
                dtype=torch.float32, variants=variants)


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    """A training step and greedy decoding of 16 tokens, with each decoder (float32)."""
    batch = 8 if quick else 32
    steps = 4 if quick else CAPTION
    return [_train(device, "transformer", batch), _decode(device, "transformer", 8, steps),
            _train(device, "lstm", batch), _decode(device, "lstm", 8, steps)]


def memory_cases(device: torch.device) -> list[Case]:
    """The training steps at growing batch: ``python -m fastseq profile captioning``."""
    return [_train(device, decoder, batch) for batch in (8, 16, 32, 64)
            for decoder in ("transformer", "lstm")]
