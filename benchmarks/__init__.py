"""Benchmark suites, one module per op family: ``bench_<name>.py`` with ``cases(device, quick)``.

Installed as ``fastseq.benchmarks``; run with ``python -m fastseq bench [name ...]`` or, through
pytest-benchmark, ``pytest benchmarks/``.
"""
