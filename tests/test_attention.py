"""Attention: the fused kernels against the plain-PyTorch reference, forward and backward."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from tolerance import FLOORS, max_error

import fastseq
from fastseq import _backend
from fastseq.reference import attention as ref

# triton: the fused kernels (interpreted here); cpu: torch's CPU flash kernel behind fastseq's
# masks and options; reference: plain PyTorch.
_AVAILABLE = fastseq.available_backends("cpu")
BACKENDS = [b for b in ("triton", "cpu", "reference") if b in _AVAILABLE]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]

# B, H, Hk, Lq, Lk, D, causal, alignment, mask kind, key lengths
CONFIGS = {
    "ragged": (2, 2, 2, 37, 37, 40, False, "top_left", None, False),
    "gqa_causal_cross": (1, 4, 2, 29, 45, 80, True, "top_left", None, False),
    "mqa_bottom_right_klen": (2, 2, 1, 7, 30, 24, True, "bottom_right", None, True),
    "bool_mask_broadcast": (2, 2, 2, 19, 23, 64, False, "top_left", "bool", False),
    "additive_mask_klen": (2, 3, 3, 17, 21, 16, False, "top_left", "additive", True),
    "length_one": (1, 1, 1, 1, 1, 32, True, "top_left", None, False),
    "fully_masked_rows": (2, 2, 2, 20, 33, 96, False, "top_left", "bool_empty_rows", False),
    "head_dim_160_causal": (1, 2, 1, 18, 18, 160, True, "bottom_right", None, False),
}


def _inputs(cfg, dtype):
    B, H, Hk, Lq, Lk, D, causal, alignment, mask_kind, klen = cfg
    q = torch.randn(B, H, Lq, D, dtype=torch.float64)
    # k and v as transposed views of a (B, L, H, D) buffer: strided inputs, no copies.
    k = torch.randn(B, Lk, Hk, D, dtype=torch.float64).transpose(1, 2)
    v = torch.randn(B, Lk, Hk, D, dtype=torch.float64).transpose(1, 2)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(1, 1, Lq, Lk) > 0.3
    elif mask_kind == "additive":
        mask = torch.randn(B, 1, 1, Lk).to(dtype)
    elif mask_kind == "bool_empty_rows":
        mask = torch.rand(B, H, Lq, Lk) > 0.5
        mask[:, :, ::3] = False
    key_lengths = torch.tensor([Lk, max(Lk - 11, 1)][:B]) if klen else None
    options = dict(causal=causal, bottom_right=alignment == "bottom_right", attn_mask=mask,
                   key_lengths=key_lengths)
    return q, k, v, options, alignment


def _check(name, got, truth, low):
    err, ref_err = max_error(got, truth), max_error(low, truth)
    bound = 2 * ref_err + FLOORS[low.dtype] * max(1.0, truth.abs().max().item())
    assert err <= bound, f"{name}: error {err:.3e} > 2 x reference error {ref_err:.3e} + floor"


def _on(device, options):
    return {name: t.to(device) if isinstance(t, torch.Tensor) else t for name, t in options.items()}


def _match_reference(backend, dtype, cfg, device="cpu"):
    """Run ``backend`` on ``device`` and check output, lse and gradients against the reference
    computed on the CPU in float64 (truth) and in ``dtype`` (the low-precision reference)."""
    q, k, v, options, alignment = _inputs(cfg, dtype)
    leaves = [t.detach().to(device).requires_grad_() for t in (q, k, v)]
    grad = torch.randn(q.shape[:-1] + v.shape[-1:], dtype=dtype)
    with fastseq.use_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a fallback would hide the kernel
        on_device = _on(device, options)
        out, lse = fastseq.attention(
            *leaves, causal=options["causal"], causal_alignment=alignment,
            attn_mask=on_device["attn_mask"], key_lengths=on_device["key_lengths"], return_lse=True)
        grads = [g.cpu() for g in torch.autograd.grad(out, leaves, grad.to(device))]
    out, lse = out.cpu(), lse.cpu()

    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    truth, truth_lse = ref.attention(*leaves64, **options)
    truth_grads = torch.autograd.grad(truth, leaves64, grad.double())
    low_leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    low, _ = ref.attention(*low_leaves, **options, compute_dtype=dtype)
    low_grads = torch.autograd.grad(low, low_leaves, grad)

    assert out.dtype == dtype and lse.dtype == torch.float32
    assert torch.isfinite(out).all()
    _check("out", out, truth, low)
    finite = torch.isfinite(truth_lse)
    assert torch.equal(torch.isfinite(lse), finite), "rows with no key must have lse = -inf"
    torch.testing.assert_close(lse[finite], truth_lse[finite].float(), atol=2e-2, rtol=1e-3)
    for name, g, t, lo in zip(("dq", "dk", "dv"), grads, truth_grads, low_grads, strict=True):
        assert torch.isfinite(g).all(), f"{name} has NaN/inf"
        _check(name, g, t, lo)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_forward_backward_match_reference(backend, dtype, config):
    _match_reference(backend, dtype, CONFIGS[config])


# On the GPU the autotuned tiles run: lengths past several blocks, every head dim the tuner caps.
GPU_CONFIGS = {
    **CONFIGS,
    "long_causal_gqa_klen": (2, 4, 2, 1000, 1000, 64, True, "bottom_right", None, True),
    "long_cross_bool_mask": (1, 4, 4, 513, 777, 128, False, "top_left", "bool", False),
    "long_head_dim_256": (1, 2, 2, 300, 300, 256, True, "top_left", None, False),
    "long_causal_head_dim_128": (1, 2, 2, 300, 300, 128, True, "bottom_right", None, False),
}


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", sorted(GPU_CONFIGS))
def test_triton_on_the_gpu_matches_reference(dtype, config):
    _match_reference("triton", dtype, GPU_CONFIGS[config], device="cuda")


def test_fully_masked_rows_give_zero_output_and_gradients():
    q, k, v = (torch.randn(1, 2, 9, 16, requires_grad=True) for _ in range(3))
    mask = torch.ones(9, 9, dtype=torch.bool)
    mask[3] = False
    out = fastseq.attention(q, k, v, attn_mask=mask)
    out.backward(torch.ones_like(out))
    assert torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3]))
    assert torch.equal(q.grad[:, :, 3], torch.zeros_like(q.grad[:, :, 3]))
    assert torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()


def _dropped_probabilities(p, seed, lq=24, lk=32):
    """With v = identity the output *is* the dropped probability matrix."""
    q = torch.randn(2, 2, lq, lk, requires_grad=True)
    k = torch.randn(2, 2, lk, lk, requires_grad=True)
    v = torch.eye(lk).expand(2, 2, lk, lk).contiguous().requires_grad_()
    return q, k, v, fastseq.attention(q, k, v, dropout_p=p, seed=seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_is_reproducible_and_backward_uses_the_same_mask(backend):
    p = 0.3
    with fastseq.use_backend(backend):
        q, k, v, out = _dropped_probabilities(p, seed=1234)
        again = fastseq.attention(q, k, v, dropout_p=p, seed=1234)
        other = fastseq.attention(q, k, v, dropout_p=p, seed=4321)
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), grad)
    assert torch.equal(out, again)
    assert not torch.equal(out, other)
    keep = out != 0
    dropped = 1 - keep.float().mean().item()
    assert abs(dropped - p) < 0.03, f"dropped fraction {dropped:.3f}, expected {p}"
    want_out, _ = ref.attention(q, k, v, dropout_p=p, keep_mask=keep)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-4)
    want = torch.autograd.grad(want_out, (q, k, v), grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "case",
    ["plain", "causal", "bool_mask", "float_mask", "gqa", "three_d", "scale"],
)
def test_sdpa_drop_in_matches_torch(case):
    q, k, v = (torch.randn(2, 4, 13, 24) for _ in range(3))
    kwargs = {}
    if case == "causal":
        kwargs["is_causal"] = True
    elif case == "bool_mask":
        kwargs["attn_mask"] = torch.rand(13, 13) > 0.2
        kwargs["attn_mask"][:, 0] = True  # torch gives NaN on empty rows; fastseq gives zeros
    elif case == "float_mask":
        kwargs["attn_mask"] = torch.randn(2, 1, 13, 13)
    elif case == "gqa":
        k, v = k[:, :2], v[:, :2]
        kwargs["enable_gqa"] = True
    elif case == "three_d":
        q, k, v = q[:, 0], k[:, 0], v[:, 0]
    elif case == "scale":
        kwargs["scale"] = 0.3
    got = fastseq.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)
    want = F.scaled_dot_product_attention(q, k, v, **kwargs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_sdpa_drop_in_rejects_what_torch_rejects():
    q = torch.randn(1, 4, 5, 8)
    k = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="enable_gqa"):
        fastseq.nn.functional.scaled_dot_product_attention(q, k, k)
    with pytest.raises(ValueError, match="is_causal"):
        fastseq.nn.functional.scaled_dot_product_attention(q, q, q, torch.ones(5, 5).bool(),
                                                            is_causal=True)


def _mha_pair(**kwargs):
    torch_mha = torch.nn.MultiheadAttention(**kwargs)
    ours = fastseq.nn.MultiheadAttention(**kwargs)
    ours.load_state_dict(torch_mha.state_dict())
    return torch_mha.eval(), ours.eval()


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("masks", ["none", "padding", "bool_attn", "float_attn_and_padding",
                                   "per_head"])
def test_multihead_attention_matches_torch(batch_first, masks):
    torch_mha, ours = _mha_pair(embed_dim=32, num_heads=4, batch_first=batch_first)
    B, L = 3, 11
    x = torch.randn(B, L, 32) if batch_first else torch.randn(L, B, 32)
    kwargs = {}
    padding = torch.zeros(B, L, dtype=torch.bool)
    padding[1, 7:] = True
    if masks in ("padding", "float_attn_and_padding"):
        kwargs["key_padding_mask"] = padding
    if masks == "bool_attn":
        kwargs["attn_mask"] = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)
    if masks == "float_attn_and_padding":
        kwargs["attn_mask"] = torch.randn(L, L)
        kwargs["key_padding_mask"] = torch.zeros(B, L).masked_fill(padding, float("-inf"))
    if masks == "per_head":
        kwargs["attn_mask"] = torch.rand(B * 4, L, L) > 0.8  # True = masked, as in torch
    got, weights = ours(x, x, x, need_weights=False, **kwargs)
    want, _ = torch_mha(x, x, x, need_weights=False, **kwargs)
    assert weights is None
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("which", ["key_padding_mask", "attn_mask"])
def test_multihead_attention_refuses_integer_masks_as_torch_does(which):
    mha = fastseq.nn.MultiheadAttention(16, 2, batch_first=True)
    x = torch.randn(2, 5, 16)
    mask = torch.zeros(2, 5, dtype=torch.uint8) if which == "key_padding_mask" else \
        torch.zeros(5, 5, dtype=torch.int64)
    with pytest.raises(AssertionError, match="only bool and floating"):
        mha(x, x, x, need_weights=False, **{which: mask})


def test_multihead_attention_kdim_vdim_unbatched_and_weights():
    torch_mha, ours = _mha_pair(embed_dim=16, num_heads=2, kdim=12, vdim=20)
    query, key, value = torch.randn(5, 16), torch.randn(7, 12), torch.randn(7, 20)
    got, _ = ours(query, key, value, need_weights=False)
    want, _ = torch_mha(query, key, value, need_weights=False)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    got, got_w = ours(query, key, value)  # need_weights=True: torch's path, exact weights
    want, want_w = torch_mha(query, key, value)
    torch.testing.assert_close(got_w, want_w)
    assert set(ours.state_dict()) == set(torch_mha.state_dict())


def test_multihead_attention_gradients_match_torch():
    torch_mha, ours = _mha_pair(embed_dim=24, num_heads=3, batch_first=True)
    x = torch.randn(2, 9, 24)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(9)
    ours(x, x, x, need_weights=False, attn_mask=causal, is_causal=True)[0].sum().backward()
    torch_mha(x, x, x, need_weights=False, attn_mask=causal, is_causal=True)[0].sum().backward()
    for (name, a), b in zip(ours.named_parameters(), torch_mha.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(q=torch.randn(2, 4, 8)), "4-D"),
        (dict(k=torch.randn(1, 3, 6, 8), v=torch.randn(1, 3, 6, 8)), "multiple of k/v heads"),
        (dict(k=torch.randn(1, 2, 6, 8).half()), "dtype"),
        (dict(attn_mask=torch.ones(3, 5, 6, dtype=torch.bool)), "does not broadcast"),
        (dict(attn_mask=torch.ones(5, 6, dtype=torch.int32)), "bool or floating"),
        (dict(key_lengths=torch.tensor([7])), r"\[0, Lk=6\]"),
        (dict(key_lengths=torch.tensor([2.0])), "int tensor"),
        (dict(dropout_p=1.0), "dropout_p"),
        (dict(causal=True, causal_alignment="center"), "causal_alignment"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, match):
    args = dict(q=torch.randn(1, 4, 5, 8), k=torch.randn(1, 2, 6, 8), v=torch.randn(1, 2, 6, 8))
    args.update(kwargs)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(ValueError, match=match):
        fastseq.attention(q, k, args.pop("v", v), **args)


def test_unsupported_head_dim_falls_back_with_one_warning():
    _backend._warn_once.cache_clear()
    q, k, v = (torch.randn(1, 1, 4, 272) for _ in range(3))
    with fastseq.use_backend("triton"), pytest.warns(UserWarning, match="head dim 272"):
        out = fastseq.attention(q, k, v)
    torch.testing.assert_close(out, ref.attention(q, k, v)[0])


def test_empty_batch():
    q, k, v = (torch.randn(0, 2, 5, 16, requires_grad=True) for _ in range(3))
    out = fastseq.attention(q, k, v, causal=True)
    out.sum().backward()
    assert out.shape == q.shape and q.grad.shape == q.shape


def test_opcheck_and_compile_fullgraph():
    q, k, v = (torch.randn(1, 2, 17, 16, requires_grad=True) for _ in range(3))
    torch.library.opcheck(torch.ops.fastseq.attention.default,
                          (q, k, v, None, None, None, None, False, True, False, 0.25, 0.0, 0))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def loss(q, k, v):
        return fastseq.attention(q, k, v, causal=True).square().sum()

    loss(q, k, v).backward()
    q2, k2, v2 = (t.detach().requires_grad_() for t in (q, k, v))
    ref.attention(q2, k2, v2, causal=True)[0].square().sum().backward()
    torch.testing.assert_close(q.grad, q2.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(v.grad, v2.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
def test_rotary_inside_the_kernel_equals_rotary_then_attention(backend, dtype, interleaved,
                                                               alignment):
    B, H, Hk, Lq, Lk, D, R = 2, 4, 2, 13, 21, 40, 24
    rope = fastseq.nn.RotaryEmbedding(R, interleaved=interleaved)
    cos, sin = rope.cos_sin(Lk)
    q = torch.randn(B, H, Lq, D).to(dtype).requires_grad_()
    k = torch.randn(B, Hk, Lk, D).to(dtype).requires_grad_()
    v = torch.randn(B, Hk, Lk, D).to(dtype).requires_grad_()
    key_lengths = torch.tensor([Lk, 16])
    options = dict(causal=True, causal_alignment=alignment, key_lengths=key_lengths)
    with fastseq.use_backend(backend):
        fused = fastseq.attention(q, k, v, cos=cos, sin=sin, rotary_interleaved=interleaved,
                                  **options)
        grad = torch.randn_like(fused)
        got = torch.autograd.grad(fused, (q, k, v), grad)
        shift = (key_lengths - Lq) if alignment == "bottom_right" else torch.zeros(B, dtype=torch.long)
        qpos = (torch.arange(Lq) + shift[:, None]).clamp(min=0)
        q_rot, _ = fastseq.apply_rotary(q, None, cos, sin, positions=qpos,
                                        interleaved=interleaved, layout="bhnd")
        k_rot, _ = fastseq.apply_rotary(k, None, cos, sin, interleaved=interleaved, layout="bhnd")
        separate = fastseq.attention(q_rot, k_rot, v, **options)
        want = torch.autograd.grad(separate, (q, k, v), grad)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(fused, separate, atol=tol, rtol=tol)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=4 * tol, rtol=4 * tol)


def test_rotary_tables_are_checked():
    q = torch.randn(1, 2, 9, 16)
    cos, sin = fastseq.nn.RotaryEmbedding(8).cos_sin(8)
    with pytest.raises(ValueError, match="fewer than the 9"):
        fastseq.attention(q, q, q, cos=cos[:8], sin=sin[:8])
    with pytest.raises(ValueError, match="both cos and sin"):
        fastseq.attention(q, q, q, cos=cos)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])  # (torch.func
def test_backward_outputs_have_the_promised_layout(backend):  # inside cannot run under opcheck)
    """opcheck compares the real backward's strides with the fake's (what torch.compile plans
    for): the CPU kernel's gradients come out (B, L, H, D) in memory and must be laid out again."""
    q, k, v = (torch.randn(2, 4, 9, 16) for _ in range(3))
    k2, v2 = torch.randn(2, 2, 11, 16), torch.randn(2, 2, 11, 16)  # GQA, Lq != Lk
    for keys, values in ((k, v), (k2, v2)):
        out, lse = torch.ops.fastseq.attention(q, keys, values, None, None, None, None, False,
                                               True, True, 0.25, 0.0, 0)
        torch.library.opcheck(
            torch.ops.fastseq.attention_backward.default,
            (torch.randn_like(out), q, keys, values, out, lse, None, None, None, None, False, True,
             True, 0.25, 0.0, 0, backend), test_utils=("test_faketensor",))


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_strided_in_the_head_dim(backend):
    """q, k, v whose last dimension is not contiguous (e.g. heads of an NCHW feature map)."""
    q64 = torch.randn(2, 3, 16, 13, dtype=torch.float64).transpose(-1, -2)  # (2, 3, 13, 16)
    k64 = torch.randn(2, 3, 16, 10, dtype=torch.float64).transpose(-1, -2)
    v64 = torch.randn(2, 3, 16, 10, dtype=torch.float64).transpose(-1, -2)
    q, k, v = (t.float().requires_grad_() for t in (q64, k64, v64))
    with fastseq.use_backend(backend):
        out = fastseq.attention(q, k, v, causal=True)
        out.backward(torch.ones_like(out))
        decoded = fastseq.attention_decode(q.detach(), k.detach(), v.detach(), None)
    q64, k64, v64 = (t.requires_grad_() for t in (q64, k64, v64))
    want = ref.attention(q64, k64, v64, causal=True)[0]
    want.backward(torch.ones_like(want))
    torch.testing.assert_close(out, want.float(), atol=1e-4, rtol=1e-4)
    for got, truth in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        torch.testing.assert_close(got, truth.float(), atol=1e-4, rtol=1e-4)
    want_decode = ref.attention(q64, k64, v64, causal=True, bottom_right=True)[0]
    torch.testing.assert_close(decoded, want_decode.float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 0, 5), (2, 4, 0), (0, 4, 5)], ids=["no_queries", "no_keys",
                                                                         "empty_batch"])
