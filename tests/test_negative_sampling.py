"""The fused negative-sampling loss against its plain-PyTorch reference: loss and the gradients of
both weight tables (sparse and dense), skip-gram and CBOW inputs, repeated ids, the edges and bad
input."""

import pytest
import torch
from tolerance import assert_within_rule

import fastseq
from fastseq.ops.negative_sampling import negative_sampling_loss
from fastseq.reference.negative_sampling import negative_sampling_loss as reference


def _case(vocab, dim, batch, words, targets, seed=0):
    """float64 weights (V, D) and ids: inputs (B, W), targets (B, N)."""
    generator = torch.Generator().manual_seed(seed)
    in_weight = torch.randn(vocab, dim, generator=generator, dtype=torch.float64) * 0.5
    out_weight = torch.randn(vocab, dim, generator=generator, dtype=torch.float64) * 0.5
    inputs = torch.randint(0, vocab, (batch, words), generator=generator)
    ids = torch.randint(0, vocab, (batch, targets), generator=generator)
    return in_weight, out_weight, inputs, ids


def _loss_and_grads(fn, in_weight, out_weight, inputs, targets, dtype, sparse):
    a = in_weight.to(dtype).requires_grad_()
    b = out_weight.to(dtype).requires_grad_()
    loss = fn(a, b, inputs, targets, sparse)
    weights = torch.linspace(-1, 2, loss.numel(), dtype=dtype).view_as(loss)
    grads = torch.autograd.grad((loss * weights).sum(), (a, b)) if loss.numel() else (torch.zeros_like(a),
                                                                                       torch.zeros_like(b))
    return loss.detach(), *(g.to_dense() for g in grads)


def _fused(a, b, inputs, targets, sparse):
    return negative_sampling_loss(a, b, inputs, targets, sparse=sparse, reduction="none")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("shape", [(50, 16, 9, 1, 6), (30, 37, 13, 4, 3), (7, 5, 1, 1, 1),
                                   (200, 100, 33, 10, 11)],
                         ids=["skipgram", "cbow_ragged_dim", "one_example_no_negatives", "cbow_wide"])
def test_loss_and_gradients_match_reference(dtype, sparse, shape):
    case = _case(*shape)
    truth = _loss_and_grads(reference, *case, torch.float64, sparse)
    low = _loss_and_grads(reference, *case, dtype, sparse)
    got = _loss_and_grads(_fused, *case, dtype, sparse)
    for name, g, t, lo in zip(("loss", "in_weight grad", "out_weight grad"), got, truth, low, strict=True):
        assert_within_rule(g, t, lo, name)


def test_gradients_are_sparse_or_dense_as_asked():
    a, b, inputs, targets = _case(40, 8, 5, 1, 4)
    a.requires_grad_(), b.requires_grad_()
    negative_sampling_loss(a, b, inputs, targets).backward()
    assert a.grad.layout == torch.sparse_coo and b.grad.layout == torch.sparse_coo
    assert a.grad._nnz() == 5 and b.grad._nnz() == 20  # one row per id, as nn.Embedding(sparse=True)
    a.grad = b.grad = None
    negative_sampling_loss(a, b, inputs, targets, sparse=False).backward()
    assert a.grad.layout == torch.strided and b.grad.layout == torch.strided


def test_repeated_ids_accumulate():
    """The same word as input, target and negative of one example, and in several examples."""
    a, b, _, _ = _case(6, 8, 1, 1, 1)
    inputs = torch.tensor([[2], [2], [3]])
    targets = torch.tensor([[2, 2, 3], [4, 2, 2], [3, 3, 3]])
    truth = _loss_and_grads(reference, a, b, inputs, targets, torch.float64, True)
    got = _loss_and_grads(_fused, a, b, inputs, targets, torch.float64, True)
    for g, t in zip(got, truth, strict=True):
        torch.testing.assert_close(g, t)


def test_reductions_and_empty_batch():
    a, b, inputs, targets = _case(20, 8, 6, 1, 3)
    losses = negative_sampling_loss(a, b, inputs, targets, reduction="none")
    torch.testing.assert_close(negative_sampling_loss(a, b, inputs, targets), losses.mean())
    torch.testing.assert_close(negative_sampling_loss(a, b, inputs, targets, reduction="sum"), losses.sum())
    empty = negative_sampling_loss(a, b, inputs[:0], targets[:0], reduction="none")
    assert empty.shape == (0,)
    assert negative_sampling_loss(a, b, inputs[:0], targets[:0], reduction="sum").item() == 0.0


def test_reference_backend_and_kernel_agree():
    a, b, inputs, targets = _case(30, 12, 8, 2, 5)
    with fastseq.use_backend("reference"):
        want = negative_sampling_loss(a, b, inputs, targets, reduction="none")
    torch.testing.assert_close(negative_sampling_loss(a, b, inputs, targets, reduction="none"), want)


def test_int32_ids_and_large_scores_stay_finite():
    a, b, inputs, targets = _case(20, 8, 4, 1, 3)
    loss = negative_sampling_loss(a * 100, b * 100, inputs.int(), targets.int(), reduction="none")
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss, reference(a * 100, b * 100, inputs, targets))


def test_bad_input_is_refused_by_name():
    a, b, inputs, targets = _case(20, 8, 4, 1, 3)
    a, b = a.float(), b.float()
    cases = [
        ((a[0], b, inputs, targets), r"in_weight must be a floating-point \(V, D\) tensor"),
        ((a, b[:, :4], inputs, targets), "out_weight must match in_weight's width 8"),
        ((a, b.double(), inputs, targets), "out_weight must match in_weight's width 8, dtype torch.float32"),
        ((a, b, inputs[:, 0], targets), r"inputs must be a \(B, W\) int64 or int32 tensor"),
        ((a, b, inputs.float(), targets), r"inputs must be a \(B, W\) int64 or int32 tensor"),
        ((a, b, inputs + 20, targets), r"inputs must lie in \[0, 20\)"),
        ((a, b, inputs, targets - 30), r"targets must lie in \[0, 20\)"),
        ((a, b, inputs[:3], targets), "the same number of examples, got 3 and 4"),
        ((a, b, inputs, targets[:, :0]), "targets must hold at least one id per example"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            negative_sampling_loss(*args)
    with pytest.raises(ValueError, match="reduction must be one of"):
        negative_sampling_loss(a, b, inputs, targets, reduction="max")
