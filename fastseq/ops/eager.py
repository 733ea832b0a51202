"""An op's autograd called directly in eager mode, without the dispatcher's custom-op layers.

A ``torch.library.custom_op`` with ``register_autograd`` is what ``torch.compile``, ``torch.export``
and ``opcheck`` see, and it is the op users find under ``torch.ops.fastseq``. In eager mode each
call of it also passes through the dispatcher's Python layers (argument defaults, the generated
autograd Function, the alias checks, then the same again for the gradient op): about 0.1 ms per
forward and backward on the CPU, more than a whole ``LSTMCell`` training step of batch 8 and
hidden 128 costs in ``torch.nn.LSTMCell``. :func:`autograd_function` builds a
``torch.autograd.Function`` from the op's own body, ``setup_context`` and backward, and
:func:`call` runs it on plain tensors in plain eager mode, and the registered op wherever
anything else is at work: a graph being traced, functorch transforms (``vmap``), dispatch modes
(fake tensors, ``make_fx``), tensor subclasses.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def autograd_function(name: str, forward: Callable, setup_context: Callable,
                      backward: Callable) -> type[torch.autograd.Function]:
    """A ``torch.autograd.Function`` named ``name`` that runs ``forward(*inputs)`` (the op's
    body) and ``setup_context(ctx, inputs, output)``, and ``backward(ctx, *grads)``: the pieces
    given to ``register_autograd``.

    Its forward takes ``ctx`` and calls ``setup_context`` itself: a separate ``setup_context``
    staticmethod would make ``apply`` bind the arguments to a signature on every call.
    """
    def forward_and_setup(ctx, *inputs):
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        return output

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward_and_setup),
        "backward": staticmethod(backward),
        "body": staticmethod(forward),
    })


def call(op, function: type[torch.autograd.Function], *inputs, differentiable: bool = True):
    """``function.apply(*inputs)`` in plain eager mode on plain tensors (``inputs[0]`` is the one
    looked at), else ``op(*inputs)``: the same computation, gradients included.

    ``differentiable=False`` (no input needs a gradient, or grad mode is off) runs the op's body
    alone in plain eager mode: its outputs need no graph, and ``apply`` would cost a few
    microseconds more, a tenth of a one-step layer call.
    """
    plain = (type(inputs[0]) is torch.Tensor and not torch.compiler.is_compiling()
             and not torch._C._are_functorch_transforms_active()
             and torch._C._len_torch_dispatch_stack() == 0)
    if not plain:
        return op(*inputs)
    return function.apply(*inputs) if differentiable else function.body(*inputs)


def gradient(op, body):
    """The gradient for an eager Function's backward: ``body`` (the gradient op's body), or the
    op itself while grad mode is on. That is a double backward (``create_graph=True``), which the
    op refuses, having no autograd formula, where its body would give silently wrong zeros."""
    def grad(*args):
        return (op if torch.is_grad_enabled() else body)(*args)

    return grad
