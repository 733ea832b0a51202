"""Word2vec's negative-sampling loss in plain PyTorch: the oracle of the fused op and the eager
model it is benchmarked against."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def negative_sampling_loss(in_weight, out_weight, inputs, targets, sparse: bool = True):
    """Per-example loss ``(B,)``: ``-log sigmoid(h . u_0) - sum_j log sigmoid(-h . u_j)`` with ``h``
    the mean of the rows of ``in_weight`` at ``inputs`` ``(B, W)`` and ``u_j`` the rows of
    ``out_weight`` at ``targets`` ``(B, N)`` (the true word first, then the negatives). Embedding
    lookups as ``nn.Embedding(sparse=sparse)`` makes them, so the weights' gradients are sparse
    when ``sparse``."""
    hidden = F.embedding(inputs, in_weight, sparse=sparse).mean(1)
    scores = torch.bmm(F.embedding(targets, out_weight, sparse=sparse), hidden.unsqueeze(-1)).squeeze(-1)
    sign = torch.ones_like(scores)
    sign[:, 0] = -1
    return F.softplus(sign * scores).sum(-1)
