"""Property-based tests: the ops against their references over random shapes, strides, dtypes,
masks and lengths (NaN in the padding included), drawn by hypothesis."""

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from op_samples import nan_past

import fastseq
from fastseq.reference import attention as attention_reference
from fastseq.reference import rotary as rotary_reference

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)
BACKENDS = st.sampled_from(["reference", "cpu", "triton"])
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


def _layout(t, transposed):
    """``t`` itself or a copy with the same values whose dims 1 and 2 are swapped in memory."""
    return t.transpose(1, 2).contiguous().transpose(1, 2) if transposed else t


@st.composite
def attention_cases(draw):
    batch = draw(st.integers(0, 3))
    kv_heads = draw(st.integers(1, 2))
    heads = kv_heads * draw(st.integers(1, 3))
    lq, lk, dim = draw(st.integers(1, 12)), draw(st.integers(1, 12)), draw(st.integers(1, 24))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    q = _layout(torch.randn(batch, heads, lq, dim, dtype=dtype), draw(st.booleans()))
    k = torch.randn(batch, kv_heads, lk, dim, dtype=dtype)
    v = torch.randn(batch, kv_heads, lk, dim, dtype=dtype)
    kwargs = dict(causal=draw(st.booleans()),
                  causal_alignment=draw(st.sampled_from(["top_left", "bottom_right"])))
    if draw(st.booleans()):
        lengths = draw(st.lists(st.integers(0, lk), min_size=batch, max_size=batch))
        k, v = nan_past(k, lengths), nan_past(v, lengths)
        kwargs["key_lengths"] = torch.tensor(lengths, dtype=torch.long)
    if draw(st.booleans()):
        kwargs["attn_mask"] = torch.rand(lq, lk) > 0.3
    return q, _layout(k, draw(st.booleans())), v, kwargs


@SETTINGS
@given(case=attention_cases(), backend=BACKENDS)
def test_attention_matches_reference(case, backend):
    q, k, v, kwargs = case
    want, _ = attention_reference.attention(
        q, k, v, causal=kwargs["causal"], bottom_right=kwargs["causal_alignment"] == "bottom_right",
        attn_mask=kwargs.get("attn_mask"), key_lengths=kwargs.get("key_lengths"))
    with fastseq.use_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = fastseq.attention(q, k, v, **kwargs)
    assert torch.isfinite(got).all()
    tol = TOLERANCE[q.dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@st.composite
def rotary_cases(draw):
    batch, seqlen = draw(st.integers(0, 3)), draw(st.integers(1, 9))
    heads, kv_heads = draw(st.integers(1, 4)), draw(st.integers(0, 2))
    dim = 2 * draw(st.integers(1, 12))
    pairs = draw(st.integers(1, dim // 2))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    layout = draw(st.sampled_from(["bnhd", "bhnd"]))
    shape = (batch, seqlen, heads, dim) if layout == "bnhd" else (batch, heads, seqlen, dim)
    q = torch.randn(shape, dtype=dtype)
    k = None
    if kv_heads:
        k_shape = list(shape)
        k_shape[2 if layout == "bnhd" else 1] = kv_heads
        k = torch.randn(k_shape, dtype=dtype)
    table = 24
    angles = torch.outer(torch.arange(table, dtype=torch.float32), torch.rand(pairs))
    kind = draw(st.sampled_from(["none", "offsets", "ids"]))
    positions = None
    if kind == "offsets":
        positions = torch.tensor(draw(st.lists(st.integers(0, table - seqlen), min_size=batch,
                                               max_size=batch)), dtype=torch.long)
    elif kind == "ids":
        positions = torch.randint(0, table, (batch, seqlen))
    kwargs = dict(positions=positions, interleaved=draw(st.booleans()), layout=layout)
    return q, k, angles.cos(), angles.sin(), kwargs


@SETTINGS
@given(case=rotary_cases(), backend=BACKENDS)
def test_rotary_matches_reference(case, backend):
    q, k, cos, sin, kwargs = case
    want = rotary_reference.apply_rotary(q, k, cos, sin, **kwargs)
    with fastseq.use_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = fastseq.apply_rotary(q, k, cos, sin, **kwargs)
    tol = TOLERANCE[q.dtype]
    for g, w in zip(got, want, strict=True):
        if w is None:
            assert g is None
            continue
        torch.testing.assert_close(g.float(), w.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@SETTINGS
@given(steps=st.integers(1, 6), batch=st.integers(0, 4), hidden=st.integers(1, 9),
       reverse=st.booleans(), data=st.data())
def test_lstm_layer_matches_reference(backend, steps, batch, hidden, reverse, data):
    from fastseq.ops.lstm import lstm_layer
    from fastseq.reference.lstm import lstm_layer as reference_layer

    lengths = torch.tensor(data.draw(st.lists(st.integers(0, steps), min_size=batch,
                                              max_size=batch)), dtype=torch.long)
    args = (torch.randn(steps, batch, 5), torch.randn(batch, hidden), torch.randn(batch, hidden),
            torch.randn(4 * hidden, 5) / 3, torch.randn(4 * hidden, hidden) / 3,
            torch.randn(4 * hidden) / 3)
    want = reference_layer(*args, lengths=lengths, reverse=reverse)
    with fastseq.use_backend(backend):
        got = lstm_layer(*args, lengths=lengths, reverse=reverse)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=2e-5)
