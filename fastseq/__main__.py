"""Command line: ``python -m fastseq {bench,profile,trace,report,info}`` (also installed as ``fastseq``).

    python -m fastseq bench [suite ...] [--quick] [--malloc keep|default] [--out DIR] [--device cpu|cuda]
                            [--compare DIR]
    python -m fastseq profile [suite ...] [--snapshot] [--out DIR] [--device cpu|cuda]
    python -m fastseq trace [suite ...] [--out DIR] [--device cpu|cuda]
    python -m fastseq report [--check]
    python -m fastseq info

``bench`` times every case of the suites (all of them when none is named) and writes JSON,
Markdown and plots to ``benchmarks/results/<device>/`` (or ``--out``); with ``--compare DIR`` it
also prints each speedup against the one committed in ``DIR`` and exits 1 when one moved by more
than 20%. ``report`` regenerates the README's results tables from the committed results (``--check``:
exit 1 when the README is out of date). ``profile`` sweeps the
suites' memory cases. ``trace`` records with ``torch.profiler`` what one call of each variant
of the suites' quick cases spends its host time on (default suite: dispatch). ``info`` says
what this installation can run. The device defaults to CUDA when a GPU is present.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from pathlib import Path

import torch

OUT_HELP = "folder for the reports (default: benchmarks/results/<device-slug>, relative)"


def _device(name: str | None) -> torch.device:
    if name is None:
        from fastseq.bench.runner import default_device

        return default_device()
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fastseq: --device cuda, but torch sees no CUDA GPU")
    return device


def _suites(names: list[str]) -> list[str]:
    from fastseq.bench.runner import available_suites, load_suite

    if not names:
        return available_suites()
    for name in names:
        try:
            load_suite(name)
        except (ValueError, ImportError) as error:
            raise SystemExit(f"fastseq: {error}") from error
    return names


def bench(args: argparse.Namespace) -> int:
    """Run and report the benchmark suites; exit status 1 if an op of ours failed on some case."""
    from fastseq.bench import compare, provenance, report
    from fastseq.bench.runner import load_suite, run_cases, suite_label

    device, names = _device(args.device), _suites(args.suites)
    meta = report.environment(device)
    if device.type == "cpu":
        from fastseq.bench.allocator import huge_pages_setting, keep_freed_memory

        settings = [keep_freed_memory() if args.malloc == "keep" else None, huge_pages_setting()]
        if any(settings):
            meta["allocator"] = "; ".join(s for s in settings if s)
    print(report.describe(meta))
    failed = moved = False
    for name in names:
        label, suite = suite_label(name), load_suite(name)
        cases = suite.cases(device, args.quick)
        if not cases:
            print(f"\n{label}: no cases on {device.type}")
            continue
        folder = report.results_dir(device, args.out)
        stem = f"{label}-quick" if args.quick else label
        sources = provenance.suite_sources(label, getattr(suite, "SOURCES", ()))
        suite_meta = {**meta, **provenance.git_state(sources)}

        # What each case adds is written at once: a run cut short keeps what it measured.
        if args.compare is not None:  # read before this run's reports may overwrite it
            committed = compare.committed_speedups(args.compare / f"{stem}.json")
        keep = functools.partial(report.write_partial_reports, label, meta=suite_meta,
                                 folder=folder, stem=stem, total=len(cases), quick=args.quick)
        results = run_cases(cases, device, quick=args.quick, desc=label, on_result=keep)
        print(f"\n{label}\n{report.format_table(results)}")
        paths = report.write_reports(label, results, suite_meta, folder, stem, quick=args.quick)
        print("wrote " + ", ".join(str(p) for p in paths))
        failed |= any(r.ours.error for r in results)
        if args.compare is not None:
            changes = compare.compare(results, committed)
            print(f"\n{label} against {args.compare}\n{compare.format_changes(changes)}")
            moved |= any(c.outside for c in changes)
    return int(failed or moved)


def report_command(args: argparse.Namespace) -> int:
    """Regenerate (or check) the README's results tables from the committed results files."""
    from fastseq.bench import provenance, readme

    root = args.root or provenance.repository_root(Path.cwd())
    if root is None:
        raise SystemExit("fastseq report: run it inside the repository or pass --root")
    return readme.write_or_check(Path(root), args.check)


def _setting(args: argparse.Namespace, suites: list[str]):
    """(device, suite names, environment metadata, results folder) of a command, the folder made
    and the environment printed."""
    from fastseq.bench import report

    device, names = _device(args.device), _suites(suites)
    meta = report.environment(device)
    print(report.describe(meta))
    folder = report.results_dir(device, args.out)
    folder.mkdir(parents=True, exist_ok=True)
    return device, names, meta, folder


