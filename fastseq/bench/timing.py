"""Timing of one zero-argument callable: :func:`time_fn` returns a :class:`Timing` in milliseconds.

On CUDA it is ``triton.testing.do_bench``: CUDA events around each call, with the L2 cache flushed
before every call so that a kernel cannot win by reading what the previous call left in cache. On
CPU (and on CUDA without Triton) it is ``torch.utils.benchmark.Timer.blocked_autorange``, which
groups calls into blocks long enough for the clock to resolve them and synchronizes CUDA.

Both report the median and the interquartile range: the median is robust to the odd slow call
(a page fault, another process), and the IQR says how much to trust it. On the CPU a timing also
counts the pages each call faults in, and :func:`time_fresh_memory` times calls that each start
from memory handed back to the kernel, as a loop whose allocator returns its memory would run
(see :mod:`fastseq.bench.allocator`).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.utils.benchmark as torch_benchmark

from fastseq.bench import allocator

# Time spent measuring one callable, in seconds: full runs and `--quick` runs.
BUDGET_S = {False: 1.0, True: 0.1}
# Calls timed one at a time from fresh memory: at least this many, within the budget above.
FRESH_CALLS = 5


@dataclass(frozen=True)
class Timing:
    """Run time of one callable: median and interquartile range in milliseconds, the tool, and
    (CPU) the minor page faults per call."""

    median_ms: float
    iqr_ms: float
    method: str
    faults_per_call: float | None = None


def time_fn(fn: Callable[[], object], device: torch.device | str, *, quick: bool = False,
            share: float = 1.0, warmup: bool = True) -> Timing:
    """Time ``fn()`` on ``device``; returns its median and IQR in milliseconds.

    ``fn`` runs once before timing starts (unless ``warmup`` is off: a later round of the same
    callable), so one-off work (``torch.compile``, Triton autotuning, lazy allocations) stays out
    of the measurement. ``quick`` shortens the measurement tenfold; ``share`` takes that fraction
    of the budget (one of several rounds).
    """
    device = torch.device(device)
    if warmup:
        fn()
    budget_s = BUDGET_S[quick] * share
    if device.type == "cuda" and _triton_available():
        return _do_bench(fn, budget_s)
    timing = _blocked_autorange(fn, budget_s)
    if device.type != "cpu":
        return timing
    return dataclasses.replace(timing, faults_per_call=_faults_per_call(fn))


def combine(rounds: list[Timing]) -> Timing:
    """One timing from rounds of the same callable: the median of their medians and of their
    IQRs, and the mean faults per call."""
    faults = [t.faults_per_call for t in rounds if t.faults_per_call is not None]
    return Timing(
        median_ms=statistics.median(t.median_ms for t in rounds),
        iqr_ms=statistics.median(t.iqr_ms for t in rounds),
        method=f"{rounds[0].method}, median of {len(rounds)} rounds",
        faults_per_call=statistics.fmean(faults) if faults else None,
    )


def time_fresh_memory(fn: Callable[[], object], *, quick: bool = False) -> Timing | None:
    """Time CPU calls of ``fn`` that each start with the process's freed memory handed back to
    the kernel, so that every buffer they allocate is faulted in afresh: what a loop pays whose
    allocator returns memory between calls. ``None`` where memory cannot be handed back."""
    if not allocator.release_freed_memory():
        return None
    fn()
    times, faults, deadline = [], [], time.perf_counter() + BUDGET_S[quick]
    while len(times) < FRESH_CALLS or time.perf_counter() < deadline:
        allocator.release_freed_memory()
        before, start = allocator.minor_faults(), time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - start))
        faults.append(allocator.minor_faults() - before)
    q1, _, q3 = statistics.quantiles(times, n=4)
    return Timing(median_ms=statistics.median(times), iqr_ms=q3 - q1, method="fresh memory per call",
                  faults_per_call=statistics.median(faults))


def _faults_per_call(fn, calls: int = 3) -> float:
    before = allocator.minor_faults()
    for _ in range(calls):
        fn()
    return (allocator.minor_faults() - before) / calls


def _triton_available() -> bool:
    try:
        import triton.testing  # noqa: F401
    except ImportError:
        return False
    return True


def _do_bench(fn, budget_s: float) -> Timing:
    import triton.testing

    rep_ms = 1000 * budget_s
    median, p25, p75 = triton.testing.do_bench(
        fn, warmup=rep_ms / 4, rep=rep_ms, quantiles=[0.5, 0.25, 0.75]
    )
    return Timing(median_ms=median, iqr_ms=p75 - p25, method="triton.testing.do_bench")


def _blocked_autorange(fn, budget_s: float) -> Timing:
    # Timer defaults to one thread; time with the threads the process would really use.
    timer = torch_benchmark.Timer(
        stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()
    )
    measurement = timer.blocked_autorange(min_run_time=budget_s)
    return Timing(
        median_ms=1000 * measurement.median,
        iqr_ms=1000 * measurement.iqr,
        method="torch.utils.benchmark.Timer.blocked_autorange",
    )
