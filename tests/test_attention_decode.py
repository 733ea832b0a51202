"""Decoding against a KV cache: split-KV kernels vs full attention, and the cache append."""

import pytest
import torch
from tolerance import FLOORS, max_error

import fastseq
from fastseq.reference import attention as ref

BACKENDS = [b for b in ("triton", "cpu", "reference") if b in fastseq.available_backends("cpu")]


DTYPES = [torch.float16, torch.bfloat16, torch.float32]
SHAPES = [(3, 4, 2, 1, 100, 64), (2, 8, 1, 5, 77, 40), (1, 2, 2, 16, 33, 80), (2, 3, 3, 2, 19, 160)]
# On the GPU: caches long enough for many key blocks and splits, and a 128 head dim.
GPU_SHAPES = SHAPES + [(4, 32, 8, 1, 5000, 128), (2, 8, 2, 3, 1031, 64)]


def _decode_matches_full_attention(backend, dtype, shape, device="cpu"):
    B, H, Hk, Lq, S, D = shape
    q = torch.randn(B, H, Lq, D).to(dtype)
    k_cache, v_cache = (torch.randn(B, Hk, S, D).to(dtype) for _ in range(2))
    lengths = torch.randint(Lq, S + 1, (B,))
    lengths[0] = Lq  # a sequence that holds nothing but the new tokens
    with fastseq.use_backend(backend):
        out, lse = fastseq.attention_decode(*(t.to(device) for t in (q, k_cache, v_cache, lengths)),
                                            return_lse=True)
    out, lse = out.cpu(), lse.cpu()
    options = dict(causal=True, bottom_right=True, key_lengths=lengths)
    truth, truth_lse = ref.attention(q.double(), k_cache.double(), v_cache.double(), **options)
    low, _ = ref.attention(q, k_cache, v_cache, compute_dtype=dtype, **options)
    err, ref_err = max_error(out, truth), max_error(low, truth)
    assert err <= 2 * ref_err + FLOORS[dtype], f"error {err:.3e} vs reference {ref_err:.3e}"
    torch.testing.assert_close(lse, truth_lse.float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_decode_matches_full_attention(backend, dtype, shape):
    _decode_matches_full_attention(backend, dtype, shape)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_triton_decode_on_the_gpu(dtype, shape):
    _decode_matches_full_attention("triton", dtype, shape, device="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("full", ["lengths_at_capacity", "no_lengths"])
def test_decode_over_full_caches(backend, rows, full):
    """Every cache slot holds a token (the CPU path then needs no mask for one query row)."""
    q, k_cache, v_cache = torch.randn(2, 6, rows, 32), torch.randn(2, 2, 21, 32), \
        torch.randn(2, 2, 21, 32)
    lengths = torch.full((2,), 21) if full == "lengths_at_capacity" else None
    with fastseq.use_backend(backend):
        out, lse = fastseq.attention_decode(q, k_cache, v_cache, lengths, return_lse=True)
    want, want_lse = ref.attention(q.double(), k_cache.double(), v_cache.double(), causal=True,
                                   bottom_right=True)
    torch.testing.assert_close(out, want.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse.float(), atol=1e-5, rtol=1e-5)


def test_decode_with_grad_takes_the_differentiable_path():
    q = torch.randn(1, 2, 1, 16, requires_grad=True)
    k_cache, v_cache = torch.randn(1, 2, 10, 16), torch.randn(1, 2, 10, 16)
    out = fastseq.attention_decode(q, k_cache, v_cache, torch.tensor([6]))
    out.sum().backward()
    want = ref.attention(q, k_cache, v_cache, causal=True, bottom_right=True,
                         key_lengths=torch.tensor([6]))[0]
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert q.grad is not None


def test_cache_append_then_decode_equals_causal_attention_over_the_sequence():
    B, H, Hk, D, S = 2, 4, 2, 32, 24
    k_cache, v_cache = torch.zeros(B, Hk, S, D), torch.zeros(B, Hk, S, D)
    lengths = torch.zeros(B, dtype=torch.long)
    q_all = torch.randn(B, H, 9, D)
    k_all, v_all = torch.randn(B, Hk, 9, D), torch.randn(B, Hk, 9, D)
    # a prompt of 5 tokens, then 4 steps of one token
    lengths = fastseq.kv_cache_append(k_cache, v_cache, k_all[:, :, :5], v_all[:, :, :5], lengths)
    outs = [fastseq.attention_decode(q_all[:, :, :5], k_cache, v_cache, lengths)]
    for t in range(5, 9):
        lengths = fastseq.kv_cache_append(k_cache, v_cache, k_all[:, :, t:t + 1],
                                          v_all[:, :, t:t + 1], lengths)
        outs.append(fastseq.attention_decode(q_all[:, :, t:t + 1], k_cache, v_cache, lengths))
    assert lengths.tolist() == [9, 9]
    want, _ = ref.attention(q_all, k_all, v_all, causal=True)
    torch.testing.assert_close(torch.cat(outs, dim=2), want, atol=1e-5, rtol=1e-5)


def test_cache_append_rejects_overflow_and_bad_shapes():
    k_cache = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match="overflows the cache"):
        fastseq.kv_cache_append(k_cache, k_cache.clone(), torch.ones(1, 2, 3, 8),
                                torch.ones(1, 2, 3, 8), torch.tensor([2]))
    with pytest.raises(ValueError, match="does not fit the cache"):
        fastseq.kv_cache_append(k_cache, k_cache.clone(), torch.ones(1, 3, 1, 8),
                                torch.ones(1, 3, 1, 8), torch.tensor([0]))


def test_decode_bad_inputs():
    q = torch.randn(1, 2, 1, 8)
    cache = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match=r"\[0, Lk=5\]"):
        fastseq.attention_decode(q, cache, cache, torch.tensor([6]))
    with pytest.raises(ValueError, match="multiple of k/v heads"):
        fastseq.attention_decode(torch.randn(1, 3, 1, 8), cache, cache, torch.tensor([5]))


