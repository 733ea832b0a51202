"""Rotary positional embeddings in plain PyTorch.

Three functions, from general to specific:

* :func:`rotate` implements the exact semantics of the fused rotary kernels on canonical arguments
  (``(B, N, H, D)`` views, 3-D angle tables, positions as offset or ids) and is what the
  ``reference`` backend runs;
* :func:`apply_rotary` mirrors :func:`fastseq.apply_rotary`, argument for argument;
* :func:`apply_rotary_pos_emb` is the Hugging Face Llama function, written out.
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """NeoX convention partner: ``(x1, x2) -> (-x2, x1)`` over the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """GPT-J convention partner: ``(x[2j], x[2j+1]) -> (-x[2j+1], x[2j])``."""
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def _full_width(table: torch.Tensor, rotary_dim: int, interleaved: bool) -> torch.Tensor:
    """Expand a half table (one angle per pair) to one value per rotated column."""
    if table.shape[-1] == rotary_dim:
        return table
    if interleaved:
        return table.repeat_interleave(2, dim=-1)
    return torch.cat((table, table), dim=-1)


def token_positions(batch: int, seqlen: int, positions, offset: int, device) -> torch.Tensor:
    """Absolute position of every token, ``(B, N)`` int64, from the kernels' position modes."""
    steps = torch.arange(seqlen, device=device, dtype=torch.int64)
    if positions is None:
        return (offset + steps).expand(batch, seqlen)
    positions = positions.to(torch.int64)
    if positions.dim() == 1:
        return offset + positions[:, None] + steps
    return positions.expand(batch, seqlen)


def rotate(x, cos, sin, positions, offset, rotary_dim, interleaved, conjugate=False, compute_dtype=None):
    """Rotate ``x`` (B, N, H, D) by the angles of each token's position; returns a new tensor.

    ``cos``/``sin`` are ``(Bc, S, W)`` with ``Bc`` in {1, B} and ``W`` in {R/2, R}; ``positions``
    is ``None`` (position = offset + n), ``(B,)`` per-batch offsets or ``(B, N)`` ids. The first
    ``rotary_dim`` columns rotate; the rest pass through. ``conjugate`` applies the transpose of the
    rotation (the backward). Math in ``compute_dtype`` (default: fp32, or fp64 for fp64 inputs);
    result in ``x.dtype``.
    """
    batch, seqlen = x.shape[:2]
    pos = token_positions(batch, seqlen, positions, offset, x.device)
    rows = torch.arange(batch, device=x.device)[:, None] if cos.shape[0] > 1 else 0
    compute = compute_dtype or torch.promote_types(x.dtype, torch.float32)
    c = _full_width(cos[rows, pos], rotary_dim, interleaved)[:, :, None].to(compute)
    s = _full_width(sin[rows, pos], rotary_dim, interleaved)[:, :, None].to(compute)
    partner = rotate_pairs if interleaved else rotate_half
    xr = x[..., :rotary_dim].to(compute)
    if conjugate:
        rotated = xr * c - partner(xr * s)
    else:
        rotated = xr * c + partner(xr) * s
    return torch.cat((rotated.to(x.dtype), x[..., rotary_dim:]), dim=-1)


def apply_rotary(q, k, cos, sin, *, positions=None, interleaved=False, inplace=False, layout="bnhd"):
    """Plain-PyTorch twin of :func:`fastseq.apply_rotary`; returns ``(q_out, k_out)``."""
    to_bnhd = (lambda t: t) if layout == "bnhd" else (lambda t: t.transpose(1, 2))
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    offset = 0
    if positions is None or isinstance(positions, int):
        offset, positions = positions or 0, None
    rotary_dim = 2 * cos.shape[-1]

    def one(x):
        if x is None:
            return None
        out = to_bnhd(rotate(to_bnhd(x), cos, sin, positions, offset, rotary_dim, interleaved))
        return x.copy_(out) if inplace else out

    return one(q), one(k)


def apply_rotary_pos_emb(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    """Hugging Face Llama's ``apply_rotary_pos_emb``: ``q * cos + rotate_half(q) * sin``.

    ``cos``/``sin`` are unsqueezed at ``unsqueeze_dim`` and broadcast against q and k, in
    transformers' arithmetic and dtype promotion. ``position_ids`` is unused, as in transformers
    4.x's signature (an ``int`` there is transformers 5's ``unsqueeze_dim``).
    """
    if isinstance(position_ids, int) and not isinstance(position_ids, bool):
        unsqueeze_dim = position_ids
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
