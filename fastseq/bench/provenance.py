"""Which code a benchmark result measured, and whether that code has changed since.

Every results file records the git commit of the checkout that produced it (:func:`git_state`),
and which of the suite's source files differed from that commit at the time. A figure is *stale*
when the files its suite measures (:func:`suite_sources`) differ between that commit and the
working tree, or were uncommitted when it was measured: the code it describes is no longer the
code in the repository.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

# Files every suite's figures depend on: the harness and the backend choice.
HARNESS = (
    "fastseq/bench/timing.py",
    "fastseq/bench/runner.py",
    "fastseq/bench/allocator.py",
    "fastseq/_backend.py",
)


def repository_root(start: Path | None = None) -> Path | None:
    """The git work tree holding ``start`` (default: this package), or ``None`` outside one."""
    start = start or Path(__file__).resolve().parent
    out = _git(["rev-parse", "--show-toplevel"], start)
    return None if out is None else Path(out)


def suite_sources(suite: str, extra: tuple[str, ...] = ()) -> list[str]:
    """Path patterns (git pathspecs, relative to the root) of the code suite ``suite`` measures:
    its op family's files by the layout's naming, the harness, and a suite's own ``extra``."""
    family = [
        f"kernels/{suite}*.py",
        f"csrc/cpu/{suite}*",
        f"csrc/cuda/{suite}*",
        f"fastseq/ops/{suite}*.py",
        f"fastseq/nn/{suite}*.py",
        f"fastseq/reference/{suite}*.py",
        f"benchmarks/bench_{suite}.py",
    ]
    return [*family, *HARNESS, *extra]


def git_state(sources: list[str], root: Path | None = None) -> dict:
    """``{"git_commit": sha or None, "git_dirty": [changed files among sources]}`` now."""
    root = root or repository_root()
    if root is None:
        return {"git_commit": None, "git_dirty": []}
    commit = _git(["rev-parse", "HEAD"], root)
    return {"git_commit": commit, "git_dirty": _changed(root, commit, sources) if commit else []}


def stale_reason(meta: dict, sources: list[str], root: Path | None = None) -> str | None:
    """Why the figures of a results file with metadata ``meta`` no longer describe the code in
    the working tree, or ``None`` when they still do."""
    commit = meta.get("git_commit")
    if not commit:
        return "no commit recorded"
    root = root or repository_root()
    if root is None:
        return None  # nothing to compare with outside a checkout
    if meta.get("git_dirty"):
        return f"measured with uncommitted changes ({', '.join(meta['git_dirty'])})"
    if _git(["cat-file", "-e", f"{commit}^{{commit}}"], root) is None:
        return f"commit {commit[:9]} is not in this repository"
    changed = _changed(root, commit, sources)
    if changed:
        more = ", ..." if len(changed) > 3 else ""
        return f"code changed since {commit[:9]} ({', '.join(changed[:3])}{more})"
    return None


def _changed(root: Path, commit: str, sources: list[str]) -> list[str]:
    """Files among ``sources`` that differ between ``commit`` and the working tree."""
    out = _git(["diff", "--name-only", commit, "--", *sources], root)
    return [] if not out else out.splitlines()


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        run = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return run.stdout.strip() if run.returncode == 0 else None
