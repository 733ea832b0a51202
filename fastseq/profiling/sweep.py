"""Peak-memory sweeps: ``python -m fastseq profile [suite ...]``.

A suite module may define ``memory_cases(device) -> list[Case]``: the same :class:`Case` objects
as for timing, usually a few series (forward, forward+backward) over growing sizes.
Each variant runs once to warm up (so one-off allocations of compilation or autotuning are not
charged to it) and once under :func:`fastseq.profiling.peak_memory`.

The plot draws peak memory against the swept parameter, one panel per series (cases whose other
params agree, e.g. forward and forward+backward) and one line per variant. The suite names that
parameter with ``MEMORY_SWEEP = "N"``; without it, the one parameter that varies is taken, and
failing that the cases are simply numbered.

On CUDA, ``snapshot`` records the caching allocator's history for the whole sweep and dumps it as
a pickle to drag into https://pytorch.org/memory_viz, which shows every allocation over time
with the Python stack that made it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fastseq.bench.case import Case
from fastseq.bench.report import MIB, aligned, write_json
from fastseq.bench.runner import load_suite, suite_label
from fastseq.profiling.memory import peak_memory


@dataclasses.dataclass
class MemoryRow:
    """Peak memory of one variant of one memory case, in bytes above the live memory at entry."""

    case: str
    params: dict[str, Any]
    variant: str
    role: str
    peak_bytes: int | None
    error: str | None = None


def measure_case(case: Case, device: torch.device) -> list[MemoryRow]:
    """Peak memory of every variant of ``case`` (a failing variant gets its error instead)."""
    rows = []
    for name, fn in case.variants.items():
        try:
            fn()
            peak, error = peak_memory(fn, device=device), None
        except Exception as exc:  # reported in the table, like the benchmark runner does
            peak, error = None, f"{type(exc).__name__}: {exc}".splitlines()[0]
        rows.append(MemoryRow(case.name, dict(case.params), name, case.role(name), peak, error))
    return rows


def run_sweep(
    name: str, device: torch.device | str, snapshot: Path | None = None
) -> list[MemoryRow]:
    """Measure every variant of suite ``name``'s ``memory_cases(device)``; one row per variant."""
    device = torch.device(device)
    suite = load_suite(name)
    if not hasattr(suite, "memory_cases"):
        raise ValueError(f"suite {name!r} defines no memory_cases(device)")
    cases = suite.memory_cases(device)
    rows = []
    with recording_allocator_history(device, snapshot):
        for case in tqdm(cases, desc=f"{suite_label(name)} memory", unit="case", leave=False):
            rows += measure_case(case, device)
    return rows


@contextlib.contextmanager
def recording_allocator_history(device: torch.device, path: Path | None):
    """Record the CUDA allocator's history inside the block and dump it to ``path`` at the end.

    Does nothing when ``path`` is ``None`` or ``device`` is not CUDA (the CPU has no such record).
    """
    if path is None or device.type != "cuda":
        yield
        return
    torch.cuda.memory._record_memory_history(max_entries=1_000_000)
    try:
        yield
    finally:
        torch.cuda.memory._dump_snapshot(str(path))
        torch.cuda.memory._record_memory_history(enabled=None)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def sweep_parameter(name: str, rows: Sequence[MemoryRow]) -> str | None:
    """The parameter suite ``name`` sweeps: its ``MEMORY_SWEEP``, else the only one that varies."""
    declared = getattr(load_suite(name), "MEMORY_SWEEP", None)
    if declared is not None:
        return declared
    keys = dict.fromkeys(k for r in rows for k in r.params)
    varying = [k for k in keys if len({repr(r.params.get(k)) for r in rows}) > 1]
    return varying[0] if len(varying) == 1 else None


def _by_case(rows: Sequence[MemoryRow]) -> dict[str, list[MemoryRow]]:
    cases: dict[str, list[MemoryRow]] = {}
    for row in rows:
        cases.setdefault(row.case, []).append(row)
    return cases


def format_table(rows: Sequence[MemoryRow]) -> str:
    """One line per case: each variant's peak MiB, then each baseline's peak over ours'."""
    variants = list(dict.fromkeys(r.variant for r in rows))
    ours = next((r.variant for r in rows if r.role == "ours"), None)
    ratios = [v for v in variants if ours and v != ours and _role(rows, v) == "baseline"]
    header = ["case", *(f"{v} MiB" for v in variants), *(f"{v}/{ours}" for v in ratios)]
    lines = []
    for case, case_rows in _by_case(rows).items():
        peaks = {r.variant: r.peak_bytes for r in case_rows}
        cells = [case, *(_mib(peaks.get(v)) for v in variants)]
        cells += [_ratio(peaks.get(v), peaks.get(ours)) for v in ratios]
        lines.append(cells)
    errors = [f"{r.case} | {r.variant}: {r.error}" for r in rows if r.error]
    return "\n".join([aligned(header, lines, text_columns=("case",)), *errors])


def _role(rows, variant) -> str:
    return next(r.role for r in rows if r.variant == variant)


def _mib(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / MIB:.1f}"


def _ratio(numerator, denominator) -> str:
    return f"{numerator / denominator:.2f}x" if numerator and denominator else "-"


def _series(rows: Sequence[MemoryRow], swept: str) -> dict[str, list[MemoryRow]]:
    """Rows grouped by their params other than ``swept``, labelled by the values that differ."""
    keys = {k for r in rows for k in r.params if k != swept}
    differing = [k for k in keys if len({repr(r.params.get(k)) for r in rows}) > 1]
    groups: dict[str, list[MemoryRow]] = {}
    for row in rows:
        label = " ".join(str(row.params.get(k)) for k in sorted(differing)) or "all"
        groups.setdefault(label, []).append(row)
    return groups


def plot_sweep(rows: Sequence[MemoryRow], swept: str | None, path: Path, title: str) -> Path:
    """Peak MiB against the swept parameter: one panel per series, one line per variant."""
    from matplotlib.figure import Figure

    series = _series(rows, swept) if swept else {"all": list(rows)}
    fig = Figure(figsize=(5 * len(series), 4), layout="constrained")
    axes = fig.subplots(1, len(series), squeeze=False)[0]
    for ax, (label, series_rows) in zip(axes, series.items(), strict=True):
        order = list(dict.fromkeys(r.case for r in series_rows))
        for variant in dict.fromkeys(r.variant for r in series_rows):
            points = [r for r in series_rows if r.variant == variant and r.peak_bytes is not None]
            xs = [r.params[swept] if swept else order.index(r.case) for r in points]
            ax.plot(xs, [r.peak_bytes / MIB for r in points], marker="o", label=variant)
        if swept and _positive_numbers(xs):  # sizes usually double: equal steps on a log axis
            ax.set_xscale("log", base=2)
        ax.set_xlabel(swept or "case")
        ax.set_ylabel("peak memory above inputs (MiB)")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=120)
    return path


def _positive_numbers(values) -> bool:
    return bool(values) and all(isinstance(v, int | float) and v > 0 for v in values)


def write_sweep(
    rows: Sequence[MemoryRow], meta: dict, suite: str, swept: str | None, folder: Path
) -> list[Path]:
    """Write ``<suite>_memory.json`` and ``<suite>_memory.png`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    data = {"metadata": meta, "suite": suite, "sweep": swept,
            "rows": [dataclasses.asdict(r) for r in rows]}
    title = f"{suite}: peak memory on {meta['device_name']}"
    return [
        write_json(data, folder / f"{suite}_memory.json"),
        plot_sweep(rows, swept, folder / f"{suite}_memory.png", title),
    ]
