"""Find benchmark suites and run their cases: every variant of a case back to back, in one process.

A suite is a module ``fastseq.benchmarks.bench_<name>`` (the repository's ``benchmarks/`` folder,
installed under that name) with ``cases(device, quick) -> list[Case]``. A dotted name
(``mypackage.bench_mine``) names a suite module anywhere on the path.

Variants of one case take turns, several rounds over, so they see the same machine state (clocks,
other load) as far as it stays put, and a slow spell falls on all of them. A variant that raises is
reported with the error rather than ending the run: a baseline that cannot run (say
``torch.compile`` without a compiler) should not hide the others.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable
from types import ModuleType

import torch
from tqdm.auto import tqdm

from fastseq.bench.case import Case
from fastseq.bench.result import CaseResult, summarize
from fastseq.bench.timing import combine, time_fn, time_fresh_memory
from fastseq.profiling.memory import peak_memory

SUITE_PACKAGE = "fastseq.benchmarks"
SUITE_PREFIX = "bench_"
ROUNDS = 3  # turns each variant of a case takes


def _suite_package() -> ModuleType | None:
    try:
        return importlib.import_module(SUITE_PACKAGE)
    except ImportError:
        return None


def default_device() -> torch.device:
    """Where suites run unless told otherwise: the GPU when torch sees one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def available_suites() -> list[str]:
    """Names of the suites found (``"rotary"`` for ``bench_rotary``), sorted."""
    package = _suite_package()
    if package is None:
        return []
    names = [m.name for m in pkgutil.iter_modules(package.__path__)]
    return sorted(n.removeprefix(SUITE_PREFIX) for n in names if n.startswith(SUITE_PREFIX))


def suite_label(name: str) -> str:
    """Short name of a suite for reports: ``"rotary"`` for ``rotary`` and ``pkg.bench_rotary``."""
    return name.rpartition(".")[2].removeprefix(SUITE_PREFIX)


def load_suite(name: str) -> ModuleType:
    """Import suite ``name`` (short or dotted); raises ``ValueError`` listing the known suites."""
    if "." in name:
        return importlib.import_module(name)
    package = _suite_package()
    if package is None or name not in available_suites():
        raise ValueError(f"unknown benchmark suite {name!r}; available: {available_suites()}")
    return importlib.import_module(f"{package.__name__}.{SUITE_PREFIX}{name}")


def run_case(case: Case, device: torch.device, *, quick: bool = False, progress=None) -> CaseResult:
    """Measure every variant of ``case``; ``progress`` (a tqdm bar) advances once per variant.

    The variants take turns, :data:`ROUNDS` times over, each turn a share of the variant's
    budget: a slow spell of a shared machine then falls on every variant alike, and a speedup is
    the median over rounds of the ratio within a round. Then (CPU) each variant's calls from fresh
    memory are timed, and its peak memory (bytes above entry) is taken in one more call.
    """
    rounds, errors = {name: [] for name in case.variants}, {}
    for turn in range(ROUNDS):
        for name, fn in case.variants.items():
            if progress is not None:
                progress.set_postfix_str(f"{case.name} | {name} | round {turn + 1}", refresh=True)
            if errors.get(name):
                continue
            timing, errors[name] = _attempt(time_fn, fn, device, quick=quick, share=1 / ROUNDS,
                                            warmup=turn == 0)
            if timing is not None:
                rounds[name].append(timing)
    errors = {name: error for name, error in errors.items() if error}
    timings, fresh, peaks = {}, {}, {}
    for name, fn in case.variants.items():
        if name not in errors:
            timings[name] = combine(rounds[name])
            if device.type == "cpu":
                fresh[name], errors[name] = _attempt(time_fresh_memory, fn, quick=quick)
            if not errors.get(name):
                peaks[name], errors[name] = _attempt(peak_memory, fn, device=device)
        if progress is not None:
            progress.update()
    errors = {name: error for name, error in errors.items() if error}
    paired = {name: [t.median_ms for t in rounds[name]] for name in timings if name not in errors}
    return summarize(case, timings, peaks, errors, {n: t for n, t in fresh.items() if t}, paired)


def _attempt(measure, *args, **kwargs):
    """``(measure(*args, **kwargs), None)``, or ``(None, the error in a line)``: a variant that
    raises is reported with its error rather than ending the run (see the module docstring)."""
    try:
        return measure(*args, **kwargs), None
    except Exception as error:
        return None, f"{type(error).__name__}: {error}".splitlines()[0]


def run_cases(
    cases: Iterable[Case], device: torch.device, *, quick: bool = False, desc: str = "",
    on_result: Callable[[list[CaseResult]], object] | None = None,
) -> list[CaseResult]:
    """Run ``cases`` in order under one progress bar (on stderr); returns their results.

    ``on_result(results so far)`` is called after each case but the last, so that a caller can
    keep what a run that is cut short (a time limit, a lost machine) has measured.
    """
    cases = list(cases)
    total = sum(len(c.variants) for c in cases)
    results = []
    with tqdm(total=total, desc=desc, unit="variant", leave=False, dynamic_ncols=True) as bar:
        for case in cases:
            results.append(run_case(case, device, quick=quick, progress=bar))
            if on_result is not None and len(results) < len(cases):
                on_result(list(results))
    return results


def run_suite(name: str, device: torch.device | str, *, quick: bool = False) -> list[CaseResult]:
    """Build suite ``name``'s cases for ``device`` and run them all."""
    device = torch.device(device)
    suite = load_suite(name)
    return run_cases(suite.cases(device, quick), device, quick=quick, desc=suite_label(name))
