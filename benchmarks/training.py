"""What several suites share: one optimizer step of a model, and a forward or forward + backward
pass of a module, as benchmark variants."""

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


def timed_pass(run, pass_: str, x, module):
    """A callable timing ``run(x)``: under ``no_grad`` for ``pass_ == "fwd"``, else with the backward
    of its output(s) to ``x`` and every parameter of ``module`` (the same random output gradients
    every call)."""
    if pass_ == "fwd":
        def forward():
            with torch.no_grad():
                return run(x)
        return forward
    grad = None
    wanted = [x, *module.parameters()]

    def step():
        nonlocal grad
        out = run(x)
        out = out if isinstance(out, tuple) else (out,)
        grad = [torch.randn_like(t) for t in out] if grad is None else grad
        return torch.autograd.grad(out, wanted, grad)

    return step
