"""A benchmark case: one configuration (shape, dtype, options) and the implementations to compare.

A suite is a module ``fastseq.benchmarks.bench_<name>`` with a function
``cases(device, quick) -> list[Case]``. Each :class:`Case` holds its inputs inside zero-argument
callables, one per *variant*: ours (the fastseq op), the baselines it is compared against, and
optionally a plain copy of the same bytes, the bandwidth a memory-bound op can hope to reach.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

Variant = Callable[[], object]

OURS, BASELINE, COPY, EXTRA = "ours", "baseline", "copy", "extra"


@dataclass
class Case:
    """One configuration of one suite, and its variants.

    Attributes:
        suite: suite name (``"rotary"``).
        name: short unique label within the suite (``"fwd bf16 B8 N4096 H32 D128"``).
        params: the configuration, JSON-serializable (shape, layout, pass, ...).
        dtype: storage dtype of the inputs.
        variants: name -> zero-argument callable doing one call of that implementation.
        ours: the variant that is fastseq.
        baselines: the variants ours is compared with; default: all but ``ours`` and ``copy``.
        copy: the variant copying ``copy_bytes`` bytes, or ``None``.
        bytes_moved: bytes read + written by one call of ours or a baseline (the minimum any
            implementation must move; extra traffic of a baseline is its own loss), or ``None``.
        copy_bytes: bytes read + written by one call of ``copy``; default ``bytes_moved``.
        flops: floating-point operations of one call, or ``None``.
        skipped: variant -> reason it could not be built (e.g. ``torch.compile`` unavailable).
    """

    suite: str
    name: str
    params: dict[str, Any]
    dtype: torch.dtype
    variants: dict[str, Variant]
    ours: str = "fastseq"
    baselines: tuple[str, ...] | None = None
    copy: str | None = None
    bytes_moved: int | None = None
    copy_bytes: int | None = None
    flops: int | None = None
    skipped: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.baselines is None:
            self.baselines = tuple(v for v in self.variants if v not in (self.ours, self.copy))
        if self.copy_bytes is None:
            self.copy_bytes = self.bytes_moved
        named = [self.ours, *self.baselines] + ([self.copy] if self.copy else [])
        missing = [v for v in named if v not in self.variants]
        if missing:
            raise ValueError(f"case {self.name!r}: variants {missing} are named but not given")

    def role(self, variant: str) -> str:
        """``"ours"``, ``"baseline"``, ``"copy"`` or ``"extra"`` (timed, not compared)."""
        if variant == self.ours:
            return OURS
        if variant == self.copy:
            return COPY
        return BASELINE if variant in self.baselines else EXTRA

    def bytes_of(self, variant: str) -> int | None:
        """Bytes one call of ``variant`` moves, for its bandwidth."""
        return self.copy_bytes if variant == self.copy else self.bytes_moved

    def flops_of(self, variant: str) -> int | None:
        """Floating-point operations of one call of ``variant`` (a copy does none)."""
        return None if variant == self.copy else self.flops
