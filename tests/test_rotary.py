"""Rotary embeddings: every backend against the plain-PyTorch reference, forward and backward."""

import warnings

import pytest
import torch
from tolerance import assert_within_rule

import fastseq
from fastseq import _backend
from fastseq.reference import rotary as ref

KERNEL_BACKENDS = [b for b in ("triton", "cpu") if b in fastseq.available_backends("cpu")]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (B, N, Hq, Hk, D, R): GQA with ragged sizes, partial rotary with a pass-through tail,
# a single token with no k, a tiny rotary dim.
SHAPES = [
    (2, 7, 3, 1, 24, 24),
    (1, 13, 2, 2, 40, 16),
    (3, 1, 5, 0, 6, 4),
    (2, 5, 1, 3, 10, 2),
]
TABLE_LEN = 32


def _tables(rotary_dim, batch=None):
    angles = torch.rand(TABLE_LEN, rotary_dim // 2, dtype=torch.float64) * 6.3
    if batch is not None:
        angles = angles + torch.rand(batch, 1, 1, dtype=torch.float64)
    return angles.cos(), angles.sin()


def _positions(mode, batch, seqlen):
    if mode == "offset":
        return 3
    if mode == "per_batch":
        return torch.randint(0, TABLE_LEN - seqlen + 1, (batch,))
    if mode == "ids":
        return torch.randint(0, TABLE_LEN, (batch, seqlen))
    return None


def _make(shape, dtype, layout, requires_grad=False):
    batch, seqlen, hq, hk, dim, _ = shape

    def one(heads):
        if heads == 0:
            return None
        x = torch.randn(batch, seqlen, heads, dim, dtype=torch.float64)
        if layout == "bhnd":
            x = x.transpose(1, 2).contiguous()
        return x.to(dtype).requires_grad_(requires_grad)

    return one(hq), one(hk)


def _reference(q, k, cos, sin, positions, interleaved, layout, compute_dtype=None):
    """Reference rotation of q and k through the canonical `rotate`, in `compute_dtype`."""
    to_bnhd = (lambda t: t) if layout == "bnhd" else (lambda t: t.transpose(1, 2))
    cos3, sin3 = cos.to(compute_dtype or cos.dtype)[None], sin.to(compute_dtype or sin.dtype)[None]
    offset, pos = (positions, None) if isinstance(positions, int) or positions is None else (0, positions)
    out = []
    for x in (q, k):
        if x is None:
            out.append(None)
            continue
        r = ref.rotate(to_bnhd(x), cos3, sin3, pos, offset or 0, 2 * cos.shape[-1], interleaved,
                       compute_dtype=compute_dtype)
        out.append(to_bnhd(r))
    return out


@pytest.fixture
def strict_warnings():
    """Fail on any fallback warning: a forced backend must really run."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
@pytest.mark.parametrize("layout", ["bnhd", "bhnd"])
@pytest.mark.parametrize("pos_mode", ["none", "offset", "per_batch", "ids"])
def test_forward_backward_match_reference(backend, dtype, shape, interleaved, layout, pos_mode,
                                          strict_warnings):
    q, k = _make(shape, dtype, layout, requires_grad=True)
    cos, sin = _tables(shape[5])
    positions = _positions(pos_mode, shape[0], shape[1])
    with fastseq.use_backend(backend):
        q_out, k_out = fastseq.apply_rotary(q, k, cos.float(), sin.float(), positions=positions,
                                            interleaved=interleaved, layout=layout)
    q64, k64 = (None if x is None else x.detach().double().requires_grad_() for x in (q, k))
    truth = _reference(q64, k64, cos, sin, positions, interleaved, layout)
    low = _reference(q, k, cos, sin, positions, interleaved, layout, compute_dtype=dtype)
    outs = [(q_out, truth[0], low[0], q, q64, "q")]
    if k is not None:
        outs.append((k_out, truth[1], low[1], k, k64, "k"))
    for out, t, lo, _, _, name in outs:
        assert out.stride() == (q if name == "q" else k).stride(), "output must keep the input layout"
        assert_within_rule(out, t, lo, name)

    grads = [torch.randn_like(o) for o, *_ in outs]
    got = torch.autograd.grad([o for o, *_ in outs], [x for *_, x, _, _ in outs], grads)
    want = torch.autograd.grad([t for _, t, *_ in outs], [x for *_, x, _ in outs],
                               [g.double() for g in grads])
    low_grads = torch.autograd.grad([lo for _, _, lo, *_ in outs], [x for *_, x, _, _ in outs],
                                    grads)
    for g, w, lo, (*_, name) in zip(got, want, low_grads, outs, strict=True):
        assert_within_rule(g, w, lo, f"grad {name}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
def test_per_batch_tables_and_conjugate_inverts(backend, interleaved, strict_warnings):
    batch, seqlen, dim = 3, 9, 20
    q = torch.randn(batch, seqlen, 4, dim)
    k = torch.randn(batch, seqlen, 2, dim)
    cos, sin = (t.float() for t in _tables(dim, batch=batch))
    with fastseq.use_backend(backend):
        q_out, k_out = fastseq.apply_rotary(q, k, cos, sin, positions=torch.tensor([0, 4, 20]),
                                            interleaved=interleaved)
        back = fastseq.ops.rotary.rotary(q_out, k_out, cos, sin, torch.tensor([0, 4, 20]), 0, dim,
                                         interleaved, True)
    want_q, want_k = ref.apply_rotary(q, k, cos, sin, positions=torch.tensor([0, 4, 20]),
                                      interleaved=interleaved)
    torch.testing.assert_close(q_out, want_q)
    torch.testing.assert_close(k_out, want_k)
    torch.testing.assert_close(back[0], q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(back[1], k, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inplace_on_strided_views_touches_only_rotary_columns(backend, dtype, strict_warnings):
    # q and k are views into one packed qkv buffer: no contiguous copy may be made.
    batch, seqlen, heads, dim, rotary_dim = 2, 11, 3, 16, 8
    qkv = torch.randn(batch, seqlen, 3, heads, dim).to(dtype)
    before = qkv.clone()
    q, k = qkv[:, :, 0], qkv[:, :, 1]
    cos, sin = (t.float() for t in _tables(rotary_dim))
    with fastseq.use_backend(backend):
        q_out, k_out = fastseq.apply_rotary(q, k, cos, sin, positions=5, inplace=True)
    assert q_out is q and k_out is k
    want_q, want_k = ref.apply_rotary(before[:, :, 0], before[:, :, 1], cos, sin, positions=5)
    torch.testing.assert_close(qkv[:, :, 0], want_q, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(qkv[:, :, 1], want_k, atol=1e-2, rtol=1e-2)
    assert torch.equal(qkv[:, :, 2], before[:, :, 2]), "v must be untouched"
    assert torch.equal(qkv[..., rotary_dim:], before[..., rotary_dim:]), "tail must pass through"


def test_inplace_backward_matches_out_of_place():
    q = torch.randn(2, 6, 3, 8, requires_grad=True)
    k = torch.randn(2, 6, 1, 8, requires_grad=True)
    cos, sin = (t.float() for t in _tables(8))
    grad = torch.randn(2, 6, 3, 8)
    out, _ = fastseq.apply_rotary(q * 1, k * 1, cos, sin, inplace=True)
    (out * grad).sum().backward()
    inplace_grad = q.grad.clone()
    q.grad = None
    out, _ = fastseq.apply_rotary(q, k, cos, sin)
    (out * grad).sum().backward()
    torch.testing.assert_close(inplace_grad, q.grad)


@pytest.mark.parametrize("views", ["bhnd_layout", "split_from_qkv"])
def test_inplace_training_on_views(views):
    """In-place rotation of views (a transposed layout, or q and k cut from one qkv tensor)
    under autograd: gradients as out of place."""
    cos, sin = (t.float() for t in _tables(8))
    x = torch.randn(2, 6, 4, 8, requires_grad=True)

    def run(inplace):
        if views == "bhnd_layout":
            h = (x * 1).transpose(1, 2)  # (B, H, N, D) view
            q, k = fastseq.apply_rotary(h[:, :3], h[:, 3:], cos, sin, layout="bhnd",
                                        inplace=inplace)
        else:
            qkv = x * 1
            q, k = fastseq.apply_rotary(qkv[:, :, :3], qkv[:, :, 3:], cos, sin, inplace=inplace)
        loss = (q * torch.linspace(-1, 1, 8)).sum() + k.square().sum()
        return loss, torch.autograd.grad(loss, x)[0]

    (loss, grad), (want_loss, want_grad) = run(True), run(False)
    torch.testing.assert_close(loss, want_loss)
    torch.testing.assert_close(grad, want_grad)


def test_inplace_under_compile_without_grad():
    cos, sin = (t.float() for t in _tables(8))
    compiled = torch.compile(lambda q, k: fastseq.apply_rotary(q, k, cos, sin, inplace=True),
                             fullgraph=True, backend="aot_eager")
    q, k = torch.randn(2, 5, 3, 8), torch.randn(2, 5, 1, 8)
    want = ref.apply_rotary(q, k, cos, sin)
    got = compiled(q.clone(), k.clone())
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_inplace_on_leaf_requiring_grad_is_refused():
    q = torch.randn(1, 4, 2, 8, requires_grad=True)
    cos, sin = (t.float() for t in _tables(8))
    with pytest.raises(RuntimeError, match="in-place"):
        fastseq.apply_rotary(q, None, cos, sin, inplace=True)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
def test_hf_apply_rotary_pos_emb_drop_in(backend, dtype, unsqueeze_dim, strict_warnings):
    from transformers.models.llama import modeling_llama

    batch, heads, kv_heads, seqlen, dim = 2, 4, 2, 9, 32
    config = modeling_llama.LlamaConfig(hidden_size=heads * dim, num_attention_heads=heads,
                                        num_key_value_heads=kv_heads, max_position_embeddings=64)
    hf_rope = modeling_llama.LlamaRotaryEmbedding(config)
    q = torch.randn(batch, heads, seqlen, dim, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, seqlen, dim, dtype=torch.float64)
    if unsqueeze_dim == 2:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    position_ids = torch.randint(0, 64, (batch, seqlen))
    cos, sin = hf_rope(q.to(dtype), position_ids)  # (B, N, D) in q's dtype, as Llama uses them
    truth = modeling_llama.apply_rotary_pos_emb(q, k, cos.double(), sin.double(),
                                                unsqueeze_dim=unsqueeze_dim)
    low = modeling_llama.apply_rotary_pos_emb(q.to(dtype), k.to(dtype), cos, sin,
                                              unsqueeze_dim=unsqueeze_dim)
    with fastseq.use_backend(backend):
        got = fastseq.apply_rotary_pos_emb(q.to(dtype), k.to(dtype), cos, sin, position_ids,
                                           unsqueeze_dim)
    for g, t, lo, name in zip(got, truth, low, "qk", strict=True):
        assert g.dtype == lo.dtype, name
        assert_within_rule(g, t, lo, name)


@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16], ids=str)
def test_hf_promotes_low_precision_q_with_float32_tables(low, strict_warnings):
    from transformers.models.llama import modeling_llama

    q, k = torch.randn(2, 4, 9, 16, dtype=low), torch.randn(2, 2, 9, 16, dtype=low)
    cos, sin = torch.randn(2, 9, 16), torch.randn(2, 9, 16)
    want = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    truth = modeling_llama.apply_rotary_pos_emb(q.double(), k.double(), cos.double(), sin.double())
    got = fastseq.apply_rotary_pos_emb(q, k, cos, sin)
    for g, w, t, name in zip(got, want, truth, "qk", strict=True):
        assert g.dtype == w.dtype == torch.float32, name
        assert_within_rule(g, t, w, name)


def test_hf_2d_tables_broadcast_across_heads():
    """transformers unsqueezes a 2-D (H, D) table at dim 1: its rows line up with the heads."""
    from transformers.models.llama import modeling_llama

    heads, dim = 3, 8
    q, k = torch.randn(2, heads, 5, dim), torch.randn(2, heads, 5, dim)
    cos, sin = torch.randn(heads, dim), torch.randn(heads, dim)
    want = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    with pytest.warns(UserWarning, match="plain-PyTorch path"):
        got = fastseq.apply_rotary_pos_emb(q, k, cos, sin)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_hf_position_ids_is_unused_and_an_int_is_unsqueeze_dim(strict_warnings):
    """transformers 4.x takes position_ids and ignores it; 5.x's fifth argument is unsqueeze_dim."""
    q, k = torch.randn(2, 7, 3, 8), torch.randn(2, 7, 1, 8)
    cos, sin = torch.randn(2, 7, 8), torch.randn(2, 7, 8)
    want = ref.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
    for got in (fastseq.apply_rotary_pos_emb(q, k, cos, sin, 2),
                fastseq.apply_rotary_pos_emb(q, k, cos, sin, torch.arange(7)[None], 2)):
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rotary_dim", [8, 12])
def test_training_step_with_a_summed_loss(backend, dtype, rotary_dim, strict_warnings):
    """``loss = out.sum()`` sends an expanded, stride-0 gradient back through the rotation (the
    CPU kernel gathers such heads first); the gradients accumulate into ``.grad``."""
    cos, sin = (t.float() for t in _tables(rotary_dim))
    q = torch.randn(2, 3, 7, 12, dtype=dtype, requires_grad=True)  # (B, H, N, D)
    k = torch.randn(2, 1, 7, 12, dtype=dtype, requires_grad=True)
    weights = torch.randn(12, dtype=dtype)
    with fastseq.use_backend(backend):
        for _ in range(2):
            q_out, k_out = fastseq.apply_rotary(q, k, cos, sin, layout="bhnd")
            (q_out.sum() + (k_out * weights).sum()).backward()
    qr, kr = (x.detach().double().requires_grad_() for x in (q, k))
    q_ref, k_ref = ref.apply_rotary(qr, kr, cos.double(), sin.double(), layout="bhnd")
    (q_ref.sum() + (k_ref * weights.double()).sum()).backward()
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    torch.testing.assert_close(q.grad.double(), 2 * qr.grad, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(k.grad.double(), 2 * kr.grad, atol=tolerance, rtol=tolerance)


def test_empty_batch_and_zero_heads():
    cos, sin = (t.float() for t in _tables(8))
    q = torch.randn(0, 5, 2, 8, requires_grad=True)
    q_out, k_out = fastseq.apply_rotary(q, None, cos, sin)
    assert q_out.shape == q.shape and k_out is None
    q_out.sum().backward()
    assert q.grad.shape == q.shape


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_k_tail_is_copied_when_q_has_no_heads(backend):
    cos, sin = (t.float() for t in _tables(4))
    q, k = torch.empty(2, 3, 0, 8), torch.randn(2, 3, 2, 8)
    with fastseq.use_backend(backend):
        _, k_out = fastseq.apply_rotary(q, k, cos, sin)
    torch.testing.assert_close(k_out, ref.apply_rotary(k, None, cos, sin)[0])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_in_place_on_an_expanded_tensor_is_refused(backend):
    cos, sin = (t.float() for t in _tables(8))
    q = torch.randn(1, 5, 1, 8).expand(2, 5, 3, 8)
    with fastseq.use_backend(backend), pytest.raises((ValueError, RuntimeError),
                                                     match="memory|overlap"):
        fastseq.apply_rotary(q, None, cos, sin, inplace=True)


def test_cpu_kernel_checks_positions_itself():
    """While torch.compile traces, the Python range check (a device sync) is skipped; the CPU
    kernel checks the positions it reads."""
    cos, sin = (t.float() for t in _tables(8))
    q, ids = torch.randn(2, 5, 3, 8), torch.full((2, 5), 1000)
    out = torch.empty_like(q)
    no_k = q.new_empty(2, 5, 0, 8)
    with pytest.raises(RuntimeError, match="past the cos/sin table"):
        torch.ops.fastseq.rotary_kernel(out, no_k.clone(), q, no_k, cos[None], sin[None], ids, 0,
                                        8, False, False)


def test_float64_falls_back_to_reference_with_one_warning():
    _backend._warn_once.cache_clear()
    cos, sin = _tables(8)
    q = torch.randn(1, 4, 2, 8, dtype=torch.float64, requires_grad=True)
    with fastseq.use_backend("cpu"), pytest.warns(UserWarning, match="float64"):
        out, _ = fastseq.apply_rotary(q, None, cos, sin)
    torch.testing.assert_close(out, ref.apply_rotary(q, None, cos, sin)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with fastseq.use_backend("cpu"):
            fastseq.apply_rotary(q, None, cos, sin)
    # float64 lets autograd's numerical check run through the op end to end.
    assert torch.autograd.gradcheck(lambda x: fastseq.apply_rotary(x, None, cos, sin)[0], (q,))


def test_forcing_unavailable_backend_warns_and_falls_back():
    _backend._warn_once.cache_clear()
    cos, sin = (t.float() for t in _tables(8))
    q = torch.randn(1, 4, 2, 8)
    with fastseq.use_backend("cuda"), pytest.warns(UserWarning, match="'cuda'"):
        out, _ = fastseq.apply_rotary(q, None, cos, sin)
    torch.testing.assert_close(out, ref.apply_rotary(q, None, cos, sin)[0])


def test_backend_from_environment(monkeypatch):
    monkeypatch.setenv("FASTSEQ_BACKEND", "reference")
    assert _backend.forced_backend() == "reference"
    with fastseq.use_backend("cpu"):
        assert _backend.forced_backend() == "cpu"
    monkeypatch.setenv("FASTSEQ_BACKEND", "bogus")
    with pytest.raises(ValueError, match="bogus"):
        _backend.forced_backend()


def test_cos_sin_requiring_grad_use_the_differentiable_path():
    angles = torch.rand(16, 4, requires_grad=True)
    q = torch.randn(1, 5, 2, 8)
    with pytest.warns(UserWarning, match="require grad"):
        out, _ = fastseq.apply_rotary(q, None, angles.cos(), angles.sin())
    out.sum().backward()
    assert angles.grad is not None and angles.grad.abs().sum() > 0


def test_torch_library_opcheck():
    cos, sin = (t.float()[None] for t in _tables(8))
    q = torch.randn(2, 5, 3, 12, requires_grad=True)
    k = torch.randn(2, 5, 1, 12, requires_grad=True)
    torch.library.opcheck(torch.ops.fastseq.rotary.default,
                          (q, k, cos, sin, None, 2, 8, False, False))
    torch.library.opcheck(torch.ops.fastseq.rotary_.default,
                          (q.detach().clone(), k.detach().clone(), cos, sin,
                           torch.tensor([1, 2]), 0, 8, True, False))


def test_torch_compile_fullgraph_forward_and_backward():
    cos, sin = (t.float() for t in _tables(8))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def rotate_and_score(q, k):
        q, k = fastseq.apply_rotary(q, k, cos, sin, positions=2)
        return (q[:, :, :2] * k).sum()

    q = torch.randn(2, 6, 4, 12, requires_grad=True)
    k = torch.randn(2, 6, 2, 12, requires_grad=True)
    rotate_and_score(q, k).backward()
    q2, k2 = (x.detach().requires_grad_() for x in (q, k))
    qr, kr = ref.apply_rotary(q2, k2, cos, sin, positions=2)
    (qr[:, :, :2] * kr).sum().backward()
    torch.testing.assert_close(q.grad, q2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k.grad, k2.grad, atol=1e-5, rtol=1e-5)


def test_torch_compile_inductor_forward():
    cos, sin = (t.float() for t in _tables(8))
    compiled = torch.compile(lambda q: fastseq.apply_rotary(q, None, cos, sin)[0] * 2,
                             fullgraph=True)
    q = torch.randn(2, 6, 4, 12)
    torch.testing.assert_close(compiled(q), ref.apply_rotary(q, None, cos, sin)[0] * 2)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda q, k, c, s: fastseq.apply_rotary(q[0], k, c, s), "q must be a 4-D tensor"),
        (lambda q, k, c, s: fastseq.apply_rotary(q, k.half(), c, s), "k dtype"),
        (lambda q, k, c, s: fastseq.apply_rotary(q, k[:, :3], c, s), "must agree in batch"),
        (lambda q, k, c, s: fastseq.apply_rotary(q, k, c, s[:, :2]), "same shape"),
        (lambda q, k, c, s: fastseq.apply_rotary(q, k, c.half(), s), "dtype"),
        (lambda q, k, c, s: fastseq.apply_rotary(q, k, c.repeat(1, 4), s.repeat(1, 4)),
         "exceeds the head dim"),
        (lambda q, k, c, s: fastseq.apply_rotary(q, k, c, s, positions=30), "past the cos/sin"),
        (lambda q, k, c, s: fastseq.apply_rotary(q, k, c, s, positions=torch.tensor([0, 28])),
         "past the cos/sin"),
        (lambda q, k, c, s: fastseq.apply_rotary(q, k, c, s, positions=torch.tensor([[-1] * 5] * 2)),
         r"position ids span -1"),
        (lambda q, k, c, s: fastseq.apply_rotary(q, k, c, s, positions=torch.tensor([0.5, 1.0])),
         "int32/int64"),
        (lambda q, k, c, s: fastseq.apply_rotary(
            q, k, c, s, positions=torch.tensor([2**31 - 3, 0], dtype=torch.int32)),
         "past the cos/sin"),  # offset + N - 1 must not wrap around in int32
        (lambda q, k, c, s: fastseq.apply_rotary(q, k, c, s, positions=torch.zeros(3, dtype=torch.long)),
         r"shape \(2,\)"),
        (lambda q, k, c, s: fastseq.apply_rotary(q, k, c, s, layout="nbhd"), "layout"),
        (lambda q, k, c, s: fastseq.apply_rotary_pos_emb(q, k, c, s, None, 2), "do not broadcast"),
        (lambda q, k, c, s: fastseq.apply_rotary_pos_emb(q, k, c, s, None, 7), "unsqueeze_dim"),
        (lambda q, k, c, s: fastseq.nn.RotaryEmbedding(7), "even"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, match):
    q, k = torch.randn(2, 5, 3, 12), torch.randn(2, 5, 1, 12)
    cos, sin = (t.float() for t in _tables(8))
    with pytest.raises(ValueError, match=match):
        call(q, k, cos, sin)


def test_device_mismatch_is_reported():
    q = torch.randn(2, 5, 3, 12, device="meta")
    cos, sin = (t.float() for t in _tables(8))
    with pytest.raises(ValueError, match="cos is on cpu but q is on meta"):
        fastseq.apply_rotary(q, None, cos, sin)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
def test_gpu_backends_match_reference(backend, dtype, interleaved, strict_warnings):
    for shape in SHAPES + [(4, 300, 8, 2, 128, 64)]:
        q, k = _make(shape, dtype, "bnhd", requires_grad=True)
        q, k = (None if x is None else x.detach().cuda().requires_grad_() for x in (q, k))
        cos, sin = (t.float().cuda() for t in _tables(shape[5]))
        positions = torch.randint(0, TABLE_LEN, (shape[0], shape[1]), device="cuda")
        with fastseq.use_backend(backend):
            q_out, _ = fastseq.apply_rotary(q, k, cos, sin, positions=positions,
                                            interleaved=interleaved)
            grad = torch.randn_like(q_out)
            (dq,) = torch.autograd.grad(q_out, q, grad)
        q64 = q.detach().double().requires_grad_()
        (truth,) = _reference(q64, None, cos.double(), sin.double(), positions, interleaved, "bnhd")[:1]
        (low,) = _reference(q, None, cos, sin, positions, interleaved, "bnhd", compute_dtype=dtype)[:1]
        assert_within_rule(q_out, truth, low, "q")
        (dtruth,) = torch.autograd.grad(truth, q64, grad.double())
        (dlow,) = torch.autograd.grad(low, q, grad)
        assert_within_rule(dq, dtruth, dlow, "grad q")
