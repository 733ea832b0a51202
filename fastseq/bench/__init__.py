"""Benchmark harness: cases, timing, a runner over suites, and reports.

``python -m fastseq bench [suite ...]`` runs the suites in ``benchmarks/`` (installed as
``fastseq.benchmarks``). To write a suite, add ``benchmarks/bench_<name>.py`` with
``cases(device, quick) -> list[Case]``; see ``benchmarks/bench_rotary.py``.
"""

from fastseq.bench.case import Case
from fastseq.bench.result import CaseResult, VariantResult
from fastseq.bench.runner import available_suites, load_suite, run_cases, run_suite
from fastseq.bench.timing import Timing, time_fn

__all__ = [
    "Case",
    "CaseResult",
    "Timing",
    "VariantResult",
    "available_suites",
    "load_suite",
    "run_cases",
    "run_suite",
    "time_fn",
]