def profile(args: argparse.Namespace) -> int:
    """Run the suites' peak-memory sweeps; print, plot and save them."""
    from fastseq.bench.runner import load_suite, suite_label
    from fastseq.profiling import sweep

    device, names, meta, folder = _setting(args, args.suites)
    for name in names:
        label = suite_label(name)
        if not hasattr(load_suite(name), "memory_cases"):
            print(f"\n{label}: no memory_cases(device), nothing to profile")
            continue
        snapshot = folder / f"{label}_memory_snapshot.pickle" if args.snapshot else None
        rows = sweep.run_sweep(name, device, snapshot=snapshot)
        print(f"\n{label}: peak memory above the inputs\n{sweep.format_table(rows)}")
        paths = sweep.write_sweep(rows, meta, label, sweep.sweep_parameter(name, rows), folder)
        if snapshot is not None and snapshot.exists():
            paths.append(snapshot)
            print(f"allocator snapshot: open {snapshot} in https://pytorch.org/memory_viz")
        print("wrote " + ", ".join(str(p) for p in paths))
    if args.snapshot and device.type != "cuda":
        print("--snapshot records the CUDA allocator; nothing was recorded on the CPU")
    return 0


def trace(args: argparse.Namespace) -> int:
    """Trace one call of every variant of the suites' cases (default: the dispatch suite)."""
    from fastseq.bench import report
    from fastseq.bench.runner import load_suite, suite_label
    from fastseq.bench.trace import trace_cases

    device, names, meta, folder = _setting(args, args.suites or ["dispatch"])
    for name in names:
        label = suite_label(name)
        cases = load_suite(name).cases(device, quick=True)
        if not cases:
            print(f"\n{label}: no cases on {device.type}")
            continue
        text = trace_cases(cases, device)
        path = folder / f"{label}_trace.txt"
        path.write_text(report.describe(meta) + "\n\n" + text)
        print(f"\n{text}wrote {path}")
    return 0


def info_lines() -> list[str]:
    """What ``python -m fastseq info`` prints: versions, devices, builds, backends."""
    import platform

    import fastseq
    from fastseq import _backend, _extension
    from fastseq.bench.report import device_name, triton_version
    from fastseq.bench.runner import available_suites

    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    lines = [
        f"fastseq            {fastseq.__version__}",
        f"python             {platform.python_version()}",
        f"torch              {torch.__version__}",
        f"triton             {triton_version() or 'not installed'}",
        f"CUDA (torch)       {torch.version.cuda or 'none (CPU-only build)'}",
        f"default device     {_device(None)}",
    ]
    lines += [f"{str(d) + ' name':<18} {device_name(d)}" for d in devices]
    lines += [
        f"C++ CPU kernels    {'built' if _extension.cpu_built() else 'not built'}",
        f"CUDA kernels       {'built' if _extension.cuda_built() else 'not built'}",
        f"Triton interpreter {'on' if _backend.triton_interpreted() else 'off'} (TRITON_INTERPRET)",
    ]
    lines += [
        f"{'backends ' + d.type:<18} {', '.join(_backend.available_backends(d))}" for d in devices
    ]
    lines.append(f"benchmark suites   {', '.join(available_suites()) or 'none found'}")
    return lines


def info(args: argparse.Namespace) -> int:
    print("\n".join(info_lines()))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fastseq", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def with_common(command, help_text, run):
        sub = commands.add_parser(command, help=help_text, description=help_text)
        sub.add_argument("suites", nargs="*", help="suite names (default: all), e.g. rotary")
        sub.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available")
        sub.add_argument("--out", type=Path, help=OUT_HELP)
        sub.set_defaults(run=run)
        return sub

    bench_parser = with_common("bench", "time the benchmark suites", bench)
    bench_parser.add_argument(
        "--quick", action="store_true", help="small shapes and short timings (a smoke test)"
    )
    bench_parser.add_argument(
        "--malloc", choices=["keep", "default"], default="keep",
        help="CPU: keep freed memory in the process (default; see fastseq.bench.allocator) or "
             "leave glibc's malloc as it is"
    )
    bench_parser.add_argument(
        "--compare", type=Path, metavar="DIR",
        help="print each speedup against the results committed in DIR; exit 1 if one moved >20%%"
    )
    with_common("profile", "peak-memory sweeps of the suites", profile).add_argument(
        "--snapshot", action="store_true", help="CUDA: also dump an allocator history snapshot"
    )
    with_common("trace", "host time of one call of each variant, by op (torch.profiler)", trace)
    report_parser = commands.add_parser("report", help="regenerate the README's results tables")
    report_parser.add_argument("--check", action="store_true", help="exit 1 if the README is stale")
    report_parser.add_argument("--root", type=Path, help="repository root (default: the current one)")
    report_parser.set_defaults(run=report_command)
    commands.add_parser("info", help="versions, devices, builds, backends").set_defaults(run=info)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m fastseq`` and the ``fastseq`` console script."""
    # torch.utils.benchmark imports torch.utils.cpp_extension, which on a machine without a GPU
    # warns that no CUDA runtime is found: about building extensions, which no command here does.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    args = _parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
