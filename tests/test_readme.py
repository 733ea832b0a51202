"""The README's results tables are what ``python -m fastseq report`` generates from the committed
results files, and a results file's staleness follows the code it measured."""

import json
import subprocess
from pathlib import Path

import pytest

from fastseq.bench import provenance, readme

ROOT = Path(__file__).resolve().parents[1]


def test_readme_results_are_generated_from_the_results_files():
    text = (ROOT / "README.md").read_text()
    assert readme.updated_readme(text, readme.results_section(ROOT)) == text, (
        "README.md's results section is out of date: run `python -m fastseq report`"
    )


def test_quick_start_runs_as_pasted():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "README.md quick start", "exec"), {})


def test_every_headline_exists_in_some_results_file():
    """A headline that names no measured case would silently drop out of the table."""
    from fastseq.bench.runner import available_suites, load_suite

    measured = {
        case["name"]
        for path in (ROOT / readme.RESULTS).glob("*/*.json")
        for case in json.loads(path.read_text()).get("cases", [])
    }
    for name in available_suites():
        missing = set(getattr(load_suite(name), "HEADLINES", ())) - measured
        assert not missing, f"{name}: HEADLINES not in any results file: {sorted(missing)}"


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True,
                          text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path):
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "config", "user.email", "t@example.com")
    _git(tmp_path, "config", "user.name", "t")
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "rotary.py").write_text("v1\n")
    (tmp_path / "kernels" / "attention.py").write_text("v1\n")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "one")
    return tmp_path


def test_a_result_goes_stale_when_its_code_changes(repo):
    sources = provenance.suite_sources("rotary")
    meta = provenance.git_state(sources, repo)
    assert meta["git_commit"] and meta["git_dirty"] == []
    assert provenance.stale_reason(meta, sources, repo) is None

    (repo / "kernels" / "attention.py").write_text("v2\n")  # another family: still current
    assert provenance.stale_reason(meta, sources, repo) is None

    (repo / "kernels" / "rotary.py").write_text("v2\n")
    assert "kernels/rotary.py" in provenance.stale_reason(meta, sources, repo)
    assert provenance.git_state(sources, repo)["git_dirty"] == ["kernels/rotary.py"]


def test_a_result_without_a_commit_is_stale(repo):
    assert provenance.stale_reason({}, provenance.suite_sources("rotary"), repo) == "no commit recorded"
