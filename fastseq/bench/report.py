"""Reports of benchmark results: a printed table, JSON with the run's metadata, Markdown, and plots.

Files go to ``benchmarks/results/<device-slug>/`` under the current directory (``cpu``,
``nvidia-h100-80gb-hbm3``, ...) unless another folder is given, named after the suite:
``<suite>.json``, ``<suite>.md``, ``<suite>_speedup.png`` (speedup of ours over each baseline per
case) and ``<suite>_bandwidth.png`` (each variant's bandwidth as a fraction of a plain copy of the
same bytes). Plots are drawn on matplotlib ``Figure`` objects directly, without pyplot, so nothing
touches the process-wide backend and no display is needed.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from fastseq.bench.result import CaseResult, VariantResult

RESULTS_ROOT = Path("benchmarks", "results")
MIB = 2**20

# --------------------------------------------------------------------------------------------
# Where, and on what
# --------------------------------------------------------------------------------------------


def device_name(device: torch.device | str) -> str:
    """Marketing name of the GPU (``"NVIDIA H100 80GB HBM3"``) or the CPU model."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_model() or platform.processor() or "cpu"


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return None


def device_slug(device: torch.device | str) -> str:
    """Results folder name: ``"cpu"``, or the GPU's name slugged (``nvidia-h100-80gb-hbm3``)."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def results_dir(device: torch.device | str, out: str | os.PathLike | None = None) -> Path:
    """``out`` if given, else ``benchmarks/results/<device-slug>`` (relative to the current dir)."""
    return Path(out) if out is not None else RESULTS_ROOT / device_slug(device)


def triton_version() -> str | None:
    """Version of the installed Triton, or ``None``."""
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def environment(device: torch.device | str) -> dict:
    """Metadata of this run: device, library versions, CPU count, UTC timestamp, command line."""
    from fastseq import __version__, _backend

    device = torch.device(device)
    meta = {
        "device": str(device),
        "device_name": device_name(device),
        "device_slug": device_slug(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version(),
        "cuda": torch.version.cuda,
        "fastseq": __version__,
        "fastseq_backends": _backend.available_backends(device),
        "triton_interpreter": _backend.triton_interpreted(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(sys.orig_argv),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta["gpu_memory_bytes"] = props.total_memory
        meta["compute_capability"] = f"{props.major}.{props.minor}"
    return meta


def describe(meta: dict) -> str:
    """One line saying where the numbers come from."""
    return (
        f"{meta['device_name']} ({meta['device']}), torch {meta['torch']}, "
        f"triton {meta['triton']}, CUDA {meta['cuda']}, fastseq backends "
        f"{meta['fastseq_backends']}, {meta['torch_threads']} threads"
    )


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------

SPEEDUP_LEGEND = "speedup: this baseline's median / fastseq's median (above 1: fastseq is faster)"
FRESH_LEGEND = (
    "faults: minor page faults per call; fresh ms, fresh speedup: the same calls when each starts "
    "from memory handed back to the kernel (every buffer faulted in afresh)"
)
TEXT_COLUMNS = ("case", "variant", "note")  # left-aligned; the others are numbers


def _columns(results: Sequence[CaseResult]) -> list[str]:
    columns = ["case", "variant", "median ms", "IQR ms", "GB/s"]
    if any(r.flops for r in results):
        columns.append("TFLOP/s")
    columns += ["of copy", "peak MiB", "speedup"]
    if _has_fresh(results):
        columns += ["faults", "fresh ms", "fresh faults", "fresh speedup"]
    return columns + ["note"]


def _has_fresh(results: Sequence[CaseResult]) -> bool:
    return any(v.fresh_median_ms is not None for r in results for v in r.variants)


def _legend(results: Sequence[CaseResult]) -> str:
    return SPEEDUP_LEGEND + ("\n" + FRESH_LEGEND if _has_fresh(results) else "")


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _ms(value: float | None) -> str:
    """Milliseconds with three or four significant digits and no exponent: 1234, 12.3, 0.0123."""
    if value is None:
        return ""
    if value < 1:
        return f"{value:.3g}"
    return f"{value:.{max(0, 2 - int(math.log10(value)))}f}"


def _variant_cells(result: CaseResult, v: VariantResult, columns: list[str]) -> list[str]:
    speedup, fresh_speedup = result.speedups.get(v.name), result.fresh_speedups.get(v.name)
    cells = {
        "case": "",
        "variant": v.name,
        "median ms": _ms(v.median_ms),
        "IQR ms": _ms(v.iqr_ms),
        "GB/s": _fmt(v.gb_per_s, ".1f"),
        "TFLOP/s": _fmt(v.tflop_per_s, ".2f"),
        "of copy": _fmt(v.fraction_of_copy, ".0%"),
        "peak MiB": _fmt(None if v.peak_bytes is None else v.peak_bytes / MIB, ".1f"),
        "speedup": "" if speedup is None else f"{speedup:.2f}x",
        "faults": _fmt(v.faults_per_call, ".0f"),
        "fresh ms": _ms(v.fresh_median_ms),
        "fresh faults": _fmt(v.fresh_faults_per_call, ".0f"),
        "fresh speedup": "" if fresh_speedup is None else f"{fresh_speedup:.2f}x",
        "note": (v.error or "")[:90],
    }
    return [cells[c] for c in columns]


def table_rows(results: Sequence[CaseResult]) -> tuple[list[str], list[list[str]]]:
    """Header and rows (one per variant; the case name on its first row) of the results table."""
    columns = _columns(results)
    rows = []
    for result in results:
        for i, v in enumerate(result.variants):
            cells = _variant_cells(result, v, columns)
            cells[0] = result.name if i == 0 else ""
            rows.append(cells)
    return columns, rows


def aligned(header: list[str], rows: list[list[str]], text_columns=TEXT_COLUMNS) -> str:
    """Text table: text columns left-aligned, numbers right-aligned, a rule under the header."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]

    def line(cells):
        return "  ".join(
            cell.ljust(width) if name in text_columns else cell.rjust(width)
            for cell, width, name in zip(cells, widths, header, strict=True)
        ).rstrip()

    return "\n".join([line(header), "-" * len(line(header)), *map(line, rows)])


