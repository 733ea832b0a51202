"""Train a small byte-level GPT on the text of Python's bundled documentation.

The corpus is ``pydoc_data.topics`` (about 0.47 million characters, on every Python install),
split 90/10 into training and held-out text. The model is ``fastseq.models.GPT`` (Llama flavour
by default). The script prints the held-out loss as it falls, writes the loss curve as a PNG and
the losses as JSON, and ends with a few generated samples.

    python examples/train_gpt.py                      # one process, a few minutes on 2 CPU cores
    python examples/train_gpt.py --fast               # a few steps: what the test runs
    torchrun --nproc_per_node 2 examples/train_gpt.py --parallel ddp    # or --parallel fsdp

Under ``torchrun`` every rank draws the same global batch and trains on its share of the rows
(gloo on the CPU, nccl on GPUs); gradients are averaged by DDP or FSDP2's ``fully_shard``, so the
losses equal those of one process with the same global batch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import pydoc_data.topics

import torch
import torch.distributed as dist
import torch.nn.functional as F
from common import optimizer_step, parse_config, pyplot, save
from tqdm.auto import tqdm

from fastseq.models import GPT, GPTConfig


@dataclasses.dataclass
class TrainConfig:
    steps: int = 600
    batch: int = 16  # global batch, split across ranks
    block: int = 128
    lr: float = 3e-3
    eval_every: int = 50
    eval_batches: int = 8
    flavour: str = "llama"
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    seed: int = 0


FAST = dict(steps=8, batch=4, block=32, eval_every=4, eval_batches=2, n_layer=2, n_embd=32)


def corpus(device) -> tuple[torch.Tensor, torch.Tensor]:
    """(training bytes, held-out bytes) of Python's documentation, as int64 tensors."""
    text = "\n\n".join(pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics))
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long, device=device)
    split = int(0.9 * len(data))
    return data[:split], data[split:]


def batch_of(data, rows, block, generator):
    """``rows`` random windows of ``block + 1`` bytes: (inputs, next-byte targets)."""
    starts = torch.randint(0, len(data) - block - 1, (rows,), generator=generator)
    windows = torch.stack([data[s:s + block + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]


def loss_of(model, x, y):
    logits = model(x)
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def setup_parallel(kind: str):
    """(rank, world size, device); starts the process group under torchrun."""
    if kind == "none":
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}" if torch.cuda.is_available()
                          else "cpu")
    return rank, world, device


def wrap(model, kind):
    """``model`` under DDP, FSDP2 (``fully_shard`` per block, then the whole), or as it is."""
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    if kind == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    return model


def mean_over_ranks(value: torch.Tensor, world: int) -> float:
    if world > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= world
    return value.item()


@torch.no_grad()
def evaluate(model, data, config, world, rank):
    model.eval()
    generator = torch.Generator().manual_seed(1234)  # the same held-out windows every time
    rows = config.batch // world
    losses = []
    for _ in range(config.eval_batches):
        x, y = batch_of(data, config.batch, config.block, generator)
        x, y = x[rank * rows:(rank + 1) * rows], y[rank * rows:(rank + 1) * rows]
        losses.append(mean_over_ranks(loss_of(model, x, y), world))
    model.train()
    return sum(losses) / len(losses)


def train(config: TrainConfig, parallel: str, out: pathlib.Path) -> dict:
    """Train, evaluate every ``eval_every`` steps; returns the losses (and writes them)."""
    rank, world, device = setup_parallel(parallel)
    if config.batch % world:
        raise ValueError(f"--batch {config.batch} must be a multiple of the {world} ranks")
    torch.manual_seed(config.seed)
    train_data, held_out = corpus(device)
    model = GPT(GPTConfig(vocab_size=256, n_layer=config.n_layer, n_head=config.n_head,
                          n_embd=config.n_embd, flavour=config.flavour,
                          max_position_embeddings=config.block)).to(device)
    trained = wrap(model, parallel)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=config.lr, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step / config.steps, 1.0))))
    generator = torch.Generator().manual_seed(config.seed)
    rows = config.batch // world
    history = {"step": [], "train": [], "eval_step": [], "eval": []}
    progress = tqdm(range(config.steps), disable=rank != 0, desc="train")
    for step in progress:
        x, y = batch_of(train_data, config.batch, config.block, generator)
        x, y = x[rank * rows:(rank + 1) * rows], y[rank * rows:(rank + 1) * rows]
        loss = loss_of(trained, x, y)
        optimizer_step(loss, optimizer, schedule)
        history["step"].append(step)
        history["train"].append(mean_over_ranks(loss, world))
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            history["eval_step"].append(step + 1)
            history["eval"].append(evaluate(trained, held_out, config, world, rank))
            progress.set_postfix(train=f"{history['train'][-1]:.3f}", held_out=f"{history['eval'][-1]:.3f}")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "losses.json").write_text(json.dumps(history))
        plot(history, out / "loss.png")
        if parallel == "none":
            print_samples(model, device)
    if world > 1:
        dist.destroy_process_group()
    return history


def plot(history, path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(history["step"], history["train"], label="training batch", alpha=0.5)
    ax.plot(history["eval_step"], history["eval"], label="held out", marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per byte)")
    ax.set_title("byte-level GPT on Python's documentation")
    ax.legend()
    save(fig, path)


def print_samples(model, device, prompts=("The ", "def ", "class ")):
    model.eval()
    generator = torch.Generator(device=device).manual_seed(0)
    for prompt in prompts:
        ids = torch.tensor([list(prompt.encode())], device=device)
        out = model.generate(ids, 80, temperature=0.8, top_k=40, generator=generator)
        print(repr(bytes(out[0].tolist()).decode("utf-8", errors="replace")))


def main(argv=None):
    def parallel_flag(parser):
        parser.add_argument("--parallel", choices=("none", "ddp", "fsdp"),
                            default="ddp" if "WORLD_SIZE" in os.environ else "none")

    config, args = parse_config(TrainConfig, FAST, argv, description=__doc__.splitlines()[0],
                                out="build/train_gpt", extra=parallel_flag)
    return train(config, args.parallel, args.out)


if __name__ == "__main__":
    main()
