"""Where a call's host time goes: ``torch.profiler`` over repeated calls of each variant of a case.

A small op on a GPU is bound by what the host does per call: Python, the dispatcher, argument
checks, and each CUDA runtime call (a kernel launch, a device query, a copy that waits). The
dispatch suite says how long a call takes; this says what it is made of: per variant, the ops and
runtime calls recorded over ``calls`` calls, with their count per call and their own host time,
the largest first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile

from fastseq.bench.case import Case


@dataclass
class TraceRow:
    """One recorded op or runtime call of a variant: ``count`` per call, own host time per call
    (``self_us``, excluding what it called) and total (``total_us``), in microseconds."""

    name: str
    count: float
    self_us: float
    total_us: float


def trace_variant(fn, device: torch.device, calls: int = 20, warmup: int = 5) -> list[TraceRow]:
    """Profile ``calls`` calls of ``fn`` (after ``warmup`` unrecorded ones); rows per call, the
    largest own host time first."""
    for _ in range(warmup):
        fn()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as recorded:
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    rows = [TraceRow(e.key, e.count / calls, e.self_cpu_time_total / calls,
                     e.cpu_time_total / calls) for e in recorded.key_averages()]
    return sorted(rows, key=lambda r: r.self_us, reverse=True)


def format_trace(case: Case, variant: str, rows: list[TraceRow], top: int = 12) -> str:
    """A text table of the ``top`` rows of one variant's trace, with the sum of all own times."""
    lines = [f"{case.name} | {variant}: {sum(r.self_us for r in rows):.1f} us own host time a call",
             f"  {'calls':>6} {'self us':>9} {'total us':>9}  op"]
    lines += [f"  {r.count:6.2f} {r.self_us:9.2f} {r.total_us:9.2f}  {r.name}" for r in rows[:top]]
    return "\n".join(lines)


def trace_cases(cases: list[Case], device: torch.device, calls: int = 20) -> str:
    """The traces of every variant of ``cases`` (a variant that raises is reported, not traced)."""
    blocks = []
    for case in cases:
        for name, fn in case.variants.items():
            try:
                blocks.append(format_trace(case, name, trace_variant(fn, device, calls)))
            except Exception as error:  # noqa: BLE001 - one variant's failure is reported
                blocks.append(f"{case.name} | {name}: {type(error).__name__}: {error}")
    return "\n\n".join(blocks) + "\n"