def format_table(results: Sequence[CaseResult]) -> str:
    """The results as an aligned text table, with a legend line."""
    return aligned(*table_rows(results)) + "\n" + _legend(results)


def format_markdown(suite: str, results: Sequence[CaseResult], meta: dict) -> str:
    """A Markdown page: what ran where, then the results table."""
    header, rows = table_rows(results)
    lines = [
        f"# {suite}",
        "",
        f"- device: {meta['device_name']} (`{meta['device']}`)",
        f"- torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, "
        f"Python {meta['python']}, {meta['cpu_count']} CPUs ({meta['torch_threads']} threads)",
        f"- fastseq backends available: {', '.join(meta['fastseq_backends'])}",
        *([f"- {meta['allocator']}"] if meta.get("allocator") else []),
        *([f"- **{meta['partial']}**"] if meta.get("partial") else []),
        f"- {meta['timestamp']}: `{meta['command']}`",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if h in TEXT_COLUMNS else "---:" for h in header) + "|",
    ]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines + ["", *_legend(results).splitlines(), ""])


def to_json(suite: str, results: Sequence[CaseResult], meta: dict, **extra) -> dict:
    """JSON-ready dict: ``metadata``, ``suite``, any ``extra`` keys, and ``cases``."""
    return {
        "metadata": meta,
        "suite": suite,
        **extra,
        "cases": [dataclasses.asdict(r) for r in results],
    }


def write_json(data: dict, path: Path) -> Path:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def _new_figure(n_rows: int, title: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 1.2 + 0.45 * n_rows), layout="constrained")
    ax = fig.subplots()
    ax.set_title(title, fontsize=10)
    return fig, ax


