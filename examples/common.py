"""What the example scripts share: their command line and their plots."""

from __future__ import annotations

import argparse
import dataclasses
import pathlib

import torch


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
