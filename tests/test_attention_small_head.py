"""The CPU kernel for small head dims (csrc/cpu/attention.cpp): keys in the vector lanes.

Checked directly (the ops, on every CPU) and through ``fastseq.ops.attention``'s CPU backend, which
sends unmasked float32 calls with a head dim of at most 8 to it on AVX-512 CPUs.
"""

import importlib
import os
import subprocess
import sys

import pytest
import torch
from tolerance import assert_within_rule

import fastseq
from fastseq import _extension

attention_ops = importlib.import_module("fastseq.ops.attention")  # fastseq.ops.attention: the function
BUILT = _extension.load() is not None and hasattr(torch.ops.fastseq, "attention_small_head_forward")
pytestmark = pytest.mark.skipif(not BUILT, reason="extension built without the small-head kernel")


def _reference(q, k, v, scale):
    """(out, lse) in the inputs' dtype, by the definition."""
    scores = (q @ k.transpose(-1, -2)) * scale
    return torch.softmax(scores, -1) @ v, torch.logsumexp(scores, -1)


def _inputs(batch, heads, lq, lk, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, dim, generator=g, dtype=torch.float64)
               for n in (lq, lk, lk))
    return q, k, v, torch.randn(batch, heads, lq, dim, generator=g, dtype=torch.float64)


def _grads(fn, q, k, v, grad_out):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lse = fn(*leaves)
    return [out, lse, *torch.autograd.grad(out, leaves, grad_out.to(out.dtype))]


# Key counts off the 16 lanes (1, 15, 17, 37) and on them (16, 64); head dims padded to 8 or 16
# (1, 3, 8, 13, 16); one query row; cross-attention (lq != lk).
SHAPES = [(2, 3, 5, 37, 8), (1, 2, 17, 16, 16), (2, 1, 1, 1, 3), (1, 1, 40, 15, 13),
          (1, 2, 9, 17, 1), (3, 2, 64, 64, 5)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_ops_within_tolerance_rule(shape):
    """Output, log-sum-exp and the three gradients against float64, within the tolerance rule
    with the definition computed in float32."""
    q, k, v, grad_out = _inputs(*shape)
    scale = shape[-1] ** -0.5
    truth = _grads(lambda *t: _reference(*t, scale), q, k, v, grad_out)
    low = _grads(lambda *t: _reference(*t, scale), q.float(), k.float(), v.float(), grad_out)
    out, lse = torch.ops.fastseq.attention_small_head_forward(q.float(), k.float(), v.float(), scale)
    grads = torch.ops.fastseq.attention_small_head_backward(
        grad_out.float(), q.float(), k.float(), v.float(), out, lse, scale)
    for name, got, t, lo in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), truth, low,
                                strict=True):
        assert_within_rule(got, t, lo.detach(), name)


def test_strided_heads_come_back_in_their_layout():
    """q, k, v as a projection's heads ((B, L, H, D) in memory, viewed (B, H, L, D)): read where
    they lie; out, dq, dk and dv come back in the same layout."""
    q, k, v, grad_out = (t.float().transpose(1, 2).contiguous().transpose(1, 2)
                         for t in _inputs(2, 4, 33, 33, 8))
    out, lse = torch.ops.fastseq.attention_small_head_forward(q, k, v, 0.3)
    dq, dk, dv = torch.ops.fastseq.attention_small_head_backward(grad_out, q, k, v, out, lse, 0.3)
    assert out.stride() == q.stride() and dq.stride() == q.stride() and dk.stride() == k.stride()
    want, want_lse = _reference(q.contiguous(), k.contiguous(), v.contiguous(), 0.3)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)


def test_empty_batch_and_no_keys():
    q, k, v, _ = (t.float() for t in _inputs(0, 2, 5, 7, 8))
    out, lse = torch.ops.fastseq.attention_small_head_forward(q, k, v, 1.0)
    assert out.shape == (0, 2, 5, 8) and lse.shape == (0, 2, 5)
    q, k, v, grad_out = (t.float() for t in _inputs(1, 2, 3, 0, 8))
    out, lse = torch.ops.fastseq.attention_small_head_forward(q, k, v, 1.0)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    grads = torch.ops.fastseq.attention_small_head_backward(grad_out, q, k, v, out, lse, 1.0)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_a_nan_key_makes_its_heads_rows_nan():
    """A NaN key gives every row of its head a NaN score, and torch's softmax NaN rows: clamping
    the exponents must not turn it into a weight of 0. The other heads are untouched."""
    q, k, v, _ = (t.float() for t in _inputs(1, 2, 4, 20, 8))
    k[0, 1, 5, 3] = float("nan")
    out, lse = torch.ops.fastseq.attention_small_head_forward(q, k, v, 0.5)
    assert torch.isnan(out[0, 1]).all() and torch.isnan(lse[0, 1]).all()
    assert torch.isfinite(out[0, 0]).all() and torch.isfinite(lse[0, 0]).all()


