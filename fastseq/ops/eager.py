"""An op's autograd called directly in eager mode, without the dispatcher's custom-op layers.

A ``torch.library.custom_op`` with ``register_autograd`` is what ``torch.compile``, ``torch.export``
and ``opcheck`` see, and it is the op users find under ``torch.ops.fastseq``. In eager mode each
call of it also passes through the dispatcher's Python layers (argument defaults, the generated
autograd Function, the alias checks, then the same again for the gradient op), which costs more than
a whole small ``LSTMCell`` training step (benchmarks/results/cpu/dispatch.md).
:func:`autograd_function` builds a ``torch.autograd.Function`` from the op's own body,
``setup_context`` and backward, and :func:`call` runs it on plain tensors in plain eager mode, and
the registered op wherever anything else is at work: a graph being traced, dispatch modes (fake
tensors, ``make_fx``), tensor subclasses. torch.func's differentiating and batching transforms
(``grad``, ``vjp``, ``jacrev``, ``jvp``, ``vmap``), which refuse the registered op's autograd, get a
Function of their own (``for_transforms`` of :func:`autograd_function`, its gradient
:func:`differentiable_once`).
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
    take: ``op`` forward, ``setup_context``, and ``op_backward``, a backward that computes the
    gradients with :func:`differentiable_once` of the gradient op.
    """
    def forward_and_setup(ctx, *inputs):
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        return output

    def op_forward(*inputs):
        return op(*inputs)

    # The registered ops inside, so that under vmap their batching rules (the layers') see the
    # vmapped tensors whole and every backend plain tensors (the Function's vmap rule is generated).
    for_transforms = type(name + "ForTransforms", (torch.autograd.Function,), {
        "forward": staticmethod(op_forward),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(op_backward),
        "generate_vmap_rule": True,
    })
    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward_and_setup),
        "backward": staticmethod(backward),
        "body": staticmethod(forward),
        "for_transforms": for_transforms,
    })


def differentiable_once(grad_op: Callable) -> Callable:
    """``grad_op`` applied as a Function whose own backward raises: the gradient op of a layer
    under torch.func transforms. Whatever differentiates the gradient (``grad`` of ``grad``,
    ``jacrev`` of ``jacrev``, autograd of a ``torch.func.grad``) gets an error, where the op, which
    has no second derivative, would give silent zeros; a gradient used as data is free."""
    name = getattr(grad_op, "_qualname", str(grad_op))

    def forward(*args):
        return grad_op(*args)

    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise RuntimeError(f"{name}: differentiable once; a gradient of its gradient is not "
                           "supported (nested torch.func.grad, vjp, jacrev, or autograd through "
                           "a torch.func gradient)")

    return type("DifferentiableOnce", (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward),
        "generate_vmap_rule": True,
    }).apply


def one_call_per_member(op: Callable, n: int, in_dims, args):
    """A vmap rule's result for ``op`` called once per vmapped member: each argument selected
    along its vmapped dimension (and made contiguous, as the kernels take it), the outputs stacked
    along dimension 0. What vmap's batching fallback does, without its warning that a rule is
    missing."""
    members = [op(*(a if d is None else a.select(d, e).contiguous()
                    for a, d in zip(args, in_dims, strict=True)))
               for e in range(n)]
    outputs = tuple(torch.stack(parts) for parts in zip(*members, strict=True))
    return outputs, (0,) * len(outputs)


def _differentiating_transforms() -> bool:
    """Whether a torch.func transform that differentiates or batches (grad, vjp, jacrev, jvp,
    vmap) is active: those refuse the registered op's autograd. ``functionalize`` alone takes the
    registered op."""
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    functionalize = torch._C._functorch.TransformType.Functionalize
    return any(interpreter.key() != functionalize
               for interpreter in retrieve_all_functorch_interpreters())


def call(op, function: type[torch.autograd.Function], *inputs, differentiable: bool = True):
    """``function.apply(*inputs)`` in plain eager mode on plain tensors (``inputs[0]`` is the one
    looked at), ``function.for_transforms.apply(*inputs)`` under torch.func's differentiating and
    batching transforms, else ``op(*inputs)``: the same computation, gradients included.

    ``differentiable=False`` (no input needs a gradient, or grad mode is off) runs the op's body
    alone in plain eager mode, unless forward-mode AD is on (dual tensors need no grad): its
    outputs need no graph, and ``apply`` would cost a few microseconds more, a tenth of a one-step
    layer call.
    """
    if (type(inputs[0]) is not torch.Tensor or torch.compiler.is_compiling()
            or torch._C._len_torch_dispatch_stack() != 0):
        return op(*inputs)
    if torch._C._are_functorch_transforms_active():
        return (function.for_transforms.apply if _differentiating_transforms() else op)(*inputs)
    if differentiable or torch.autograd.forward_ad._current_level >= 0:
        return function.apply(*inputs)
    return function.body(*inputs)


def gradient(op, body):
    """The gradient for an eager Function's backward: ``body`` (the gradient op's body), or the
    op itself while grad mode is on. That is a double backward (``create_graph=True``), which the
    op refuses, having no autograd formula, where its body would give silently wrong zeros."""
    def grad(*args):
        return (op if torch.is_grad_enabled() else body)(*args)

    return grad
