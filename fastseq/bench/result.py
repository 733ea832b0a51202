"""What a benchmark case measured, and the figures derived from it.

:func:`summarize` turns raw measurements (a :class:`~fastseq.bench.timing.Timing` and a peak
memory per variant) into a :class:`CaseResult`: throughput of each variant (GB/s from the bytes
it moves, TFLOP/s from its flops), its bandwidth as a fraction of the copy's, and the speedup of
ours over each baseline (baseline median / ours median: 2.0 means ours takes half the time). On
the CPU the same again for calls that start from fresh memory (``fresh_*``), and the pages each
call faults in.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from fastseq.bench.case import Case
from fastseq.bench.timing import Timing


@dataclass
class VariantResult:
    """One variant of one case. Times in ms, throughput in GB/s (1e9 B/s) and TFLOP/s, memory in
    bytes. Fields are ``None`` where they do not apply or the variant did not run (see ``error``).
    """

    name: str
    role: str
    median_ms: float | None = None
    iqr_ms: float | None = None
    gb_per_s: float | None = None
    tflop_per_s: float | None = None
    fraction_of_copy: float | None = None
    peak_bytes: int | None = None
    timing_method: str | None = None
    faults_per_call: float | None = None
    fresh_median_ms: float | None = None
    fresh_faults_per_call: float | None = None
    round_medians_ms: list[float] | None = None
    error: str | None = None


@dataclass
class CaseResult:
    """All variants of one case, and the speedups of ours over each baseline that ran."""

    suite: str
    name: str
    params: dict[str, Any]
    dtype: str
    bytes_moved: int | None
    flops: int | None
    variants: list[VariantResult]
    speedups: dict[str, float] = field(default_factory=dict)
    fresh_speedups: dict[str, float] = field(default_factory=dict)

    def variant(self, name: str) -> VariantResult | None:
        return next((v for v in self.variants if v.name == name), None)

    @property
    def ours(self) -> VariantResult:
        return next(v for v in self.variants if v.role == "ours")


def summarize(
    case: Case,
    timings: dict[str, Timing],
    peaks: dict[str, int],
    errors: dict[str, str],
    fresh: dict[str, Timing] | None = None,
    paired: dict[str, list[float]] | None = None,
) -> CaseResult:
    """Combine the measurements of ``case``'s variants into a :class:`CaseResult`.

    ``fresh`` holds the timings of calls from fresh memory, where they were taken. ``paired``
    holds each variant's median per round, the variants timed in turn: a speedup is then the
    median over rounds of the ratio within a round, not the ratio of the overall medians. Variants
    in ``case.skipped`` or ``errors`` appear with their reason and no figures.
    """
    reasons, fresh = {**case.skipped, **errors}, fresh or {}
    variants = [
        _variant_result(case, name, timings.get(name), peaks.get(name), reasons.get(name),
                        fresh.get(name))
        for name in [*case.variants, *case.skipped]
    ]
    _add_fraction_of_copy(variants)
    for v in variants:
        if paired and v.median_ms is not None and v.name in paired:
            v.round_medians_ms = list(paired[v.name])
    return CaseResult(
        suite=case.suite,
        name=case.name,
        params=dict(case.params),
        dtype=str(case.dtype).removeprefix("torch."),
        bytes_moved=case.bytes_moved,
        flops=case.flops,
        variants=variants,
        speedups=_paired_speedups(variants, paired) if paired else _speedups(variants, "median_ms"),
        fresh_speedups=_speedups(variants, "fresh_median_ms"),
    )


def _variant_result(case, name, timing, peak, error, fresh) -> VariantResult:
    result = VariantResult(name=name, role=case.role(name), peak_bytes=peak, error=error)
    if timing is None or error is not None:
        return result
    result.median_ms, result.iqr_ms = timing.median_ms, timing.iqr_ms
    result.timing_method, result.faults_per_call = timing.method, timing.faults_per_call
    if fresh is not None:
        result.fresh_median_ms, result.fresh_faults_per_call = fresh.median_ms, fresh.faults_per_call
    seconds = timing.median_ms / 1000
    if case.bytes_of(name):
        result.gb_per_s = case.bytes_of(name) / seconds / 1e9
    if case.flops_of(name):
        result.tflop_per_s = case.flops_of(name) / seconds / 1e12
    return result


def _add_fraction_of_copy(variants: list[VariantResult]) -> None:
    copy = next((v for v in variants if v.role == "copy" and v.gb_per_s), None)
    if copy is None:
        return
    for v in variants:
        if v.gb_per_s is not None:
            v.fraction_of_copy = v.gb_per_s / copy.gb_per_s


def _paired_speedups(variants: list[VariantResult], paired: dict[str, list[float]]) -> dict[str, float]:
    """Each baseline's median over rounds of its time over ours in the same round."""
    ours = next((v for v in variants if v.role == "ours"), None)
    if ours is None or ours.median_ms is None or ours.name not in paired:
        return {}
    return {
        v.name: statistics.median(b / o for b, o in zip(paired[v.name], paired[ours.name], strict=True))
        for v in variants
        if v.role == "baseline" and v.median_ms is not None and v.name in paired
    }


def _speedups(variants: list[VariantResult], time: str) -> dict[str, float]:
    """Each baseline's ``time`` (a field name) over ours'."""
    ours = next((v for v in variants if v.role == "ours"), None)
    if ours is None or getattr(ours, time) is None:
        return {}
    return {
        v.name: getattr(v, time) / getattr(ours, time)
        for v in variants
        if v.role == "baseline" and getattr(v, time) is not None
    }
