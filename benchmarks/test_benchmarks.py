"""The suites' quick cases under pytest-benchmark (see ``conftest.py`` for how to run them)."""

import torch

from fastseq.bench.runner import default_device


def _synchronized(fn):
    """pytest-benchmark reads a wall clock: wait for the GPU so that the kernel time counts."""
    if default_device().type != "cuda":
        return fn

    def call():
        result = fn()
        torch.cuda.synchronize()
        return result

    return call


def test_variant(benchmark, case, variant):
    benchmark.group = f"{case.suite}: {case.name}"
    benchmark.extra_info.update(
        role=case.role(variant),
        params=case.params,
        bytes_moved=case.bytes_of(variant),
        flops=case.flops_of(variant),
    )
    fn = _synchronized(case.variants[variant])
    fn()  # compilation and autotuning happen here, outside the measurement
    benchmark(fn)
