"""``fastseq.ops.linear`` / ``fastseq.nn.Linear``: the few-row C++ op against ``F.linear``."""

import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_within_rule

import fastseq
from fastseq.nn import Linear
from fastseq.ops.linear import FEW_ROWS, linear

needs_op = pytest.mark.skipif("cpu" not in fastseq.available_backends("cpu"),
                              reason="the C++ extension is not built")


def _within_rule(got, x, weight, bias):
    truth = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    assert_within_rule(got, truth, F.linear(x, weight, bias))


@needs_op
@pytest.mark.parametrize("rows", [0, 1, 3, 4, 5, 8, 16, 17, 40])
@pytest.mark.parametrize("features", [(0, 3), (1, 1), (7, 13), (33, 65), (256, 768)], ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_op_matches_f_linear(rows, features, bias):
    """Ragged widths (not multiples of the 16-lane vectors or the 4-column tiles), one row to past
    FEW_ROWS (where the op hands the product to oneDNN or ATen), and no rows at all."""
    k, n = features
    x, weight = torch.randn(2, rows, k), torch.randn(n, k)
    b = torch.randn(n) if bias else None
    got = torch.ops.fastseq.linear(x, weight, b)
    assert got.shape == (2, rows, n)
    _within_rule(got, x, weight, b)


@needs_op
def test_op_takes_strided_operands():
    x = torch.randn(5, 40)[:, ::2]  # a row stride of 40, a column stride of 2
    weight = torch.randn(24, 20).t().contiguous().t()  # W^T's rows contiguous (the broadcast form)
    _within_rule(torch.ops.fastseq.linear(x, weight, None), x, weight, None)
    weight, bias = torch.randn(30, 40)[:, 5:25], torch.randn(30)  # rows of W not adjacent
    _within_rule(torch.ops.fastseq.linear(x, weight, bias), x, weight, bias)


@needs_op
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_op_in_other_dtypes_runs_aten(dtype):
    x, weight, bias = (torch.randn(*shape, dtype=dtype) for shape in ((3, 9), (5, 9), (5,)))
    _within_rule(torch.ops.fastseq.linear(x, weight, bias), x, weight, bias)


@needs_op
def test_op_gradients_match_f_linear():
    x = torch.randn(3, 2, 11, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 11, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(torch.ops.fastseq.linear, (x, weight, bias))
    grads = torch.autograd.grad(torch.ops.fastseq.linear(x, weight, None).square().sum(), (x, weight))
    want = torch.autograd.grad(F.linear(x, weight).square().sum(), (x, weight))
    for got, expected in zip(grads, want, strict=True):
        torch.testing.assert_close(got, expected)


@needs_op
def test_linear_runs_the_op_only_where_it_is_meant_to(monkeypatch):
    """Inference on few float32 rows goes to the op; a product that needs a gradient, has many rows
    or another dtype goes to F.linear."""
    calls = []
    op = torch.ops.fastseq.linear
    monkeypatch.setattr(torch.ops.fastseq, "linear", lambda *a: calls.append(a) or op(*a))
    weight = torch.randn(8, 4, requires_grad=True)
    with torch.no_grad():
        linear(torch.randn(FEW_ROWS, 4), weight)
        assert len(calls) == 1
        linear(torch.randn(FEW_ROWS + 1, 4), weight)
        linear(torch.randn(2, 4, dtype=torch.float64), weight.double())
        with fastseq.use_backend("reference"):
            linear(torch.randn(2, 4), weight)
    linear(torch.randn(2, 4), weight)  # weight requires grad: F.linear's autograd
    assert len(calls) == 1


def test_module_is_a_drop_in_nn_linear():
    torch.manual_seed(0)
    theirs = torch.nn.Linear(10, 7)
    ours = Linear(10, 7)
    ours.load_state_dict(theirs.state_dict())
    assert isinstance(ours, torch.nn.Linear) and ours.state_dict().keys() == theirs.state_dict().keys()
    x = torch.randn(3, 10, requires_grad=True)
    with torch.no_grad():
        _within_rule(ours(x), x, theirs.weight, theirs.bias)
    ours(x).sum().backward()
    grad = x.grad.clone()
    x.grad = None
    theirs(x).sum().backward()
    torch.testing.assert_close(grad, x.grad)


@needs_op
def test_linear_compiles_with_fullgraph():
    x, weight, bias = torch.randn(2, 1, 24), torch.randn(40, 24), torch.randn(40)
    with torch.no_grad():
        got = torch.compile(linear, fullgraph=True, backend="aot_eager")(x, weight, bias)
    _within_rule(got, x, weight, bias)
