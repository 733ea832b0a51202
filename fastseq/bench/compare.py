"""Compare a benchmark run with committed results, case by case.

``python -m fastseq bench --compare benchmarks/results/cpu`` prints, for every case and baseline
found in both, the committed speedup, the new one and their ratio, and flags each ratio that
moved by more than the tolerance (default 20%): a regression shows before it lands, and a
committed figure that a fresh run does not reproduce shows too.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fastseq.bench.report import aligned
from fastseq.bench.result import CaseResult

TOLERANCE = 0.2


@dataclass(frozen=True)
class Change:
    """One speedup of one case: committed, now, and whether it moved past the tolerance."""

    case: str
    baseline: str
    committed: float
    now: float
    tolerance: float

    @property
    def ratio(self) -> float:
        return self.now / self.committed

    @property
    def outside(self) -> bool:
        return abs(self.ratio - 1) > self.tolerance

    @property
    def verdict(self) -> str:
        if not self.outside:
            return "ok"
        return "REGRESSION" if self.ratio < 1 else "faster"


def committed_speedups(path: Path) -> dict[tuple[str, str], float]:
    """``{(case, baseline): speedup}`` of a results JSON file; empty when it does not exist."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return {(c["name"], b): s for c in data.get("cases", []) for b, s in c["speedups"].items()}


def compare(results: Sequence[CaseResult], committed: dict[tuple[str, str], float],
            tolerance: float = TOLERANCE) -> list[Change]:
    """The changes of every speedup of ``results`` that ``committed`` also has."""
    return [
        Change(r.name, baseline, committed[(r.name, baseline)], now, tolerance)
        for r in results
        for baseline, now in r.speedups.items()
        if (r.name, baseline) in committed
    ]


def format_changes(changes: Sequence[Change]) -> str:
    """An aligned table of the changes and a line counting those outside the tolerance."""
    if not changes:
        return "no case in common with the committed results"
    header = ["case", "baseline", "committed", "now", "now / committed", "verdict"]
    rows = [
        [c.case, c.baseline, f"{c.committed:.2f}x", f"{c.now:.2f}x", f"{c.ratio:.2f}", c.verdict]
        for c in changes
    ]
    outside = sum(c.outside for c in changes)
    tolerance = changes[0].tolerance
    summary = f"{outside} of {len(changes)} speedups moved by more than {tolerance:.0%}"
    return aligned(header, rows, text_columns=("case", "baseline", "verdict")) + "\n" + summary
