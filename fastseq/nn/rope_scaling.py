"""RoPE frequency scaling for long contexts: linear, dynamic NTK, YaRN and Llama 3.

The formulas are those of Hugging Face transformers (``modeling_rope_utils``), so a checkpoint
trained with one of them gets the same angles here.
"""

from __future__ import annotations

import dataclasses
import math

import torch

KINDS = ("linear", "dynamic", "yarn", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """How to stretch RoPE frequencies past the pretraining context.

    Attributes:
        kind: ``"linear"``, ``"dynamic"`` (NTK-aware, recomputed from the sequence length),
            ``"yarn"`` or ``"llama3"``.
        factor: the context extension factor.
        original_max_position_embeddings: the pretraining context (required by dynamic, yarn and
            llama3; for dynamic it is transformers' ``max_position_embeddings``).
        low_freq_factor, high_freq_factor: llama3 smoothing band.
        beta_fast, beta_slow: yarn ramp boundaries (rotations).
        attention_factor: yarn cos/sin scale; inferred from ``factor`` (and ``mscale``,
            ``mscale_all_dim``) when ``None``.
        truncate: yarn rounds the ramp boundaries to whole dims.
    """

    kind: str
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"RopeScaling.kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind != "linear" and self.original_max_position_embeddings is None:
            raise ValueError(f"RopeScaling(kind={self.kind!r}) needs original_max_position_embeddings")
        if not math.isfinite(self.factor) or self.factor <= 0:
            raise ValueError(f"RopeScaling.factor must be a finite number > 0, got {self.factor!r}")
        original = self.original_max_position_embeddings
        if original is not None and (not isinstance(original, int) or original < 1):
            raise ValueError(f"RopeScaling.original_max_position_embeddings must be a positive int, "
                             f"got {original!r}")

    @classmethod
    def from_dict(cls, config: dict) -> RopeScaling:
        """Build from a transformers ``rope_scaling`` / ``rope_parameters`` dict."""
        kind = config.get("rope_type", config.get("type"))
        fields = {f.name for f in dataclasses.fields(cls)} - {"kind"}
        values = {key: value for key, value in config.items() if key in fields and value is not None}
        if "max_position_embeddings" in config and "original_max_position_embeddings" not in values:
            values["original_max_position_embeddings"] = config["max_position_embeddings"]
        return cls(kind=kind, **values)

    def inverse_frequencies(self, dim: int, base: float, seq_len: int) -> tuple[torch.Tensor, float]:
        """Return ``(inv_freq (dim/2,) float32, cos/sin scale)`` for sequences of ``seq_len``."""
        if self.kind == "dynamic":
            return _dynamic_ntk(self, dim, base, seq_len), 1.0
        if self.kind == "yarn":
            return _yarn(self, dim, base)
        if self.kind == "llama3":
            return _llama3(self, dim, base), 1.0
        return default_inverse_frequencies(dim, base) / self.factor, 1.0


def default_inverse_frequencies(dim: int, base: float) -> torch.Tensor:
    """``base ** (-2i / dim)`` for ``i < dim / 2``, float32."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _dynamic_ntk(s: RopeScaling, dim: int, base: float, seq_len: int) -> torch.Tensor:
    original = s.original_max_position_embeddings
    seq_len = max(seq_len, original)
    base = base * ((s.factor * seq_len / original) - (s.factor - 1)) ** (dim / (dim - 2))
    return default_inverse_frequencies(dim, base)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(s: RopeScaling, dim: int, base: float) -> tuple[torch.Tensor, float]:
    attention_factor = s.attention_factor
    if attention_factor is None:
        if s.mscale and s.mscale_all_dim:
            attention_factor = _yarn_mscale(s.factor, s.mscale) / _yarn_mscale(s.factor, s.mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(s.factor)

    def correction_dim(rotations: float) -> float:
        # The dim whose wavelength makes `rotations` turns over the original context.
        original = s.original_max_position_embeddings
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = default_inverse_frequencies(dim, base)
    interpolation = extrapolation / s.factor
    keep = 1 - ramp  # 1 where the original (extrapolated) frequency is kept
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


def _llama3(s: RopeScaling, dim: int, base: float) -> torch.Tensor:
    inv_freq = default_inverse_frequencies(dim, base)
    original = s.original_max_position_embeddings
    low_freq_wavelen = original / s.low_freq_factor
    high_freq_wavelen = original / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (original / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)
