"""Inputs that once gave a wrong answer, or an unbounded allocation, without an error.

One test per instance: range checks that an addition on a caller's value could wrap, silent dtype
casts, aliased in-place arguments, parameters that make NaN, and caches a position id can grow.
"""

import pytest
import torch

import fastseq
from fastseq import _extension
from fastseq.nn import RopeScaling
from fastseq.reference import rotary as ref

INT64_MAX = 2**63 - 1


def _tables(length=4, pairs=4):
    angles = torch.outer(torch.arange(length, dtype=torch.float32), torch.rand(pairs))
    return angles.cos(), angles.sin()


# --------------------------------------------------------------------------------------------
# Range checks that cannot overflow
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [INT64_MAX, INT64_MAX - 1, 2**62, 3])
def test_rotary_per_batch_offset_near_int64_max_is_refused(offset):
    cos, sin = _tables()
    with pytest.raises(ValueError, match="per-batch offsets span"):
        fastseq.apply_rotary(torch.randn(1, 2, 1, 8), None, cos, sin, positions=torch.tensor([offset]))


def test_rotary_position_ids_near_int64_max_are_refused():
    cos, sin = _tables()
    with pytest.raises(ValueError, match="position ids span"):
        fastseq.apply_rotary(torch.randn(1, 2, 1, 8), None, cos, sin,
                             positions=torch.tensor([[0, INT64_MAX]]))


@pytest.mark.parametrize("positions,offset", [([INT64_MAX], 0), ([1], INT64_MAX), ([-1], 0)])
def test_cpu_kernel_range_check_cannot_wrap(positions, offset):
    """The C++ op checks positions held on the CPU itself, with its bounds on the constant side."""
    cos, sin = _tables()
    q = torch.randn(1, 2, 1, 8)
    _extension.load()
    with pytest.raises(RuntimeError, match="past the cos/sin table"):
        torch.ops.fastseq.rotary_kernel(torch.empty_like(q), q[:, :, :0], q, q[:, :, :0], cos[None],
                                        sin[None], torch.tensor(positions), offset, 8, False, False)


def test_cpu_kernel_offset_check_cannot_wrap():
    cos, sin = _tables()
    q = torch.randn(1, 2, 1, 8)
    _extension.load()
    with pytest.raises(RuntimeError, match="past the cos/sin table"):
        torch.ops.fastseq.rotary_kernel(torch.empty_like(q), q[:, :, :0], q, q[:, :, :0], cos[None],
                                        sin[None], None, INT64_MAX, 8, False, False)


# --------------------------------------------------------------------------------------------
# No silent dtype conversion
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.long, torch.bfloat16, torch.float64])
def test_lstm_refuses_input_of_another_dtype_than_its_weights(dtype):
    lstm = fastseq.nn.LSTM(6, 8)
    with pytest.raises(ValueError, match="must match the weights' dtype"):
        lstm(torch.ones(5, 3, 6, dtype=dtype))


def test_lstm_cell_refuses_input_of_another_dtype_than_its_weights():
    with pytest.raises(ValueError, match="must match the weights' dtype"):
        fastseq.nn.LSTMCell(6, 8)(torch.ones(3, 6, dtype=torch.long))


