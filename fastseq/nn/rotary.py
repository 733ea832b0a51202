"""``RotaryEmbedding``: builds and caches the cos/sin tables, and applies them with the fused op."""

from __future__ import annotations

import math

import torch
from torch import nn

from fastseq.nn.rope_scaling import RopeScaling, default_inverse_frequencies
from fastseq.ops.rotary import apply_rotary
from fastseq.reference.rotary import token_positions


class RotaryEmbedding(nn.Module):
    """Rotary positional embedding over the first ``dim`` features of each head.

    Args:
        dim: rotary dim (even); may be smaller than the head dim (partial rotary).
        base: RoPE base (theta).
        interleaved: GPT-J pairs ``(2j, 2j+1)`` instead of NeoX halves.
        scaling: a :class:`RopeScaling`, or a transformers-style ``rope_scaling`` dict.
        max_cached_positions: the most positions the cached tables may cover. A call reaching
            past them gets the angles of its own positions only, computed for that call, so no
            position id makes the module allocate more than ``B * N`` angles.

    The tables are float32 ``(S, dim/2)``, cached per device and grown (to the next power of two,
    up to ``max_cached_positions``) when a longer sequence arrives. Dynamic NTK scaling follows
    transformers: the frequencies are those of the longest sequence seen, until a sequence within
    the original context brings back the original frequencies; the tables are rebuilt when that
    length changes.
    """

    def __init__(self, dim: int, base: float = 10000.0, interleaved: bool = False, scaling=None,
                 max_cached_positions: int = 1 << 16):
        super().__init__()
        if not isinstance(dim, int) or dim <= 0 or dim % 2:
            raise ValueError(f"RotaryEmbedding: dim must be a positive even int, got {dim!r}")
        if not math.isfinite(base) or base <= 1:
            raise ValueError(f"RotaryEmbedding: base must be a finite number > 1, got {base!r}")
        if not isinstance(max_cached_positions, int) or max_cached_positions < 1:
            raise ValueError(f"RotaryEmbedding: max_cached_positions must be a positive int, got "
                             f"{max_cached_positions!r}")
        if isinstance(scaling, dict):
            scaling = RopeScaling.from_dict(scaling)
        self.dim, self.base, self.interleaved, self.scaling = dim, float(base), interleaved, scaling
        self.max_cached_positions = max_cached_positions
        self._tables: dict[torch.device, tuple[int, torch.Tensor, torch.Tensor]] = {}
        self._dynamic_length = scaling.original_max_position_embeddings if self._dynamic else None

    @property
    def _dynamic(self) -> bool:
        return self.scaling is not None and self.scaling.kind == "dynamic"

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}, interleaved={self.interleaved}, scaling={self.scaling}"

    def inverse_frequencies(self, seq_len: int) -> tuple[torch.Tensor, float]:
        """``(inv_freq (dim/2,) float32, cos/sin scale)`` for sequences of ``seq_len`` tokens."""
        if self.scaling is None:
            return default_inverse_frequencies(self.dim, self.base), 1.0
        return self.scaling.inverse_frequencies(self.dim, self.base, seq_len)

    def _build(self, length: int, seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq, scale = self.inverse_frequencies(seq_len)
        t = torch.arange(length, dtype=torch.float32)
        angles = torch.outer(t, inv_freq)
        return (angles.cos() * scale).to(device), (angles.sin() * scale).to(device)

    def cos_sin(self, seq_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables covering positions ``0 .. seq_len - 1``: ``(cos, sin)``, each ``(>= seq_len, dim/2)``.

        ``seq_len`` may not exceed ``max_cached_positions``."""
        if seq_len > self.max_cached_positions:
            raise ValueError(f"RotaryEmbedding: tables of {seq_len} positions exceed "
                             f"max_cached_positions={self.max_cached_positions}")
        device = torch.device(device or "cpu")
        if self._dynamic:
            return self._dynamic_cos_sin(seq_len, device)
        cached = self._tables.get(device)
        if cached is None or cached[0] < seq_len:
            length = min(1 << max(seq_len - 1, 0).bit_length(), self.max_cached_positions)
            cos, sin = self._build(length, length, device)
            self._tables[device] = cached = (length, cos, sin)
        return cached[1], cached[2]

    def _dynamic_cos_sin(self, seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        # transformers' dynamic_rope_update: grow past the longest length seen; reset to the
        # original context when a sequence fits in it again.
        original = self.scaling.original_max_position_embeddings
        if seq_len > self._dynamic_length:
            self._dynamic_length = seq_len
        elif seq_len < original and self._dynamic_length > original:
            self._dynamic_length = original
        length = self._dynamic_length
        cached = self._tables.get(device)
        if cached is None or cached[0] != length:
            cos, sin = self._build(min(length, self.max_cached_positions), length, device)
            self._tables[device] = cached = (length, cos, sin)
        return cached[1], cached[2]

    def forward(self, q, k=None, *, positions=None, layout: str = "bnhd", inplace: bool = False,
                max_positions: int | None = None):
        """Rotate ``q`` and ``k`` (``(B, N, H, D)``, or ``(B, H, N, D)`` with ``layout="bhnd"``).

        ``positions``: ``None``/``int`` offset, ``(B,)`` per-batch offsets, or ``(B, N)`` ids.
        ``max_positions``: a bound the caller knows (e.g. a KV cache's size) that every position
        stays below: the tables are sized by it instead of by reading the positions, a host sync
        that ``torch.compile(fullgraph=True)`` cannot trace (dynamic NTK scaling still reads them:
        its frequencies depend on the true length).
        Returns ``(q_out, k_out)``; see :func:`fastseq.apply_rotary`.
        """
        seqlen = q.shape[1] if layout == "bnhd" else q.shape[2]
        if max_positions is not None and not self._dynamic:
            length = max_positions
        else:
            length = _max_position(positions, seqlen) + 1
        if length > self.max_cached_positions:
            cos, sin = self._angles_at(positions, q.shape[0], seqlen, length, q.device)
            positions = None
        else:
            cos, sin = self.cos_sin(length, q.device)
        return apply_rotary(
            q, k, cos, sin, positions=positions, interleaved=self.interleaved, inplace=inplace,
            layout=layout,
        )

    def _angles_at(self, positions, batch: int, seqlen: int, length: int, device):
        """``(cos, sin)``, each ``(B, N, dim/2)``: the angles of the call's own positions, for a
        call that reaches past the cached tables (nothing is cached)."""
        if self._dynamic:
            self._dynamic_length = max(self._dynamic_length, length)
            length = self._dynamic_length
        if isinstance(positions, int):
            tokens = token_positions(batch, seqlen, None, positions, device)
        else:
            tokens = token_positions(batch, seqlen, positions, 0, device)
        inv_freq, scale = self.inverse_frequencies(length)
        angles = tokens.to(torch.float32)[..., None] * inv_freq.to(device)
        return angles.cos() * scale, angles.sin() * scale


def _max_position(positions, seqlen: int) -> int:
    """Largest position the call touches (one host sync for tensor positions)."""
    if positions is None or isinstance(positions, int):
        return (positions or 0) + seqlen - 1
    if positions.numel() == 0:
        return seqlen - 1
    if positions.device.type == "meta":
        raise ValueError("fastseq RotaryEmbedding: positions on the meta device have no values to "
                         "size the cos/sin table by; pass them on a real device, or an int offset")
    if positions.dim() == 1:
        return int(positions.max()) + seqlen - 1
    return int(positions.max())
