"""pytest-benchmark entry: one test per variant of every quick case of every suite.

    pytest benchmarks/ --benchmark-json=out.json        # all suites
    pytest benchmarks/ -k rotary --benchmark-columns=median,iqr

Tests are grouped by case (``--benchmark-group-by=group``, the default), so each group compares
fastseq with its baselines side by side, as ``python -m fastseq bench --quick`` does. Plain
``pytest`` from the repository root does not come here: ``testpaths`` is ``tests``.
"""

from __future__ import annotations

import functools

import pytest

from fastseq.bench.runner import available_suites, default_device, load_suite


@functools.cache
def quick_cases() -> tuple:
    """Every suite's quick cases on the benchmark device, built once per session."""
    device = default_device()
    suites = [load_suite(name) for name in available_suites()]
    return tuple(case for suite in suites for case in suite.cases(device, quick=True))


def _param(case, variant, skip_reason=None):
    test_id = f"{case.suite}/{case.name}/{variant}".replace(" ", "_")
    marks = [pytest.mark.skip(reason=skip_reason)] if skip_reason else []
    return pytest.param(case, variant, id=test_id, marks=marks)


def pytest_generate_tests(metafunc):
    if {"case", "variant"} <= set(metafunc.fixturenames):
        params = [_param(c, v) for c in quick_cases() for v in c.variants]
        params += [_param(c, v, why) for c in quick_cases() for v, why in c.skipped.items()]
        metafunc.parametrize(("case", "variant"), params)