@pytest.mark.parametrize("module", ["LSTM", "LayerNormLSTM"])
def test_lstm_follows_cpu_autocast_as_torch_does(module):
    torch.manual_seed(0)
    ours = getattr(fastseq.nn, module)(6, 8)
    x = torch.randn(5, 3, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, (h, c) = ours(x)
    assert y.dtype == h.dtype == c.dtype == torch.bfloat16
    y32, _ = ours(x)
    torch.testing.assert_close(y.float(), y32, atol=3e-2, rtol=3e-2)
    if module == "LSTM":  # what torch.nn.LSTM does under the same autocast
        theirs = torch.nn.LSTM(6, 8)
        theirs.load_state_dict(ours.state_dict())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert theirs(x)[0].dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------
# Aliasing, and parameters that make NaN
# --------------------------------------------------------------------------------------------


def test_rotary_in_place_with_k_aliasing_q_is_refused():
    cos, sin = _tables()
    q = torch.randn(1, 2, 1, 8)
    before = q.clone()
    with pytest.raises(ValueError, match="rotate it twice"):
        fastseq.apply_rotary(q, q, cos, sin, inplace=True)
    assert torch.equal(q, before)


@pytest.mark.parametrize("kwargs,match", [
    (dict(base=0), "base"), (dict(base=float("nan")), "base"), (dict(base=1.0), "base"),
    (dict(scaling={"rope_type": "linear", "factor": 0.0}), "factor"),
    (dict(scaling={"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 0}),
     "original_max_position_embeddings"),
    (dict(max_cached_positions=0), "max_cached_positions"),
])
def test_rotary_embedding_refuses_parameters_that_make_nan(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastseq.nn.RotaryEmbedding(8, **kwargs)


@pytest.mark.parametrize("args,kwargs,match", [
    ((30, 4), {}, "multiple of num_heads"), ((32, 0), {}, "num_heads"),
    ((32, 4), {"head_dim": 0}, "head_dim"), ((32, 4, 3), {}, "multiple of"),
])
def test_attention_module_refuses_a_head_split_that_drops_features(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastseq.nn.Attention(*args, **kwargs)


def test_attention_module_takes_an_explicit_head_dim():
    assert fastseq.nn.Attention(30, 4, head_dim=8).q_proj.out_features == 32


# --------------------------------------------------------------------------------------------
# Bounded allocation
# --------------------------------------------------------------------------------------------


DYNAMIC = RopeScaling("dynamic", factor=2.0, original_max_position_embeddings=16)


@pytest.mark.parametrize("scaling", [None, DYNAMIC], ids=["plain", "dynamic"])
def test_rotary_embedding_far_positions_are_computed_not_cached(scaling):
    rope = fastseq.nn.RotaryEmbedding(8, scaling=scaling, max_cached_positions=64)
    q = torch.randn(2, 3, 2, 8)
    far = torch.tensor([[5, 2**40, 7], [2**22, 0, 1]])
    q_out, _ = rope(q, positions=far)
    for _, cos, _ in rope._tables.values():
        assert cos.shape[0] <= 64
    inv_freq, _ = rope.inverse_frequencies(2**40 + 1)
    angles = far.float()[..., None] * inv_freq
    want, _ = ref.apply_rotary(q, None, angles.cos(), angles.sin())
    torch.testing.assert_close(q_out, want)
    with pytest.raises(ValueError, match="max_cached_positions"):
        rope.cos_sin(65)


def test_rotary_embedding_cache_stops_at_its_limit():
    rope = fastseq.nn.RotaryEmbedding(8, max_cached_positions=100)
    cos, _ = rope.cos_sin(70)  # the next power of two would be 128
    assert cos.shape[0] == 100


# --------------------------------------------------------------------------------------------
# Errors a user can act on
# --------------------------------------------------------------------------------------------


def test_kv_cache_append_without_cache_lengths_says_so():
    cache = torch.zeros(1, 2, 8, 4)
    with pytest.raises(ValueError, match="fastseq kv_cache_append: cache_lengths is required"):
        fastseq.kv_cache_append(cache, cache.clone(), torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4),
                                None)


def test_key_lengths_as_a_list_are_taken_as_a_tensor():
    q, k, v = torch.randn(2, 2, 3, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    want = fastseq.attention(q, k, v, key_lengths=torch.tensor([5, 2]))
    torch.testing.assert_close(fastseq.attention(q, k, v, key_lengths=[5, 2]), want)


def test_cross_attention_errors_name_cross_attention():
    from fastseq.ops.cross_attention import cross_attention, feature_map_heads

    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="fastseq cross_attention: context_lengths must lie"):
        cross_attention(q, k, k, context_lengths=torch.tensor([9]))
    with pytest.raises(ValueError, match="fastseq cross_attention: heads must be a positive int"):
        feature_map_heads(torch.randn(1, 4, 2, 2), 0)


# --------------------------------------------------------------------------------------------
# Derivatives: refused where they would come back wrong
# --------------------------------------------------------------------------------------------


def _attention_calls():
    from fastseq.ops.cross_attention import cross_attention

    cos, sin = _tables(8, 4)
    return {
        "rotary": lambda x: fastseq.apply_rotary(x.view(1, 8, 2, 8), None, cos, sin)[0],
        "attention": lambda x: fastseq.attention(x, x, x),
        "cross_attention": lambda x: cross_attention(x, x, x),
    }


@pytest.mark.parametrize("op", ["rotary", "attention", "cross_attention"])
def test_forward_mode_ad_is_refused_not_zero(op):
    from torch.autograd import forward_ad

    call = _attention_calls()[op]
    x, tangent = torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8)
    with pytest.raises(ValueError, match=f"fastseq {op}: torch.func.jvp"):
        torch.func.jvp(call, (x,), (tangent,))
    with forward_ad.dual_level(), pytest.raises(ValueError, match=f"fastseq {op}: forward-mode AD"):
        call(forward_ad.make_dual(x, tangent))


@pytest.mark.parametrize("op", ["rotary", "attention", "cross_attention"])
def test_torch_func_grad_is_refused_with_a_clear_error(op):
    call = _attention_calls()[op]
    with pytest.raises(ValueError, match=f"fastseq {op}: torch.func.grad"):
        torch.func.grad(lambda x: call(x).sum())(torch.randn(1, 2, 8, 8))


# --------------------------------------------------------------------------------------------
# Padding is never read: NaN past the lengths stays out of every output and gradient
# --------------------------------------------------------------------------------------------

BACKENDS = ["reference", "cpu", "triton"]


def _poisoned(t, lengths):
    """A copy of k or v ``(B, H, L, D)`` with NaN at every position at or past ``lengths[b]``."""
    t = t.clone()
    for b, n in enumerate(lengths):
        t[b, :, n:] = float("nan")
    return t


def _nan_padding_case(lq=5, lk=9, heads=4, kv_heads=2):
    q = torch.randn(2, heads, lq, 8)
    k, v = torch.randn(2, kv_heads, lk, 8), torch.randn(2, kv_heads, lk, 8)
    lengths = [6, 3]
    return q, k, v, lengths


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_attention_never_reads_padded_keys_or_values(backend, causal):
    q, k, v, lengths = _nan_padding_case()
    kwargs = dict(key_lengths=torch.tensor(lengths), causal=causal, causal_alignment="bottom_right")
    want = fastseq.attention(q, k, v, **kwargs)
    with fastseq.use_backend(backend):
        q_, k_, v_ = q.clone().requires_grad_(), _poisoned(k, lengths), _poisoned(v, lengths)
        k_.requires_grad_(), v_.requires_grad_()
        out = fastseq.attention(q_, k_, v_, **kwargs)
        out.sum().backward()
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(q_.grad).all() and torch.isfinite(k_.grad).all()
    for grad in (k_.grad, v_.grad):
        assert (grad[0, :, 6:] == 0).all() and (grad[1, :, 3:] == 0).all()
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows", [1, 3])
def test_attention_decode_never_reads_unwritten_cache_slots(backend, rows):
    from fastseq.ops.attention_decode import attention_decode

    q, k, v, lengths = _nan_padding_case(lq=rows, lk=12)
    want = fastseq.attention(q, k, v, causal=True, causal_alignment="bottom_right",
                             key_lengths=torch.tensor(lengths))
    with fastseq.use_backend(backend):
        out = attention_decode(q, _poisoned(k, lengths), _poisoned(v, lengths),
                               torch.tensor(lengths))
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_cross_attention_never_reads_padded_context(backend):
    from fastseq.ops.cross_attention import cross_attention

    q, k, v, lengths = _nan_padding_case(heads=2)
    want = cross_attention(q, k, v, context_lengths=torch.tensor(lengths))
    with fastseq.use_backend(backend):
        k_, v_ = _poisoned(k, lengths).requires_grad_(), _poisoned(v, lengths).requires_grad_()
        q_ = q.clone().requires_grad_()
        out = cross_attention(q_, k_, v_, context_lengths=torch.tensor(lengths))
        out.sum().backward()
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    for grad in (q_.grad, k_.grad, v_.grad):
        assert torch.isfinite(grad).all()


def test_attention_module_cache_with_uninitialised_slots():
    """A KVCache whose unwritten slots hold NaN (torch.empty memory) decodes as a zeroed one."""
    from fastseq.nn import Attention
    from fastseq.nn.attention import KVCache

    layer = Attention(16, 4, 2, rotary=True).eval()
    x = torch.randn(2, 5, 16)
    clean, dirty = layer.new_cache(2, 12), layer.new_cache(2, 12)
    dirty = KVCache(dirty.k.fill_(float("nan")), dirty.v.fill_(float("nan")), dirty.lengths)
    with torch.no_grad():
        for cache in (clean, dirty):
            layer(x[:, :3], cache=cache)
        want, got = layer(x[:, 3:], cache=clean), layer(x[:, 3:], cache=dirty)
    torch.testing.assert_close(got, want)
    assert torch.isfinite(got).all()


# --------------------------------------------------------------------------------------------
# Precision: float64 stays float64-accurate, gradients included
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("lengths", [None, [5, 3]])
def test_float64_attention_gradients_are_float64_accurate(backend, lengths):
    from fastseq.reference import attention as reference

    q, k, v = (torch.randn(2, 2, 6, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    key_lengths = None if lengths is None else torch.tensor(lengths)
    with fastseq.use_backend(backend):
        out, lse = fastseq.attention(q, k, v, causal=True, key_lengths=key_lengths, return_lse=True)
    assert lse.dtype == torch.float64
    want, _ = reference.attention(q, k, v, causal=True, key_lengths=key_lengths)
    for got, exact in zip(torch.autograd.grad(out.sum(), (q, k, v)),
                          torch.autograd.grad(want.sum(), (q, k, v)), strict=True):
        torch.testing.assert_close(got, exact, atol=1e-12, rtol=1e-12)


def test_float64_decode_and_cross_attention_keep_a_float64_lse():
    from fastseq.ops.attention_decode import attention_decode
    from fastseq.ops.cross_attention import cross_attention

    q, k, v = (torch.randn(1, 2, 3, 8, dtype=torch.float64) for _ in range(3))
    for op in (lambda: attention_decode(q, k, v, None, return_lse=True),
               lambda: cross_attention(q, k, v, return_lse=True)):
        assert op()[1].dtype == torch.float64


@pytest.mark.parametrize("name,bad", [
    ("w_hh", lambda w: w.double()), ("bias", lambda b: b.half()), ("h0", lambda h: h.double()),
    ("w_ih", lambda w: w[:, :-1]), ("c0", lambda c: c[:1]),
])
def test_lstm_layer_op_refuses_inputs_it_would_cast_or_misread(name, bad):
    from fastseq.ops.lstm import lstm_layer

    args = dict(x=torch.randn(5, 3, 6), h0=torch.zeros(3, 8), c0=torch.zeros(3, 8),
                w_ih=torch.randn(32, 6), w_hh=torch.randn(32, 8), bias=torch.randn(32))
    args[name] = bad(args[name])
    with pytest.raises(ValueError, match=f"fastseq lstm_layer: {name} must"):
        lstm_layer(**args)


# --------------------------------------------------------------------------------------------
# Errors a user can act on: every entry point names the argument, the expected and the received
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["LSTM", "LayerNormLSTM"])
@pytest.mark.parametrize("kwargs,match", [
    (dict(num_layers=0), "num_layers must be an int >= 1, got 0"),
    (dict(hidden_size=0), "hidden_size must be an int >= 1, got 0"),
    (dict(num_layers=1.5), "num_layers must be an int >= 1, got 1.5"),
])
def test_lstm_constructor_refuses_sizes_that_build_nothing(module, kwargs, match):
    args = dict(input_size=4, hidden_size=8)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        getattr(fastseq.nn, module)(**args)


def test_cross_attention_and_spatial_transformer_name_a_context_of_the_wrong_width():
    cross = fastseq.nn.CrossAttention(16, 12, heads=2, head_dim=8)
    with pytest.raises(ValueError, match=r"fastseq CrossAttention: context must be \(B, L, 12\)"):
        cross(torch.randn(2, 5, 16), torch.randn(2, 3, 10))
    block = fastseq.nn.SpatialTransformer(32, 2, 8, context_dim=12, num_groups=8)
    with pytest.raises(ValueError, match=r"fastseq SpatialTransformer: context must be \(B, L, 12\)"):
        block(torch.randn(2, 32, 4, 4), torch.randn(2, 3, 10))
    with pytest.raises(ValueError, match=r"x must be a \(B, 32, H, W\) feature map"):
        block(torch.randn(2, 16, 4, 4), torch.randn(2, 3, 12))


@pytest.mark.parametrize("shapes,match", [
    (((2, 5, 16), (2, 5, 12), (2, 5, 12)), "key must be 3-D with 16 features"),
    (((2, 5, 16), (3, 5, 16), (3, 5, 16)), "must agree in batch"),
    (((2, 5, 16), (2, 5, 16), (2, 4, 16)), "key and value must have the same length"),
])
def test_multihead_attention_fused_path_checks_shapes(shapes, match):
    mha = fastseq.nn.MultiheadAttention(16, 2, batch_first=True)
    with pytest.raises(ValueError, match=match):
        mha(*(torch.randn(s) for s in shapes), need_weights=False)


@pytest.mark.parametrize("q_shape,kv_shape,gqa", [
    ((2, 4, 3, 8), (1, 4, 5, 8), False), ((1, 4, 3, 8), (2, 1, 5, 8), False),
    ((2, 1, 3, 8), (2, 4, 5, 8), False), ((1, 4, 3, 8), (3, 2, 5, 8), True),
])
def test_sdpa_drop_in_broadcasts_batch_and_heads_as_torch_does(q_shape, kv_shape, gqa):
    import torch.nn.functional as F

    q, k, v = torch.randn(q_shape), torch.randn(kv_shape), torch.randn(kv_shape)
    want = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    got = fastseq.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_sdpa_drop_in_names_heads_that_do_not_broadcast():
    q, kv = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 5, 8)
    with pytest.raises(ValueError, match="enable_gqa=True"):
        fastseq.nn.functional.scaled_dot_product_attention(q, kv, kv)


@pytest.mark.parametrize("seed", [2**70, -1, 1.5, True])
def test_attention_seed_out_of_range_is_named(seed):
    x = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*63\)"):
        fastseq.attention(x, x, x, dropout_p=0.1, seed=seed)


def test_meta_tensors_give_shapes_without_reading_values():
    """Value checks (lengths, positions, aliasing) are skipped where there are no values."""
    m = torch.empty(2, 2, 5, 8, device="meta")
    lengths = torch.tensor([3, 4], device="meta")
    assert fastseq.attention(m, m, m, key_lengths=lengths).shape == m.shape
    assert fastseq.attention_decode(m, m, m, lengths).shape == m.shape
    table = torch.empty(8, 4, device="meta")
    assert fastseq.apply_rotary(m, m, table, table, positions=lengths)[0].shape == m.shape
    lstm = fastseq.nn.LSTM(8, 8, device="meta")
    assert lstm(torch.empty(5, 2, 8, device="meta"), lengths=lengths)[0].shape == (5, 2, 8)
    with pytest.raises(ValueError, match="meta device"):
        fastseq.nn.RotaryEmbedding(8)(m, positions=lengths)


@pytest.mark.parametrize("op", ["attention", "attention_decode", "cross_attention", "sdpa"])
def test_head_dim_zero_gives_an_empty_output_as_torch_does(op):
    z = torch.randn(1, 2, 3, 0)
    call = {"attention": lambda: fastseq.attention(z, z, z),
            "attention_decode": lambda: fastseq.attention_decode(z, z, z, None),
            "cross_attention": lambda: fastseq.cross_attention(z, z, z),
            "sdpa": lambda: fastseq.nn.functional.scaled_dot_product_attention(z, z, z)}[op]
    assert call().shape == (1, 2, 3, 0)


def test_attention_scale_must_be_finite():
    x = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        fastseq.attention(x, x, x, scale=float("nan"))


@pytest.mark.parametrize("kwargs", [dict(heads=0), dict(head_dim=0)])
def test_cross_attention_module_refuses_empty_heads(kwargs):
    with pytest.raises(ValueError, match="fastseq CrossAttention: head"):
        fastseq.nn.CrossAttention(16, 12, **kwargs)
