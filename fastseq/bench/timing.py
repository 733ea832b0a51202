"""Timing of one zero-argument callable: :func:`time_fn` returns a :class:`Timing` in milliseconds.

On CUDA it is ``triton.testing.do_bench``: CUDA events around each call, with the L2 cache flushed
before every call so that a kernel cannot win by reading what the previous call left in cache. On
CPU (and on CUDA without Triton) it is ``torch.utils.benchmark.Timer.blocked_autorange``, which
groups calls into blocks long enough for the clock to resolve them and synchronizes CUDA.

Both report the median and the interquartile range: the median is robust to the odd slow call
(a page fault, another process), and the IQR says how much to trust it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.utils.benchmark as torch_benchmark

# Time spent measuring one callable, in seconds: full runs and `--quick` runs.
BUDGET_S = {False: 1.0, True: 0.1}


@dataclass(frozen=True)
class Timing:
    """Run time of one callable: median and interquartile range in milliseconds, and the tool."""

    median_ms: float
    iqr_ms: float
    method: str


def time_fn(fn: Callable[[], object], device: torch.device | str, *, quick: bool = False) -> Timing:
    """Time ``fn()`` on ``device``; returns its median and IQR in milliseconds.

    ``fn`` runs once before timing starts, so one-off work (``torch.compile``, Triton autotuning,
    lazy allocations) stays out of the measurement. ``quick`` shortens the measurement tenfold.
    """
    device = torch.device(device)
    fn()
    if device.type == "cuda" and _triton_available():
        return _do_bench(fn, BUDGET_S[quick])
    return _blocked_autorange(fn, BUDGET_S[quick])


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
