"""An op's autograd called directly in eager mode, without the dispatcher's custom-op layers.

A ``torch.library.custom_op`` with ``register_autograd`` is what ``torch.compile``, ``torch.export``
and ``opcheck`` see, and it is the op users find under ``torch.ops.fastseq``. In eager mode each
call of it also passes through the dispatcher's Python layers (argument defaults, the generated
autograd Function, the alias checks, then the same again for the gradient op): about 0.1 ms per
forward and backward on the CPU, more than a whole ``LSTMCell`` training step of batch 8 and
hidden 128 costs in ``torch.nn.LSTMCell``. :func:`autograd_function` builds a
``torch.autograd.Function`` from the op's own body, ``setup_context`` and backward, and
:func:`call` runs it on plain tensors in plain eager mode, and the registered op wherever
anything else is at work: a graph being traced, dispatch modes (fake tensors, ``make_fx``),
tensor subclasses. torch.func transforms (``grad``, ``vjp``, ``jacrev``, ``vmap``), which refuse
the registered op's autograd, get a Function of their own (:func:`transformable_function`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def autograd_function(name: str, forward: Callable, setup_context: Callable, backward: Callable,
                      op: Callable, op_backward: Callable) -> type[torch.autograd.Function]:
    """A ``torch.autograd.Function`` named ``name`` that runs ``forward(*inputs)`` (the op's
    body) and ``setup_context(ctx, inputs, output)``, and ``backward(ctx, *grads)``: the pieces
    given to ``register_autograd``.

    Its forward takes ``ctx`` and calls ``setup_context`` itself: a separate ``setup_context``
    staticmethod would make ``apply`` bind the arguments to a signature on every call. It carries
    ``body`` (``forward`` alone) and ``for_transforms``, the Function that torch.func transforms
    take (:func:`transformable_function` of ``op``, ``setup_context`` and ``op_backward``, the
    backward written with the gradient op).
    """
    def forward_and_setup(ctx, *inputs):
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        return output

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward_and_setup),
        "backward": staticmethod(backward),
        "body": staticmethod(forward),
        "for_transforms": transformable_function(name + "ForTransforms", op, setup_context,
                                                 op_backward),
    })


def transformable_function(name: str, op: Callable, setup_context: Callable,
                           op_backward: Callable) -> type[torch.autograd.Function]:
    """A ``torch.autograd.Function`` for ``torch.func`` transforms (``grad``, ``vjp``, ``jacrev``,
    ``vmap`` and their compositions, such as per-sample gradients), which refuse the op's own
    autograd (torch.library's generated Function has no ``setup_context``).

    Forward and backward call the registered ops, so that under ``vmap`` the dispatcher's
    batching fallback gives every backend plain tensors, one example at a time (the vmap rule is
    generated). The backward is differentiable once: under a second gradient transform (``grad``
    of ``grad``, ``jacrev`` of ``grad``) it raises, where its ops would give silent zeros.
    """
    def op_forward(*inputs):
        return op(*inputs)

    def backward_once(ctx, *grads):
        if _gradient_transforms() > 1:
            raise RuntimeError(f"{getattr(op, '_qualname', op)}: differentiable once; a "
                               "gradient of its gradient (nested "
                               "torch.func.grad, vjp or jacrev) is not supported")
        with torch.no_grad():  # the gradient op runs without autograd, as in a backward
            return op_backward(ctx, *grads)

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(op_forward),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward_once),
        "generate_vmap_rule": True,
    })


def _gradient_transforms() -> int:
    """How many torch.func gradient transforms (``grad``, ``vjp``, ``jacrev``) are active."""
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    grad = torch._C._functorch.TransformType.Grad
    return sum(interpreter.key() == grad for interpreter in retrieve_all_functorch_interpreters())


def call(op, function: type[torch.autograd.Function], *inputs, differentiable: bool = True):
    """``function.apply(*inputs)`` in plain eager mode on plain tensors (``inputs[0]`` is the one
    looked at), else ``op(*inputs)``: the same computation, gradients included.

    ``differentiable=False`` (no input needs a gradient, or grad mode is off) runs the op's body
    alone in plain eager mode: its outputs need no graph, and ``apply`` would cost a few
    microseconds more, a tenth of a one-step layer call.
    """
    if (type(inputs[0]) is not torch.Tensor or torch.compiler.is_compiling()
            or torch._C._len_torch_dispatch_stack() != 0):
        return op(*inputs)
    if torch._C._are_functorch_transforms_active():
        return function.for_transforms.apply(*inputs)
    return function.apply(*inputs) if differentiable else function.body(*inputs)


def gradient(op, body):
    """The gradient for an eager Function's backward: ``body`` (the gradient op's body), or the
    op itself while grad mode is on. That is a double backward (``create_graph=True``), which the
    op refuses, having no autograd formula, where its body would give silently wrong zeros."""
    def grad(*args):
        return (op if torch.is_grad_enabled() else body)(*args)

    return grad
