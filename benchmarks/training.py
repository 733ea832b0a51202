"""What the model suites share: one optimizer step of a model as a benchmark variant."""

from __future__ import annotations

import torch


def train_step(model, loss_of):
    """A callable running one AdamW step of ``model`` on ``loss_of(model)`` (forward, loss,
    backward, update): the training-step variant of a model suite."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        loss = loss_of(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step