def test_empty_queries_keys_or_batch(backend, shape):
    batch, lq, lk = shape
    q = torch.randn(batch, 2, lq, 16, requires_grad=True)
    k, v = (torch.randn(batch, 2, lk, 16, requires_grad=True) for _ in range(2))
    mask = torch.ones(lq, lk, dtype=torch.bool)
    with fastseq.use_backend(backend):
        out, lse = fastseq.attention(q, k, v, attn_mask=mask, return_lse=True)
        out.sum().backward()
        decoded = fastseq.attention_decode(q.detach(), k.detach(), v.detach(), None)
    assert out.shape == q.shape and decoded.shape == q.shape
    assert not out.any() and (lse == float("-inf")).all()
    assert q.grad.shape == q.shape and not q.grad.any() and not v.grad.any()


def test_sdpa_drop_in_takes_a_different_value_dim():
    q, k = torch.randn(2, 3, 7, 16), torch.randn(2, 3, 9, 16)
    v = torch.randn(2, 3, 9, 24)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fused kernels take equal dims: a visible fallback
        got = fastseq.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, is_causal=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_through_the_log_sum_exp(backend):
    q64, k64, v64 = (torch.randn(1, 2, 11, 16, dtype=torch.float64, requires_grad=True)
                     for _ in range(3))
    q, k, v = (t.detach().float().requires_grad_() for t in (q64, k64, v64))
    with fastseq.use_backend(backend):
        out, lse = fastseq.attention(q, k, v, causal=True, return_lse=True)
    (out.square().sum() + lse.sum()).backward()
    want, want_lse = ref.attention(q64, k64, v64, causal=True)
    (want.square().sum() + want_lse.sum()).backward()
    for got, truth in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        torch.testing.assert_close(got, truth.float(), atol=1e-4, rtol=1e-4)


