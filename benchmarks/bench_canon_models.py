"""Recurrent models of the canon against their torch.nn builds: action recognition over frame
embeddings (``VideoClassifier``) and contrastive sentence embeddings (``SentenceEncoder``).

Each baseline is the same model holding the same weights on torch.nn's modules
(``fastseq.nn.to_torch_nn``): ``nn.LSTM`` fed a ``PackedSequence`` where fastseq's LSTM takes
``lengths=``. Every batch is ragged (lengths spread over ``[length / 4, length]``). Cases, float32:

* ``video train step`` / ``video inference``: a CNN embeds every frame of 16x16 clips (one batched
  call), a bidirectional LSTM reads each clip's own frames, the last states are classified; the
  step is forward, cross-entropy, backward and an AdamW step. The frame CNN is the same code in both
  builds, so it dilutes the LSTM's difference as it would in a real model.
* ``sentence train step``: the in-batch contrastive (InfoNCE) loss of pairs of sentences (both sides
  through the bidirectional LSTM as one batch), backward and an AdamW step;
* ``sentence encode``: the L2-normalised, max-pooled embeddings of a ragged batch of sentences.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastseq.bench import Case
from fastseq.benchmarks.training import train_step
from fastseq.models import SentenceEncoder, SentenceEncoderConfig, VideoClassifier, VideoClassifierConfig
from fastseq.nn import to_torch_nn

SUITE = "canon_models"

HEADLINES = ("video train step fp32 B32 T16 16x16 ragged", "sentence train step fp32 B32 T48 ragged",
             "sentence encode fp32 B32 T48 ragged")
HEADLINE_BASELINES = ("torch.nn",)

SOURCES = ("benchmarks/training.py", "fastseq/models/video_classifier.py",
           "fastseq/models/sentence_encoder.py", "fastseq/models/lstm_tagging.py", "fastseq/models/clip.py",
           "fastseq/models/inputs.py", "fastseq/nn/*.py", "fastseq/ops/*.py", "kernels/lstm*.py",
           "csrc/cpu/lstm*", "csrc/cpu/linear.h")
MEMORY_SWEEP = "batch"

VOCAB, CLASSES, SIZE = 5000, 40, 16


def _pair(model, train: bool = True):
    """``{"fastseq": model, "torch.nn": its torch.nn build}``, both in training or eval mode."""
    return {"fastseq": model.train(train), "torch.nn": to_torch_nn(model).train(train)}


def _case(name, params, variants):
    return Case(suite=SUITE, name=name, params=params, dtype=torch.float32, variants=variants)


def _ragged_lengths(batch, length, device, seed=0):
    """Lengths spread over ``[length / 4, length]``, the longest first (as a real batch's)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, length // 4), length + 1, (batch,), generator=generator)
    lengths[0] = length
    return lengths.to(device)


def _video(device, batch, frames, train: bool):
    torch.manual_seed(0)
    model = VideoClassifier(VideoClassifierConfig(
        num_classes=CLASSES, image_size=SIZE, embed_dim=128, hidden_size=256, bidirectional=True,
        max_frames=frames)).to(device)
    clips = torch.rand(batch, frames, 1, SIZE, SIZE, device=device)
    lengths = _ragged_lengths(batch, frames, device)
    labels = torch.randint(0, CLASSES, (batch,), device=device)
    pair = _pair(model, train)
    if train:
        variants = {name: train_step(m, lambda m: F.cross_entropy(m(clips, lengths), labels))
                    for name, m in pair.items()}
    else:
        variants = {name: torch.no_grad()(lambda m=m: m(clips, lengths)) for name, m in pair.items()}
    kind = "train step" if train else "inference"
    return _case(f"video {kind} fp32 B{batch} T{frames} {SIZE}x{SIZE} ragged",
                 {"model": "video", "pass": "train" if train else "inference", "batch": batch,
                  "frames": frames, "image_size": SIZE}, variants)


def _sentences(device, batch, length, seed):
    ids = torch.randint(2, VOCAB, (batch, length), device=device)
    lengths = _ragged_lengths(batch, length, device, seed)
    return ids.masked_fill(torch.arange(length, device=device) >= lengths[:, None], 0), lengths


def _sentence_model(device):
    torch.manual_seed(0)
    return SentenceEncoder(SentenceEncoderConfig(VOCAB, 256, 256, bidirectional=True, pooling="max",
                                                 projection_dim=256)).to(device)


def _sentence_train(device, batch, length):
    model = _sentence_model(device)
    a, b = _sentences(device, batch, length, 0), _sentences(device, batch, length, 1)
    variants = {name: train_step(m, lambda m: m.contrastive_loss(*a, *b)) for name, m in _pair(model).items()}
    return _case(f"sentence train step fp32 B{batch} T{length} ragged",
                 {"model": "sentence", "pass": "train", "batch": batch, "length": length}, variants)


def _sentence_encode(device, batch, length):
    model = _sentence_model(device)
    ids, lengths = _sentences(device, batch, length, 0)
    variants = {name: torch.no_grad()(lambda m=m: m.encode(ids, lengths))
                for name, m in _pair(model, train=False).items()}
    return _case(f"sentence encode fp32 B{batch} T{length} ragged",
                 {"model": "sentence", "pass": "inference", "batch": batch, "length": length}, variants)


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    """Training steps and inference of both models on ragged batches (float32)."""
    return [_video(device, 32, 16, train=True), _video(device, 32, 16, train=False),
            _sentence_train(device, 32, 48), _sentence_encode(device, 32, 48)]


def memory_cases(device: torch.device) -> list[Case]:
    """The training steps at growing batch: ``python -m fastseq profile canon_models``."""
    return [case for batch in (8, 16, 32, 64)
            for case in (_video(device, batch, 16, train=True), _sentence_train(device, batch, 48))]
