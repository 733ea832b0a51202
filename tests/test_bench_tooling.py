"""The benchmark and profiling tooling: peak memory, derived figures, reports, the command line.

Nothing here checks speed; the synthetic suite's variants take microseconds.
"""

import json
import platform
import re
import statistics
import textwrap

import pytest
import torch

from fastseq.__main__ import main
from fastseq.bench import Case, allocator
from fastseq.bench.report import device_slug
from fastseq.bench.result import summarize
from fastseq.bench.timing import Timing
from fastseq.profiling import peak_memory
from fastseq.profiling.memory import peak_of_running_sum

MIB = 2**20


def _mib_tensor():
    return torch.empty(MIB, dtype=torch.uint8)


# --------------------------------------------------------------------------------------------
# peak_memory
# --------------------------------------------------------------------------------------------


def test_peak_memory_three_allocations_one_freed():
    def three_then_free_one():
        a, b, c = _mib_tensor(), _mib_tensor(), _mib_tensor()
        del b
        return a, c

    assert peak_memory(three_then_free_one, device="cpu") == 3 * MIB


def test_peak_memory_orders_frees_before_later_allocations():
    def one_at_a_time():
        for _ in range(4):
            x = _mib_tensor()
            del x
        return _mib_tensor()

    assert peak_memory(one_at_a_time, device="cpu") == MIB


def test_peak_memory_ignores_what_was_live_at_entry():
    x = torch.zeros(2 * MIB, dtype=torch.uint8)  # 2 MiB input, one 2 MiB output
    assert peak_memory(torch.add, x, x) == 2 * MIB


