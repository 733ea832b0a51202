"""What the example scripts share: their command line, plots and optimizer step, and the digits."""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib

import torch

POSITIVE = {"steps", "epochs", "batch", "eval_every"}  # the counts a run divides by or loops over


def parse_config(config_cls, fast: dict, argv=None, *, description: str, out: str, choices=None,
                 extra=None):
    """``(config, args)`` from the command line: a ``--flag`` per field of the dataclass
    ``config_cls``, ``--fast`` (the ``fast`` overrides: a few tiny steps, what the tests run) and
    ``--out`` (default ``out``); ``extra(parser)`` adds a script's own arguments."""
    parser = argparse.ArgumentParser(description=description)
    for field in dataclasses.fields(config_cls):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=None,
                            choices=(choices or {}).get(field.name))
    parser.add_argument("--fast", action="store_true", help="a few tiny steps (for tests)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(out))
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    values = dict(fast) if args.fast else {}
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)
                   if getattr(args, f.name) is not None})
    for name in POSITIVE & {f.name for f in dataclasses.fields(config_cls)}:
        value = values.get(name, getattr(config_cls, name))  # a dataclass's class holds its defaults
        if value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    return config_cls(**values), args


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path) -> None:
    """Write ``fig`` to ``path`` as a PNG and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


def optimizer_step(loss, optimizer, schedule=None, clip: float | None = None) -> None:
    """Backpropagate ``loss``, clip the gradients' norm to ``clip``, step the optimizer and the
    learning-rate ``schedule``."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()
    if schedule is not None:
        schedule.step()


def warmup_cosine(step: int, steps: int) -> float:
    """A learning-rate factor: a linear warm-up (100 steps, or a tenth of a short run), then a
    cosine decay to zero at ``steps``."""
    warmup = min(100, steps // 10 + 1)
    return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))


def plot_loss_and_accuracy(history, path, title: str, accuracy: str, accuracy_label: str) -> None:
    """The training loss (log scale) and ``history[accuracy]`` at its evaluation steps, on twin axes."""
    plt = pyplot()
    fig, loss_axis = plt.subplots(figsize=(6, 4))
    loss_axis.plot(history["step"], history["train"], alpha=0.5, label="training loss")
    loss_axis.set_yscale("log")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("cross-entropy")
    accuracy_axis = loss_axis.twinx()
    accuracy_axis.plot(history["eval_step"], history[accuracy], marker="o", color="tab:green",
                       label=accuracy_label)
    accuracy_axis.set_ylabel(accuracy_label)
    accuracy_axis.set_ylim(0, 1.02)
    fig.legend(loc="center right")
    loss_axis.set_title(title)
    save(fig, path)


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(train images, train labels, held-out images, held-out labels)``; images ``(N, 1, 8, 8)``
    in ``[0, 1]``, every fifth of a fixed shuffle held out."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    labels = torch.tensor(data.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    held_out = order[::5]
    train = order[torch.arange(len(order)) % 5 != 0]
    return images[train], labels[train], images[held_out], labels[held_out]