def test_attention_block_generation_with_cache_matches_full_forward():
    torch.manual_seed(0)
    block = fastseq.nn.Attention(48, num_heads=4, num_kv_heads=2, rotary=True).eval()
    x = torch.randn(2, 10, 48)
    with torch.no_grad():
        full = block(x)
        cache = block.new_cache(2, 16)
        steps = [block(x[:, :6], cache=cache)]
        steps += [block(x[:, t:t + 1], cache=cache) for t in range(6, 10)]
    assert cache.lengths.tolist() == [10, 10]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)


def test_attention_block_rejects_bad_head_counts():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        fastseq.nn.Attention(48, num_heads=4, num_kv_heads=3)


def test_attention_block_without_causality_attends_to_the_whole_cache():
    torch.manual_seed(0)
    block = fastseq.nn.Attention(32, num_heads=4, causal=False).eval()
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        cache = block.new_cache(2, 12)
        prompt = block(x[:, :6], cache=cache)
        step = block(x[:, 6:], cache=cache)  # the last 3 tokens see all 9, in both directions
        full = block(x)
    torch.testing.assert_close(step, full[:, 6:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(prompt, block(x[:, :6]), atol=1e-5, rtol=1e-5)


def test_attention_block_refuses_key_lengths_with_a_cache():
    block = fastseq.nn.Attention(32, num_heads=4)
    with pytest.raises(ValueError, match="key_lengths must be None"):
        block(torch.randn(1, 2, 32), cache=block.new_cache(1, 4), key_lengths=torch.tensor([1]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_rows_that_see_no_key_and_empty_batches(backend):
    """A sequence whose cache holds fewer tokens than the query rows: its first rows see nothing
    (zeros, lse -inf); an empty batch gives empty outputs."""
    q, k_cache, v_cache = torch.randn(2, 4, 3, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    lengths = torch.tensor([1, 7])
    with fastseq.use_backend(backend):
        out, lse = fastseq.attention_decode(q, k_cache, v_cache, lengths, return_lse=True)
        empty = fastseq.attention_decode(q[:0], k_cache[:0], v_cache[:0], lengths[:0])
    assert torch.equal(out[0, :, :2], torch.zeros(4, 2, 16)) and bool((lse[0, :, :2] == float("-inf")).all())
    want, want_lse = ref.attention(q[1:].double(), k_cache[1:].double(), v_cache[1:].double(), causal=True,
                                   bottom_right=True, key_lengths=lengths[1:])
    torch.testing.assert_close(out[1:], want.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0, :, 2], ref.attention(q[:1, :, 2:], k_cache[:1, :, :1],
                                                           v_cache[:1, :, :1])[0][0, :, 0])
    assert empty.shape == (0, 4, 3, 16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_append_converts_and_takes_strided_keys(backend):
    """Keys in another dtype are cast to the cache's; (B, L, Hk, D) views transposed to
    (B, Hk, L, D), as the attention block passes them, land in the right slots."""
    k_cache, v_cache = (torch.zeros(2, 3, 6, 8, dtype=torch.float16) for _ in range(2))
    k, v = torch.randn(2, 2, 3, 8).transpose(1, 2), torch.randn(2, 2, 3, 8).transpose(1, 2)
    with fastseq.use_backend(backend):
        lengths = fastseq.kv_cache_append(k_cache, v_cache, k, v, torch.tensor([0, 4]))
    assert lengths.tolist() == [2, 6]
    assert torch.equal(k_cache[0, :, :2], k[0].half()) and torch.equal(v_cache[1, :, 4:], v[1].half())
    assert not k_cache[0, :, 2:].any() and not v_cache[1, :, :4].any()


def test_cache_append_keeps_the_gradient_of_the_keys():
    """Keys that take gradients are appended differentiably: the cache's gradient reaches them."""
    k_cache, v_cache = torch.zeros(2, 1, 5, 4), torch.zeros(2, 1, 5, 4)
    k, v = torch.randn(2, 1, 2, 4, requires_grad=True), torch.randn(2, 1, 2, 4, requires_grad=True)
    fastseq.kv_cache_append(k_cache, v_cache, k, v, torch.tensor([0, 3]))
    weights = torch.randn(2, 1, 5, 4)
    (k_cache * weights).sum().backward()
    torch.testing.assert_close(k.grad, torch.stack([weights[0, :, :2], weights[1, :, 3:]]))
