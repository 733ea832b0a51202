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


@pytest.mark.parametrize("decoder", ["transformer", "lstm"])
def test_caption_digits_fast_mode_learns_and_writes_its_plots(tmp_path, capsys, decoder):
    history = _load(ROOT / "examples" / "caption_digits.py").main(["--fast", "--decoder", decoder, "--out",
                                                                  str(tmp_path)])
    assert sum(history["train"][-5:]) < sum(history["train"][:5])
    assert 0.0 <= history["greedy"] <= 1.0 and 0.0 <= history["beam"] <= 1.0
    assert json.loads((tmp_path / f"{decoder}.json").read_text()) == history
    for plot in ("training", "attention"):
        assert (tmp_path / f"{decoder}_{plot}.png").stat().st_size > 0
    assert "held-out exact captions" in capsys.readouterr().out


def test_digit_canvases_place_whole_digits_left_to_right_and_caption_them():
    import torch

    script = _load(ROOT / "examples" / "caption_digits.py")
    images = (torch.arange(10.0) + 1).view(10, 1, 1, 1).expand(10, 1, 8, 8)  # digit d drawn as d + 1
    canvases, tokens, drawn = script.canvases(images, torch.arange(10), 200, torch.Generator().manual_seed(0))
    assert canvases.shape == (200, 1, 8, 32) and tokens.shape == (200, 10)
    assert {len(labels) for labels in drawn} == {2, 3, 4}
    for canvas, row, labels in zip(canvases, tokens.tolist(), drawn, strict=True):
        filled = canvas[0, 0][canvas[0, 0] > 0]
        assert len(filled) == 8 * len(labels)  # whole digits, none overlapping
        assert (filled[::8] - 1).long().tolist() == labels  # left to right
        assert script.decode(row[1:]) == " then ".join(script.NAMES[d] for d in labels)
        assert row[0] == script.BOS and row[2 * len(labels)] == script.EOS
    assert len({int((canvas[0, 0] > 0).nonzero()[0]) for canvas in canvases}) > 4  # blank columns vary


def test_train_word2vec_fast_mode_learns_and_writes_its_plots(tmp_path, capsys):
    history = _load(ROOT / "examples" / "train_word2vec.py").main(["--fast", "--out", str(tmp_path)])
    assert history["train"][-1] < history["train"][0]
    assert set(history["ranks"]) == set(history["ranks_before"]) and len(history["ranks"]) >= 10
    assert json.loads((tmp_path / "history.json").read_text()) == history
    for plot in ("training", "projection"):
        assert (tmp_path / f"{plot}.png").stat().st_size > 0
    assert "median rank of a word's partner" in capsys.readouterr().out


@pytest.mark.parametrize("temporal", ["lstm", "transformer"])
def test_classify_moving_digits_fast_mode_learns_and_writes_its_plots(tmp_path, capsys, temporal):
    script = _load(ROOT / "examples" / "classify_moving_digits.py")
    history = script.main(["--fast", "--temporal", temporal, "--out", str(tmp_path)])
    assert sum(history["train"][-5:]) < sum(history["train"][:5])
    assert sum(map(sum, history["confusion"])) == history["held_out_clips"] == 4 * 360  # each way, once
    assert 0.0 <= history["accuracy"][-1] <= history["direction_accuracy"] <= 1.0
    assert json.loads((tmp_path / "history.json").read_text()) == history
    for plot in ("accuracy", "confusion", "clips"):
        assert (tmp_path / f"{plot}.png").stat().st_size > 0
    assert "held-out accuracy" in capsys.readouterr().out


def test_moving_clips_slide_the_digit_the_named_way_and_pad_with_zeros():
    import torch

    script = _load(ROOT / "examples" / "classify_moving_digits.py")
    images = torch.ones(4, 1, 8, 8)
    clips, lengths, labels = script.moving_clips(images, torch.tensor([3, 3, 7, 7]), torch.arange(4),
                                                 torch.Generator().manual_seed(0), 8, 12)
    assert clips.shape == (4, 12, 1, 16, 16) and labels.tolist() == [3, 13, 27, 37]
    for clip, length, direction in zip(clips, lengths.tolist(), script.DIRECTIONS, strict=True):
        assert 8 <= length <= 12 and clip[length:].abs().sum() == 0
        corners = [torch.nonzero(frame[0])[0].tolist() for frame in clip[:length]]  # (row, col)
        assert all(frame[0].sum() == 64 for frame in clip[:length])  # the whole digit, every frame
        axis, sign = {"left": (1, -1), "right": (1, 1), "up": (0, -1), "down": (0, 1)}[direction]
        along = [sign * corner[axis] for corner in corners]
        assert along == sorted(along) and along[-1] - along[0] >= 4  # it moves the named way
        assert len({corner[1 - axis] for corner in corners}) == 1  # and only that way


def test_sentence_retrieval_fast_mode_learns_and_writes_its_plots(tmp_path, capsys):
    history = _load(ROOT / "examples" / "sentence_retrieval.py").main(["--fast", "--out", str(tmp_path)])
    assert sum(history["train"][-5:]) < sum(history["train"][:5])
    for name in ("recall@1", "recall@10"):
        assert len(history[name]) == len(history["eval_step"]) and all(0 <= r <= 1 for r in history[name])
        assert 0 < history["chance"][name] < 1 and 0 <= history["tfidf"][name] <= 1
    keys = history["held_out_keys"]
    assert len(history["similarity"]) == len(keys) == history["topics"]["held_out"]
    assert json.loads((tmp_path / "history.json").read_text()) == history
    for plot in ("training", "similarity"):
        assert (tmp_path / f"{plot}.png").stat().st_size > 0
    assert "held-out retrieval" in capsys.readouterr().out


def test_topic_halves_start_with_the_title_and_held_out_topics_are_never_trained_on():
    script = _load(ROOT / "examples" / "sentence_retrieval.py")
    train, held_out = script.corpus()
    assert not {key for key, _, _ in train} & {key for key, _, _ in held_out}
    assert len(held_out) == (len(train) + len(held_out)) // 4
    for key, first, second in train + held_out:
        assert first and second
        assert first[:len(key.split("-"))] == script.words(key.replace("-", " "))
    first, second = script.halves("demo", "Heading\n*******\n\none two three\n\nfour five\n\nsix seven")
    assert (first, second) == (["demo", "heading", "one", "two", "three"], ["four", "five", "six", "seven"])