def _grouped_barh(ax, labels: list[str], series: dict[str, list[float | None]], text):
    """Horizontal bars, one group per label and one bar per series, each bar labelled with
    ``text(value)``; missing values are gaps."""
    height = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        ys = [row + (i - (len(series) - 1) / 2) * height for row in range(len(labels))]
        bars = ax.barh(ys, [v or 0.0 for v in values], height=height, label=name)
        ax.bar_label(bars, labels=[text(v) if v else "" for v in values], fontsize=7, padding=2)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()  # first case on top, as in the table
    ax.legend(fontsize=8, loc="best")


def plot_speedups(results: Sequence[CaseResult], path: Path, title: str) -> Path | None:
    """Bars of ours' speedup over each baseline, per case; ``None`` if nothing to plot."""
    baselines = list(dict.fromkeys(b for r in results for b in r.speedups))
    if not baselines:
        return None
    series = {b: [r.speedups.get(b) for r in results] for b in baselines}
    fig, ax = _new_figure(len(results) * max(1, len(baselines) / 2), title)
    _grouped_barh(ax, [r.name for r in results], series, lambda x: f"{x:.2f}x")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("speedup of fastseq (baseline time / fastseq time)")
    fig.savefig(path, dpi=120)
    return path


def plot_bandwidth(results: Sequence[CaseResult], path: Path, title: str) -> Path | None:
    """Bars of each variant's bandwidth as a fraction of the copy's, per case; ``None`` if none."""
    compared = [v for r in results for v in r.variants if v.role in ("ours", "baseline")]
    names = list(dict.fromkeys(v.name for v in compared if v.fraction_of_copy is not None))
    if not names:
        return None
    series = {n: [_fraction(r, n) for r in results] for n in names}
    fig, ax = _new_figure(len(results) * max(1, len(names) / 2), title)
    _grouped_barh(ax, [r.name for r in results], series, lambda x: f"{x:.0%}")
    ax.axvline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xlabel("bandwidth / bandwidth of a copy of the same bytes (1.0 = copy speed)")
    fig.savefig(path, dpi=120)
    return path


def _fraction(result: CaseResult, name: str) -> float | None:
    v = result.variant(name)
    return None if v is None else v.fraction_of_copy


# --------------------------------------------------------------------------------------------
# All of it
# --------------------------------------------------------------------------------------------


def write_reports(
    suite: str, results: Sequence[CaseResult], meta: dict, folder: Path, stem: str, **extra
) -> list[Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and the PNG plots into ``folder``; returns the paths."""
    where = f"{suite} on {meta['device_name']}"
    paths = [
        *_write_tables(suite, results, meta, folder, stem, **extra),
        plot_speedups(results, folder / f"{stem}_speedup.png", f"{where}: speedup over baselines"),
        plot_bandwidth(results, folder / f"{stem}_bandwidth.png", f"{where}: bandwidth vs copy"),
    ]
    return [p for p in paths if p is not None]


def write_partial_reports(
    suite: str, results: Sequence[CaseResult], meta: dict, folder: Path, stem: str, total: int,
    **extra,
) -> list[Path]:
    """Write ``<stem>.json`` and ``<stem>.md`` for the first cases of a run still going (no
    plots), marked partial (JSON: ``"partial": {"cases": done, "of": total}``), so that a run cut
    short keeps what it measured; the complete run's :func:`write_reports` replaces them."""
    done = {"cases": len(results), "of": total}
    note = f"partial: the first {len(results)} of {total} cases (the run stopped or is running)"
    return _write_tables(suite, results, {**meta, "partial": note}, folder, stem, partial=done,
                         **extra)


def _write_tables(suite, results, meta, folder, stem, **extra) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    markdown = folder / f"{stem}.md"
    markdown.write_text(format_markdown(suite, results, meta))
    return [write_json(to_json(suite, results, meta, **extra), folder / f"{stem}.json"), markdown]