def test_reference_rows_masked_by_minus_infinity_have_finite_gradients():
    q = torch.randn(1, 1, 3, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 1, 4, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    mask = torch.zeros(3, 4, dtype=torch.float64)
    mask[0] = float("-inf")
    out, lse = ref.attention(q, k, v, attn_mask=mask)
    (out.sum() + lse[..., 1:].sum()).backward()
    assert lse[0, 0, 0] == float("-inf") and not out[0, 0, 0].any()
    for grad in (q.grad, k.grad, v.grad):
        assert torch.isfinite(grad).all()
    assert not q.grad[0, 0, 0].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_with_a_float32_mask_at_its_minimum(backend):
    """An additive float32 mask holding finfo(float32).min (what Hugging Face models use) is a
    very negative but finite bias, not a masked-out row: a bias constant over a row cancels in
    the softmax, so that row attends as if unmasked."""
    q, k, v = (torch.randn(1, 2, 5, 16).half() for _ in range(3))
    mask = torch.zeros(5, 5)
    mask[1] = torch.finfo(torch.float32).min
    with fastseq.use_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got, lse = fastseq.attention(q, k, v, attn_mask=mask, return_lse=True)
    assert torch.isfinite(lse).all() and got[:, :, 1].abs().amax(-1).gt(0).all()
    # Other rows as the reference; row 1 depends on how much of the scores survives adding
    # -3.4e38 (all of it in torch's CPU kernel, which works relative to the row maximum).
    want = ref.attention(q.double(), k.double(), v.double(), attn_mask=mask.double())[0]
    rows = [0, 2, 3, 4]
    torch.testing.assert_close(got[:, :, rows].double(), want[:, :, rows], atol=3e-3, rtol=3e-3)