def test_peak_memory_counts_autograd_saved_tensors_and_gradients():
    w = torch.ones(MIB // 4, requires_grad=True)  # 1 MiB of float32

    def forward_backward():
        loss = (w * w).sum()  # w*w: 1 MiB, freed after the backward
        (grad,) = torch.autograd.grad(loss, w)  # 1 MiB, returned
        return grad

    assert 2 * MIB <= peak_memory(forward_backward, device="cpu") < 3 * MIB


def test_peak_of_running_sum_sorts_by_time():
    # Listed out of order: +3 at t=0, -3 at t=1, +1 at t=2 gives a peak of 3, not 4.
    assert peak_of_running_sum([(2, 1), (0, 3), (1, -3)]) == 3
    assert peak_of_running_sum([(0, -5)]) == 0


# --------------------------------------------------------------------------------------------
# Figures derived from timings
# --------------------------------------------------------------------------------------------


def _synthetic_case(**overrides):
    fields = dict(
        suite="tiny", name="case", params={"n": 1}, dtype=torch.float32,
        variants={"fastseq": int, "eager": int, "copy": int},
        copy="copy", bytes_moved=4_000_000, copy_bytes=2_000_000, flops=8_000_000_000,
        skipped={"compiled": "no compiler"},
    )
    return Case(**{**fields, **overrides})


def test_summarize_speedups_bandwidth_and_fraction_of_copy():
    timings = {
        "fastseq": Timing(median_ms=2.0, iqr_ms=0.1, method="test"),
        "eager": Timing(median_ms=6.0, iqr_ms=0.1, method="test"),
        "copy": Timing(median_ms=0.5, iqr_ms=0.1, method="test"),
    }
    result = summarize(_synthetic_case(), timings, {"fastseq": 10, "eager": 30, "copy": 0}, {})
    ours, eager, copy = (result.variant(n) for n in ("fastseq", "eager", "copy"))
    assert result.speedups == {"eager": pytest.approx(3.0)}
    assert ours.gb_per_s == pytest.approx(2.0)  # 4 MB in 2 ms
    assert copy.gb_per_s == pytest.approx(4.0)  # its own 2 MB in 0.5 ms
    assert ours.fraction_of_copy == pytest.approx(0.5)
    assert eager.fraction_of_copy == pytest.approx(4 / 6 / 4)
    assert ours.tflop_per_s == pytest.approx(4.0) and copy.tflop_per_s is None
    assert (ours.role, eager.role, copy.role) == ("ours", "baseline", "copy")
    assert result.variant("compiled").error == "no compiler"


def test_summarize_reports_a_failed_baseline_without_a_speedup():
    timings = {"fastseq": Timing(1.0, 0.0, "test"), "copy": Timing(1.0, 0.0, "test")}
    result = summarize(_synthetic_case(), timings, {}, {"eager": "RuntimeError: boom"})
    assert result.speedups == {}
    assert result.variant("eager").error == "RuntimeError: boom"
    assert result.variant("eager").median_ms is None


def test_case_rejects_unknown_variant_names():
    with pytest.raises(ValueError, match="named but not given"):
        _synthetic_case(baselines=("eager", "missing"))


def test_device_slug(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert device_slug("cuda") == "nvidia-h100-80gb-hbm3"
    assert device_slug("cpu") == "cpu"


# --------------------------------------------------------------------------------------------
# The command line on a synthetic suite
# --------------------------------------------------------------------------------------------

TINY_SUITE = '''
import torch
from fastseq.bench import Case

MIB = 2**20


def cases(device, quick):
    x = torch.ones(1024, device=device)
    buffer = torch.empty_like(x)
    return [Case(
        suite="tiny", name="sum n1024", params={"n": 1024}, dtype=torch.float32,
        variants={
            "fastseq": lambda: x.sum(),
            "eager": lambda: (x * 1).sum(),
            "broken": lambda: 1 / 0,
            "copy": lambda: buffer.copy_(x),
        },
        copy="copy", bytes_moved=2 * x.nbytes, skipped={"compiled": "torch.compile unavailable"},
    )]


def memory_cases(device):
    return [
        Case(suite="tiny", name=f"alloc {m} MiB", params={"MiB": m}, dtype=torch.uint8,
             variants={"fastseq": lambda m=m: torch.empty(m * MIB, dtype=torch.uint8)})
        for m in (1, 2)
    ]
'''


@pytest.fixture(scope="module")
def tiny_suite(tmp_path_factory):
    """A suite module ``tiny_suites.bench_tiny`` importable for the duration of this module."""
    import sys

    root = tmp_path_factory.mktemp("suites")
    (root / "tiny_suites").mkdir()
    (root / "tiny_suites" / "__init__.py").write_text("")
    (root / "tiny_suites" / "bench_tiny.py").write_text(textwrap.dedent(TINY_SUITE))
    sys.path.insert(0, str(root))
    yield "tiny_suites.bench_tiny"
    sys.path.remove(str(root))


def test_bench_command_writes_reports(tiny_suite, tmp_path, capsys):
    out = tmp_path / "results"
    assert main(["bench", tiny_suite, "--quick", "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "sum n1024" in printed and "ZeroDivisionError" in printed

    names = {p.name for p in out.iterdir()}
    assert {"tiny-quick.json", "tiny-quick.md", "tiny-quick_speedup.png",
            "tiny-quick_bandwidth.png"} <= names
    report = json.loads((out / "tiny-quick.json").read_text())
    meta = report["metadata"]
    for key in ("device_name", "torch", "triton", "cuda", "python", "cpu_count", "timestamp",
                "command"):
        assert key in meta
    assert report["suite"] == "tiny" and report["quick"] is True

    (case,) = report["cases"]
    variants = {v["name"]: v for v in case["variants"]}
    ours, eager, copy = variants["fastseq"], variants["eager"], variants["copy"]
    rounds = zip(eager["round_medians_ms"], ours["round_medians_ms"], strict=True)
    assert case["speedups"]["eager"] == pytest.approx(statistics.median(e / o for e, o in rounds))
    assert len(ours["round_medians_ms"]) == 3
    assert ours["gb_per_s"] == pytest.approx(2 * 4096 / (ours["median_ms"] / 1e3) / 1e9)
    assert ours["fraction_of_copy"] == pytest.approx(ours["gb_per_s"] / copy["gb_per_s"])
    assert ours["peak_bytes"] >= 0
    assert variants["broken"]["error"].startswith("ZeroDivisionError")
    assert variants["compiled"]["error"] == "torch.compile unavailable"

    markdown = (out / "tiny-quick.md").read_text()
    assert "| sum n1024 | fastseq |" in markdown
    if platform.libc_ver()[0] == "glibc":  # CPU timing keeps freed memory, and says so
        assert meta["allocator"].startswith(allocator.SETTING)
        assert f"- {allocator.SETTING}" in markdown


def test_bench_malloc_default_leaves_the_allocator_alone(tiny_suite, tmp_path, monkeypatch):
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    out = tmp_path / "results"
    assert main(["bench", tiny_suite, "--quick", "--device", "cpu", "--malloc", "default",
                 "--out", str(out)]) == 0
    assert "allocator" not in json.loads((out / "tiny-quick.json").read_text())["metadata"]


def test_profile_command_measures_memory_cases(tiny_suite, tmp_path, capsys):
    out = tmp_path / "results"
    assert main(["profile", tiny_suite, "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads((out / "tiny_memory.json").read_text())
    assert report["sweep"] == "MiB"
    assert [r["peak_bytes"] for r in report["rows"]] == [MIB, 2 * MIB]
    assert (out / "tiny_memory.png").stat().st_size > 0
    assert "alloc 2 MiB" in capsys.readouterr().out


def test_trace_command_counts_the_ops_of_each_call(tiny_suite, tmp_path):
    """``trace`` records each variant's ops per call: x.sum() is one aten::sum, (x * 1).sum() one
    aten::mul and one aten::sum; a variant that raises is named with its error."""
    out = tmp_path / "results"
    assert main(["trace", tiny_suite, "--device", "cpu", "--out", str(out)]) == 0
    text = (out / "tiny_trace.txt").read_text()
    blocks = {block.splitlines()[0].split(":")[0]: block for block in text.split("\n\n")}
    ours, eager = blocks["sum n1024 | fastseq"], blocks["sum n1024 | eager"]
    assert re.search(r"^\s+1\.00 .* aten::sum$", ours, re.M) and "aten::mul" not in ours
    assert re.search(r"^\s+1\.00 .* aten::mul$", eager, re.M)
    assert "ZeroDivisionError" in blocks["sum n1024 | broken"]


CUT_SUITE = '''
import os

import torch
from fastseq.bench import Case


def _interrupt():
    raise KeyboardInterrupt  # what a time limit's signal does to a run


def cases(device, quick):
    x = torch.ones(64, device=device)
    done = [Case(suite="cut", name=f"sum {i}", params={"i": i}, dtype=torch.float32,
                 variants={"fastseq": lambda: x.sum(), "eager": lambda: (x * 1).sum()})
            for i in range(2)]
    if not os.environ.get("CUT_THE_RUN"):
        return done
    return done + [Case(suite="cut", name="cut here", params={"i": 2}, dtype=torch.float32,
                        variants={"fastseq": _interrupt})]
'''


@pytest.fixture
def cut_suite(tmp_path, monkeypatch):
    """A suite of two cases, ``cut_suites.bench_cut``; with CUT_THE_RUN set, a third case
    interrupts the run."""
    (tmp_path / "cut_suites").mkdir()
    (tmp_path / "cut_suites" / "__init__.py").write_text("")
    (tmp_path / "cut_suites" / "bench_cut.py").write_text(textwrap.dedent(CUT_SUITE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "cut_suites.bench_cut"


def test_a_run_cut_short_keeps_the_cases_it_measured(cut_suite, tmp_path, monkeypatch):
    """The suite's reports are written after every case, marked partial until the run completes:
    a run stopped on its third case leaves the first two in the JSON and Markdown."""
    monkeypatch.setenv("CUT_THE_RUN", "1")
    out = tmp_path / "results"
    with pytest.raises(KeyboardInterrupt):
        main(["bench", cut_suite, "--quick", "--device", "cpu", "--out", str(out)])
    report = json.loads((out / "cut-quick.json").read_text())
    assert [c["name"] for c in report["cases"]] == ["sum 0", "sum 1"]
    assert report["partial"] == {"cases": 2, "of": 3}
    assert "**partial: the first 2 of 3 cases" in (out / "cut-quick.md").read_text()
    assert not (out / "cut-quick_speedup.png").exists()  # plots come with the complete run


def test_a_complete_run_replaces_its_partial_reports(cut_suite, tmp_path):
    out = tmp_path / "results"
    assert main(["bench", cut_suite, "--quick", "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads((out / "cut-quick.json").read_text())
    assert [c["name"] for c in report["cases"]] == ["sum 0", "sum 1"]
    assert "partial" not in report and "partial" not in report["metadata"]
    assert "partial" not in (out / "cut-quick.md").read_text()
    assert (out / "cut-quick_speedup.png").exists()


def test_a_suite_without_cases_on_the_device_writes_nothing(tmp_path, capsys):
    """The GPU-only suite (the LSTM recurrence's kernel kinds) has no cases on the CPU: bench and
    trace say so and write no empty report."""
    out = tmp_path / "results"
    for command in ("bench", "trace"):
        assert main([command, "lstm_recurrence", "--device", "cpu", "--out", str(out)]) == 0
        assert "lstm_recurrence: no cases on cpu" in capsys.readouterr().out
    assert not any(p.name.startswith("lstm_recurrence") for p in out.iterdir())


def test_info_command(capsys):
    assert main(["info"]) == 0
    printed = capsys.readouterr().out
    for field in ("torch", "triton", "C++ CPU kernels", "backends cpu", "Triton interpreter"):
        assert field in printed


# --------------------------------------------------------------------------------------------
# Fresh memory, page faults, and comparison with committed results
# --------------------------------------------------------------------------------------------


def test_paired_rounds_give_the_median_of_ratios_within_a_round():
    """A slow spell in one round moves both variants of that round, not the speedup."""
    timings = {n: Timing(median_ms=m, iqr_ms=0.1, method="test") for n, m in
               (("fastseq", 1.0), ("eager", 20.0), ("copy", 0.5))}
    paired = {"fastseq": [1.0, 1.0, 10.0], "eager": [2.0, 30.0, 20.0], "copy": [0.5, 0.5, 0.5]}
    result = summarize(_synthetic_case(), timings, {}, {}, None, paired)
    assert result.speedups == {"eager": pytest.approx(2.0)}  # rounds: 2, 30, 2


def test_summarize_fresh_memory_speedups():
    timings = {n: Timing(median_ms=m, iqr_ms=0.1, method="test", faults_per_call=0.0)
               for n, m in (("fastseq", 2.0), ("eager", 6.0), ("copy", 0.5))}
    fresh = {"fastseq": Timing(median_ms=4.0, iqr_ms=0.1, method="fresh", faults_per_call=512),
             "eager": Timing(median_ms=6.0, iqr_ms=0.1, method="fresh", faults_per_call=1024)}
    result = summarize(_synthetic_case(), timings, {}, {}, fresh)
    assert result.speedups == {"eager": pytest.approx(3.0)}
    assert result.fresh_speedups == {"eager": pytest.approx(1.5)}
    assert result.variant("fastseq").fresh_faults_per_call == 512
    assert result.variant("copy").fresh_median_ms is None


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc_trim")
def test_fresh_memory_calls_fault_their_buffers_in_and_kept_memory_does_not():
    from fastseq.bench.timing import time_fn, time_fresh_memory

    def fill():  # 8 MiB, written: every page is touched
        return torch.ones(2 * MIB, dtype=torch.float32)

    warm = time_fn(fill, "cpu", quick=True)
    fresh = time_fresh_memory(fill, quick=True)
    assert fresh.faults_per_call >= 4  # at least one fault per 2 MiB huge page
    assert warm.faults_per_call is not None and warm.faults_per_call < fresh.faults_per_call


def test_compare_flags_speedups_that_moved(tmp_path):
    from fastseq.bench import compare

    committed = tmp_path / "tiny.json"
    committed.write_text(json.dumps({"cases": [
        {"name": "case", "speedups": {"eager": 3.0}},
        {"name": "gone", "speedups": {"eager": 1.0}},
    ]}))
    timings = {"fastseq": Timing(2.0, 0.1, "test"), "eager": Timing(4.0, 0.1, "test")}
    result = summarize(_synthetic_case(), timings, {}, {})  # now 2.0x against 3.0x committed
    (change,) = compare.compare([result], compare.committed_speedups(committed))
    assert change.ratio == pytest.approx(2 / 3) and change.outside and change.verdict == "REGRESSION"
    assert "1 of 1 speedups moved by more than 20%" in compare.format_changes([change])
    assert compare.compare([result], compare.committed_speedups(tmp_path / "none.json")) == []


def test_bench_compare_exits_1_when_a_committed_ratio_is_not_reproduced(tiny_suite, tmp_path, capsys):
    committed = tmp_path / "committed"
    committed.mkdir()
    (committed / "tiny-quick.json").write_text(json.dumps({"cases": [
        {"name": "sum n1024", "speedups": {"eager": 1000.0}}]}))
    status = main(["bench", tiny_suite, "--quick", "--device", "cpu", "--out", str(tmp_path / "new"),
                   "--compare", str(committed)])
    printed = capsys.readouterr().out
    assert status == 1 and "REGRESSION" in printed and "1 of 1 speedups moved" in printed


def test_cli_prints_no_cuda_build_warning():
    """torch.utils.benchmark imports cpp_extension, which warns about CUDA_HOME without a GPU."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "fastseq", "info"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert "No CUDA runtime" not in run.stderr and "fastseq" in run.stdout
