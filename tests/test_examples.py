"""The example scripts in their fast mode: they run, learn, and (under torchrun) DDP and FSDP2 give
the losses of one process with the same global batch."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN_GPT = ROOT / "examples" / "train_gpt.py"


def _load(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_train_gpt_fast_mode_learns_and_writes_its_curve(tmp_path, capsys):
    history = _load(TRAIN_GPT).main(["--fast", "--out", str(tmp_path)])
    assert history["train"][-1] < history["train"][0]
    assert history["eval"][-1] < history["eval"][0]
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert json.loads((tmp_path / "losses.json").read_text()) == history
    assert capsys.readouterr().out.count("\n") >= 3  # the samples


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_process_training_gives_the_losses_of_one(tmp_path, parallel):
    single = _load(TRAIN_GPT).main(["--fast", "--out", str(tmp_path / "one")])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--standalone", str(TRAIN_GPT), "--fast", "--parallel", parallel, "--out",
         str(tmp_path / parallel)],
        check=True, env=env, cwd=ROOT, capture_output=True, timeout=120)
    double = json.loads((tmp_path / parallel / "losses.json").read_text())
    assert double["step"] == single["step"]
    for key in ("train", "eval"):
        assert double[key] == pytest.approx(single[key], abs=1e-5)
