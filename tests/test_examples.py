"""The example scripts in their fast mode: they run, learn and write their curves, and (under torchrun)
DDP and FSDP2 give the losses of one process with the same global batch."""

import datetime
import importlib.util
import json
import os
import pathlib
import random
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN_GPT = ROOT / "examples" / "train_gpt.py"
TRAIN_LSTM_LM = ROOT / "examples" / "train_lstm_lm.py"
TAG_PYTHON_TOKENS = ROOT / "examples" / "tag_python_tokens.py"
TRANSLATE_DATES = ROOT / "examples" / "translate_dates.py"
sys.path.insert(0, str(ROOT / "examples"))  # where the scripts find common.py, as when run


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


@pytest.mark.parametrize("level", ["char", "word"])
def test_train_lstm_lm_fast_mode_learns_and_writes_its_curve(tmp_path, capsys, level):
    history = _load(TRAIN_LSTM_LM).main(["--fast", "--level", level, "--out", str(tmp_path)])
    assert history["train"][-1] < history["train"][0]
    assert history["eval"][-1] < history["eval"][0]
    assert history["unigram"] > 1
    assert (tmp_path / "perplexity.png").stat().st_size > 0
    assert json.loads((tmp_path / "history.json").read_text()) == history
    assert capsys.readouterr().out.count("\n") >= 3  # the perplexities and the samples


def test_tag_python_tokens_fast_mode_learns_and_writes_its_curve(tmp_path, capsys):
    history = _load(TAG_PYTHON_TOKENS).main(["--fast", "--out", str(tmp_path)])
    assert history["train"][-1] < history["train"][0]
    assert history["eval"][-1] > history["eval"][0]
    assert 0 < history["baseline"] < 1
    assert history["by_tag"]["all"]["lstm"] == history["eval"][-1]
    assert (tmp_path / "accuracy.png").stat().st_size > 0
    assert json.loads((tmp_path / "history.json").read_text()) == history
    assert "comment" in capsys.readouterr().out  # the table, tag by tag


@pytest.mark.parametrize("model", ["lstm", "transformer"])
def test_translate_dates_fast_mode_learns_and_writes_its_plots(tmp_path, capsys, model):
    history = _load(TRANSLATE_DATES).main(["--fast", "--model", model, "--out", str(tmp_path)])
    assert sum(history["train"][-5:]) < sum(history["train"][:5])
    assert 0.0 <= history["greedy"] <= 1.0 and 0.0 <= history["beam"] <= 1.0
    assert json.loads((tmp_path / f"{model}.json").read_text()) == history
    for plot in ("training", "attention"):
        assert (tmp_path / f"{model}_{plot}.png").stat().st_size > 0
    assert "held-out exact match" in capsys.readouterr().out


def test_the_dates_are_real_and_held_out_days_are_never_trained_on():
    dates = _load(TRANSLATE_DATES)
    held_out, train = set(dates.calendar_days(True)), set(dates.calendar_days(False))
    assert not held_out & train and len(held_out) + len(train) == 73049  # 1900-01-01 .. 2099-12-31
    rng = random.Random(0)
    day = datetime.date(1996, 3, 5)
    texts = {dates.write_out(day, rng).lower() for _ in range(200)}
    assert "tuesday, the 5th of march 1996" in texts and "5 mar 1996" in texts
    assert [dates.ordinal(d) for d in (1, 2, 3, 4, 11, 12, 13, 21, 22, 23)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "23rd"]


def test_train_vit_digits_fast_mode_learns_and_writes_its_plots(tmp_path, capsys):
    history = _load(ROOT / "examples" / "train_vit_digits.py").main(["--fast", "--out", str(tmp_path)])
    assert sum(history["train"][-5:]) < sum(history["train"][:5])
    assert sum(map(sum, history["confusion"])) == 360  # every held-out digit, once
    assert json.loads((tmp_path / "history.json").read_text()) == history
    for plot in ("accuracy", "confusion", "attention"):
        assert (tmp_path / f"{plot}.png").stat().st_size > 0
    assert "held-out accuracy" in capsys.readouterr().out


def test_train_clip_digits_fast_mode_learns_and_writes_its_plots(tmp_path, capsys):
    history = _load(ROOT / "examples" / "train_clip_digits.py").main(["--fast", "--out", str(tmp_path)])
    assert sum(history["train"][-5:]) < sum(history["train"][:5])
    assert all(0.0 <= a <= 1.0 for a in history["zero_shot"])
    assert json.loads((tmp_path / "history.json").read_text()) == history
    for plot in ("training", "similarity"):
        assert (tmp_path / f"{plot}.png").stat().st_size > 0
    assert "zero-shot accuracy" in capsys.readouterr().out


def test_clip_captions_name_each_digit_and_end_with_eos():
    clip = _load(ROOT / "examples" / "digit_captions.py")
    captions = clip.Captions()
    ids, mask = captions.encode([7, 3], [0, 1])
    words = [[captions.itos[i] for i in row if i != clip.PAD] for row in ids.tolist()]
    assert words == [["<bos>", "a", "photo", "of", "the", "number", "seven", "<eos>"],
                     ["<bos>", "a", "handwritten", "3", "<eos>"]]
    assert mask.sum(1).tolist() == [8, 5]


def test_train_latent_diffusion_digits_fast_mode_generates_and_writes_its_pictures(tmp_path, capsys):
    script = _load(ROOT / "examples" / "train_latent_diffusion_digits.py")
    history = script.main(["--fast", "--out", str(tmp_path)])
    assert history["vae_loss"][-1] < history["vae_loss"][0]
    assert len(history["train"]) == 4 and all(loss > 0 for loss in history["train"])
    assert 0.0 <= history["judged_accuracy"] <= 1.0 and len(history["judged_per_digit"]) == 10
    assert history["judge_on_real"] > 0.9  # the judge itself reads real digits
    assert json.loads((tmp_path / "history.json").read_text()) == history
    for picture in ("samples", "reconstructions", "training"):
        assert (tmp_path / f"{picture}.png").stat().st_size > 0
    assert "read as their caption's digit" in capsys.readouterr().out


def test_train_word2vec_fast_mode_learns_and_writes_its_plots(tmp_path, capsys):
    history = _load(ROOT / "examples" / "train_word2vec.py").main(["--fast", "--out", str(tmp_path)])
    assert history["train"][-1] < history["train"][0]
    assert set(history["ranks"]) == set(history["ranks_before"]) and len(history["ranks"]) >= 10
    assert json.loads((tmp_path / "history.json").read_text()) == history
    for plot in ("training", "projection"):
        assert (tmp_path / f"{plot}.png").stat().st_size > 0
    assert "median rank of a word's partner" in capsys.readouterr().out