@pytest.mark.parametrize(
    ("args", "match"),
    [((torch.randn(2, 3, 4, 8).double(),) * 3, "float32"),
     ((torch.randn(2, 3, 4, 17),) * 3, r"head dim must be 1\.\.16"),
     ((torch.randn(2, 3, 4, 8), torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4, 8)), "q's B, H and D"),
     ((torch.randn(3, 4, 8),) * 3, r"\(B, H, L, D\)")],
)
def test_bad_inputs_raise_before_any_work(args, match):
    with pytest.raises(RuntimeError, match=f"attention_small_head: .*{match}"):
        torch.ops.fastseq.attention_small_head_forward(*args, 1.0)


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512",
                    reason="the routing takes the kernel on AVX-512 CPUs only")
def test_attention_routes_small_heads_here_and_matches_the_reference():
    """``fastseq.ops.attention`` on the CPU: unmasked float32 heads of dim <= 8 take the kernel
    (grouped-query heads and rotary tables included), masked or causal ones torch's kernel;
    both within the tolerance rule of the float64 reference."""
    assert attention_ops._takes_small_head_kernel(torch.empty(1, 1, 1, 8), torch.empty(1, 1, 1, 8),
                                                  False, None)
    assert not attention_ops._takes_small_head_kernel(torch.empty(1, 1, 1, 16),
                                                      torch.empty(1, 1, 1, 16), False, None)
    q, k, v, grad_out = _inputs(2, 4, 19, 23, 8)
    k, v = k[:, :2], v[:, :2]  # two query heads per key head
    g = torch.Generator().manual_seed(1)
    cos, sin = torch.rand(23, 4, generator=g), torch.rand(23, 4, generator=g)
    for kwargs in (dict(), dict(cos=cos, sin=sin), dict(causal=True)):
        truth = _grads(lambda *t, kw=kwargs: _attention(*t, "reference", **kw), q, k, v, grad_out)
        leaves = (q.float(), k.float(), v.float())
        got = _grads(lambda *t, kw=kwargs: _attention(*t, "cpu", **kw), *leaves, grad_out)
        low = _grads(lambda *t, kw=kwargs: _attention(*t, "reference", **kw), *leaves, grad_out)
        for name, g_, t, lo in zip(("out", "dq", "dk", "dv"), got[:1] + got[2:], truth[:1] + truth[2:],
                                   low[:1] + low[2:], strict=True):
            assert_within_rule(g_, t, lo, f"{name} {sorted(kwargs)}")


def _attention(q, k, v, backend, **kwargs):
    """fastseq.ops.attention on ``backend``, as (out, a dummy lse) for :func:`_grads`."""
    with fastseq.use_backend(backend):
        out = fastseq.ops.attention(q, k, v, **kwargs)
    return out, out.new_zeros(())


def test_scalar_code_under_the_avx2_level():
    """The portable code (what a CPU without AVX-512 runs), in a child process at ATen's AVX2
    level: against the definition in float64."""
    script = (
        "import torch, fastseq\n"
        "from fastseq import _extension\n"
        "_extension.load()\n"
        "torch.manual_seed(0)\n"
        "q, k, v, g = (torch.randn(2, 3, n, 5, dtype=torch.float64) for n in (7, 21, 21, 7))\n"
        "def ref(q, k, v):\n"
        "    s = q @ k.transpose(-1, -2) * 0.4\n"
        "    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)\n"
        "leaves = [t.requires_grad_() for t in (q, k, v)]\n"
        "out, lse = ref(*leaves)\n"
        "want = [out, lse, *torch.autograd.grad(out, leaves, g)]\n"
        "f = [t.detach().float() for t in (q, k, v)]\n"
        "o, l = torch.ops.fastseq.attention_small_head_forward(*f, 0.4)\n"
        "got = [o, l, *torch.ops.fastseq.attention_small_head_backward(g.float(), *f, o, l, 0.4)]\n"
        "for a, b in zip(got, want):\n"
        "    torch.testing.assert_close(a, b.float(), atol=2e-5, rtol=1e-5)\n"
    )
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", OMP_NUM_THREADS="1")
    child = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                           timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
