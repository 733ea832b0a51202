"""Every public op on every backend and dtype against its reference, from the tables of
``tests/op_samples.py``: outputs and gradients under the tolerance rule, every registered op a
sample reaches under ``torch.library.opcheck``, and every bad input refused by name."""

import warnings

import pytest
import torch
from op_samples import OPS, OpInfo, Sample
from tolerance import assert_within_rule
from torch.utils._python_dispatch import TorchDispatchMode

import fastseq

INTERPRETED = not torch.cuda.is_available()


def _cases(with_backend=True, only_dtype=None):
    for op in OPS:
        for sample in op.samples:
            for dtype in (only_dtype,) if only_dtype else op.dtypes:
                for backend in op.backends if with_backend else (None,):
                    name = f"{op.name}-{sample.name}-{str(dtype)[6:]}"
                    yield pytest.param(op, sample, dtype, backend,
                                       id=name + (f"-{backend}" if backend else ""))


def _tensors(result):
    """The tensors of an op's result (a tensor, or a tuple with None in it)."""
    if isinstance(result, torch.Tensor):
        return [result]
    return [t for t in result if isinstance(t, torch.Tensor)]


def _cast(value, dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().to(dtype)
    return value


def _run(op: OpInfo, function, args, kwargs, weights=None):
    """Outputs of ``function`` and, when ``weights`` are given, the gradients of
    ``sum(out * weight)`` with respect to the differentiable arguments (None for absent ones)."""
    args = [a.detach().clone().requires_grad_(i in op.differentiable)
            if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for i, a in enumerate(args)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a backend that cannot take a dtype says so once
        outputs = _tensors(function(*args, **kwargs))
    grads = []
    leaves = [args[i] for i in op.differentiable if isinstance(args[i], torch.Tensor)]
    if weights is not None and leaves and any(o.requires_grad for o in outputs):
        loss = sum((o.double() * w).sum() for o, w in zip(outputs, weights, strict=True))
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        grads = [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves,
                                                                            strict=True)]
    return outputs, grads


@pytest.mark.parametrize("op,sample,dtype,backend", list(_cases()))
def test_sample_matches_reference(op: OpInfo, sample: Sample, dtype, backend):
    torch.manual_seed(0)
    args, kwargs = sample.make(dtype)
    truth_args = [_cast(a, torch.float64) for a in args]
    truth_kwargs = {k: _cast(v, torch.float64) for k, v in kwargs.items()}
    truth, _ = _run(op, op.reference, truth_args, truth_kwargs)
    weights = [torch.randn(t.shape, dtype=torch.float64) for t in truth]
    truth, truth_grads = _run(op, op.reference, truth_args, truth_kwargs, weights)
    low, low_grads = _run(op, op.reference, args, kwargs, weights)
    with fastseq.use_backend(backend):
        got, got_grads = _run(op, op.function, args, kwargs, weights)
    # The Triton interpreter rounds float32 -> bfloat16 by truncation, twice the error of
    # round-to-nearest; gradients that sum over steps or rows also differ in summation order.
    scale = 2.0 if backend == "triton" and dtype == torch.bfloat16 and INTERPRETED else 1.0
    assert len(got) == len(truth)
    for i, (out, exact, ref) in enumerate(zip(got, truth, low, strict=True)):
        assert_within_rule(out, exact, ref, name=f"output {i}", factor=2.0 * scale)
    for i, (grad, exact, ref) in enumerate(zip(got_grads, truth_grads, low_grads, strict=True)):
        assert torch.isfinite(grad).all(), f"gradient {i} is not finite"
        assert_within_rule(grad, exact, ref, name=f"gradient {i}", factor=3.0 * scale)


class _RecordOps(TorchDispatchMode):
    """Records every call of a ``torch.ops.fastseq`` op (and runs it)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fastseq":
            self.calls.append((func, args, kwargs or {}))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("op,sample,dtype,backend",
                         list(_cases(with_backend=False, only_dtype=torch.float32)))
def test_every_registered_op_a_sample_reaches_passes_opcheck(op, sample, dtype, backend):
    """Schema, fake kernel (shapes and strides), autograd registration and AOT dispatch of each
    ``torch.ops.fastseq`` op the public function calls for this sample (float32: the other
    dtypes take the same registrations)."""
    torch.manual_seed(0)
    args, kwargs = sample.make(dtype)
    args = [a.requires_grad_(i in op.differentiable) if isinstance(a, torch.Tensor)
            and a.is_floating_point() else a for i, a in enumerate(args)]
    recorder = _RecordOps()
    with recorder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outputs = _tensors(op.function(*args, **kwargs))
    if any(o.requires_grad for o in outputs):
        with recorder:
            sum(o.sum() for o in outputs).backward()
    assert recorder.calls, f"{op.name} reached no registered op"
    seen = set()
    for func, call_args, call_kwargs in recorder.calls:
        if func in seen or func.name().endswith("_"):  # in-place ops are checked in test_rotary
            continue
        seen.add(func)
        if func.name().endswith(("_backward", "_grad")):  # gradient ops have no gradient
            call_args = [a.detach() if isinstance(a, torch.Tensor) else a for a in call_args]
        torch.library.opcheck(func, call_args, call_kwargs)


@pytest.mark.parametrize("op,bad", [pytest.param(op, bad, id=f"{op.name}-{bad.name}")
                                    for op in OPS for bad in op.bad])
def test_bad_input_is_refused_by_name(op, bad):
    args, kwargs = bad.make()
    with pytest.raises(ValueError, match=bad.match):
        op.function(*args, **kwargs)
