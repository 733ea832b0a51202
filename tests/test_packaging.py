"""Packaging: the repository's top-level folders shadow nothing, and a built wheel works on its own.

``kernels/`` and ``benchmarks/`` are installed as ``fastseq.kernels`` and ``fastseq.benchmarks``.
At the repository root they are folders without an ``__init__.py``, so that ``import kernels`` from
the root (``python -m pytest`` puts it on ``sys.path``) still finds an installed package of that
name: transformers imports Hugging Face's ``kernels``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL_FOLDERS = ("kernels", "benchmarks")


def _python(code: str, cwd: Path, **env) -> str:
    """Run ``python -c code`` in ``cwd`` (which ``-c`` puts first on ``sys.path``); its stdout."""
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
        env={**os.environ, **env}, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


@pytest.mark.parametrize("name", TOP_LEVEL_FOLDERS)
def test_top_level_folder_never_shadows_an_installed_package(name, tmp_path):
    installed = tmp_path / name
    installed.mkdir()
    (installed / "__init__.py").write_text("")
    # The stand-in comes right after the repository root on sys.path: it must still win.
    found = _python(
        f"import sys; sys.path.insert(1, {str(tmp_path)!r}); import {name}; print({name}.__file__)",
        cwd=ROOT,
    )
    assert Path(found) == installed / "__init__.py"


@pytest.mark.parametrize("name", TOP_LEVEL_FOLDERS)
def test_top_level_folder_is_not_a_regular_package(name):
    assert (ROOT / name).is_dir() and not (ROOT / name / "__init__.py").exists()


def test_installed_kernels_package_resolves_from_the_root():
    """Whatever the environment calls ``kernels`` (if anything), it is not this repository's."""
    found = _python(
        "import importlib.util as u; s = u.find_spec('kernels'); "
        "print('' if s is None or s.origin is None else s.origin)",
        cwd=ROOT,
    )
    assert not found or not Path(found).resolve().is_relative_to(ROOT / "kernels")


def test_subpackages_import_from_the_root():
    found = _python(
        "import fastseq.kernels.rotary, fastseq.benchmarks.bench_rotary as b; print(b.__file__)",
        cwd=ROOT,
    )
    assert found.endswith("bench_rotary.py")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel of this checkout (C++ CPU kernels only, to keep the build short)."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
         "-w", str(out), str(ROOT)],
        check=True, env={**os.environ, "FASTSEQ_CUDA": "0"}, timeout=1200,
    )
    (path,) = out.glob("fastseq-*.whl")
    return path


def test_wheel_ships_kernels_benchmarks_and_the_extension(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastseq/kernels/attention.py" in names
    assert "fastseq/benchmarks/bench_rotary.py" in names
    assert any(n.startswith("fastseq/_C.") and n.endswith(".so") for n in names)
    assert not any(n.startswith(("kernels/", "benchmarks/", "tests/")) for n in names)


def test_installed_wheel_runs_outside_the_checkout(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
         str(wheel)],
        check=True, timeout=600,
    )
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {"PYTHONPATH": str(target), "TRITON_INTERPRET": "0"}
    origin = _python("import fastseq, fastseq._C; print(fastseq._C.__file__)", cwd=work, **env)
    assert Path(origin).is_relative_to(target)
    info = _python("from fastseq.__main__ import main; main(['info'])", cwd=work, **env)
    assert "C++ CPU kernels    built" in info and "rotary" in info
    _python(
        "import sys; from fastseq.__main__ import main; "
        "sys.exit(main(['bench', 'rotary', '--quick', '--device', 'cpu', '--out', 'out']))",
        cwd=work, **env,
    )
    assert (work / "out" / "rotary-quick.json").is_file()
