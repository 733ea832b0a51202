"""fastseq.nn.Transformer and its parts against torch.nn's: weights, outputs, gradients, masks,
incremental decoding, errors."""

import pytest
import torch
from tolerance import assert_within_rule
from torch import nn

import fastseq.nn as fnn

D_MODEL, HEADS, FF = 32, 4, 48

# torch.nn's notes on its own fast paths and mask types, not about fastseq
pytestmark = pytest.mark.filterwarnings("ignore:.*(nested_tensor|mismatched).*:UserWarning")


def _pair(kind, dtype=torch.float32, **options):
    """A torch.nn module and the fastseq one holding the same weights (built from one seed)."""
    options = dict(dropout=0.0, **options)
    if kind == "transformer":
        build = lambda lib: lib.Transformer(D_MODEL, HEADS, 2, 2, FF, **options)  # noqa: E731
    else:
        build = lambda lib: getattr(lib, kind)(D_MODEL, HEADS, FF, **options)  # noqa: E731
    torch.manual_seed(0)
    ref = build(nn).to(dtype)
    torch.manual_seed(0)
    ours = build(fnn).to(dtype)
    return ref, ours


def _as_layout(x, batch_first):
    return x if batch_first else x.transpose(0, 1)


def _inputs(batch_first, dtype=torch.float32, batch=3, src_len=11, tgt_len=7):
    src = torch.randn(batch, src_len, D_MODEL, dtype=dtype)
    tgt = torch.randn(batch, tgt_len, D_MODEL, dtype=dtype)
    src_padding = torch.arange(src_len) >= torch.tensor([[11], [6], [1]])  # True = padding
    return _as_layout(src, batch_first), _as_layout(tgt, batch_first), src_padding


@pytest.mark.parametrize("kind", ["transformer", "TransformerEncoderLayer", "TransformerDecoderLayer"])
def test_same_seed_gives_the_same_weights_and_state_dicts_load_both_ways(kind):
    ref, ours = _pair(kind)
    ref_state, our_state = ref.state_dict(), ours.state_dict()
    assert list(our_state) == list(ref_state)
    for name, value in ref_state.items():
        assert torch.equal(our_state[name], value), name
    ref.load_state_dict(our_state)
    ours.load_state_dict(ref_state)


def _transformer_outputs(model, src, tgt, src_padding, batch_first):
    tgt_len = tgt.shape[1] if batch_first else tgt.shape[0]
    mask = nn.Transformer.generate_square_subsequent_mask(tgt_len, dtype=src.dtype)
    return model(src, tgt, tgt_mask=mask, src_key_padding_mask=src_padding,
                 memory_key_padding_mask=src_padding, tgt_is_causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_transformer_output_and_gradients_match_torch(batch_first, norm_first, dtype):
    options = dict(batch_first=batch_first, norm_first=norm_first)
    truth_model, _ = _pair("transformer", torch.float64, **options)
    ref, ours = _pair("transformer", dtype, **options)
    src, tgt, padding = _inputs(batch_first, torch.float64)
    grad = torch.randn_like(tgt)

    def run(model):
        model.zero_grad()
        out = _transformer_outputs(model, src.to(model.decoder.norm.weight.dtype),
                                   tgt.to(model.decoder.norm.weight.dtype), padding, batch_first)
        out.backward(grad.to(out.dtype))
        return out.detach(), {name: p.grad for name, p in model.named_parameters()}

    truth, truth_grads = run(truth_model)
    low, low_grads = run(ref)
    got, got_grads = run(ours)
    assert_within_rule(got, truth, low, "output")
    for name, g in got_grads.items():
        assert_within_rule(g, truth_grads[name], low_grads[name], name, factor=3.0)


def test_the_final_norms_are_there_even_post_norm():
    _, ours = _pair("transformer", norm_first=False)
    assert isinstance(ours.encoder.norm, nn.LayerNorm) and isinstance(ours.decoder.norm, nn.LayerNorm)


def _masks(length, source):
    causal_bool = torch.ones(length, source, dtype=torch.bool).triu(1)
    additive = torch.randn(length, source).masked_fill(torch.rand(length, source) < 0.2, float("-inf"))
    additive[:, 0] = 0.0  # every query keeps the first key (never padded)
    per_head = torch.randn(3 * HEADS, length, source)
    return {"none": None, "bool": causal_bool, "additive": additive, "per_head": per_head}


@pytest.mark.parametrize("mask", ["none", "bool", "additive", "per_head"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_encoder_layer_masks_match_torch(batch_first, mask):
    ref, ours = _pair("TransformerEncoderLayer", batch_first=batch_first)
    ref.train(), ours.train()  # torch's inference fast path writes zeros at padded positions
    src, _, padding = _inputs(batch_first)
    attn_mask = _masks(11, 11)[mask]
    got = ours(src, src_mask=attn_mask, src_key_padding_mask=padding)
    want = ref(src, src_mask=attn_mask, src_key_padding_mask=padding)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
def test_decoder_layer_with_every_mask_matches_torch(norm_first):
    ref, ours = _pair("TransformerDecoderLayer", batch_first=True, norm_first=norm_first)
    memory, tgt, padding = _inputs(True)
    masks = _masks(7, 11)
    kwargs = dict(tgt_mask=_masks(7, 7)["additive"], memory_mask=masks["bool"],
                  tgt_key_padding_mask=torch.zeros(3, 7, dtype=torch.bool),
                  memory_key_padding_mask=padding)
    kwargs["memory_mask"][:, 0] = False  # every query keeps the first (never padded) memory slot
    torch.testing.assert_close(ours(tgt, memory, **kwargs), ref(tgt, memory, **kwargs),
                               atol=2e-5, rtol=1e-4)


def test_unbatched_inputs_match_torch():
    ref, ours = _pair("transformer", batch_first=True)
    src, tgt = torch.randn(9, D_MODEL), torch.randn(5, D_MODEL)
    mask = nn.Transformer.generate_square_subsequent_mask(5)
    torch.testing.assert_close(ours(src, tgt, tgt_mask=mask), ref(src, tgt, tgt_mask=mask),
                               atol=2e-5, rtol=1e-4)


def test_a_causal_mask_is_recognised_and_runs_the_causal_kernel(monkeypatch):
    _, ours = _pair("TransformerEncoderLayer")
    encoder = fnn.TransformerEncoder(ours, 2)
    calls = []
    real = fnn.multihead_attention.attention
    monkeypatch.setattr(fnn.multihead_attention, "attention",
                        lambda *a, **k: calls.append((k["causal"], k["attn_mask"])) or real(*a, **k))
    src = torch.randn(5, 2, D_MODEL)
    encoder(src, mask=nn.Transformer.generate_square_subsequent_mask(5))
    assert calls and all(causal and mask is None for causal, mask in calls)


def _decoder_and_memory(norm_first=False, rotary=None):
    torch.manual_seed(0)
    model = fnn.Transformer(D_MODEL, HEADS, 1, 2, FF, dropout=0.0, batch_first=True,
                            norm_first=norm_first, rotary=rotary).eval()
    src = torch.randn(3, 11, D_MODEL)
    padding = torch.arange(11) >= torch.tensor([[11], [6], [1]])
    memory = model.encoder(src, src_key_padding_mask=padding)
    return model, memory, padding


@pytest.mark.parametrize("rotary", [False, True], ids=["sinusoidal", "rotary"])
@pytest.mark.parametrize("chunks", [[1] * 7, [3, 1, 3], [7]], ids=["token", "mixed", "whole"])
def test_cached_decoding_equals_the_full_decoder(chunks, rotary):
    model, memory, padding = _decoder_and_memory(rotary=fnn.RotaryEmbedding(D_MODEL // HEADS)
                                                 if rotary else None)
    tgt = torch.randn(3, 7, D_MODEL)
    with torch.no_grad():
        full = model.decoder(tgt, memory, tgt_mask=nn.Transformer.generate_square_subsequent_mask(7),
                             memory_key_padding_mask=padding)
        cache = model.decoder.new_cache(memory, 8, memory_key_padding_mask=padding)
        steps, start = [], 0
        for n in chunks:
            steps.append(model.decoder(tgt[:, start:start + n], cache=cache))
            start += n
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-4)
    assert cache.lengths.tolist() == [7, 7, 7]


def test_reordered_cache_follows_the_beams():
    model, memory, padding = _decoder_and_memory(norm_first=True)
    tgt = torch.randn(3, 4, D_MODEL)
    index = torch.tensor([2, 0, 0, 1])
    with torch.no_grad():
        cache = model.decoder.new_cache(memory, 4, memory_key_padding_mask=padding)
        model.decoder(tgt[:, :3], cache=cache)
        cache.reorder(index)
        got = model.decoder(tgt[index, 3:], cache=cache)
        full = model.decoder(tgt[index], memory[index], tgt_is_causal=True,
                             memory_key_padding_mask=padding[index])
    torch.testing.assert_close(got, full[:, 3:], atol=1e-5, rtol=1e-4)


def test_bad_inputs_are_refused_by_name():
    model, memory, padding = _decoder_and_memory()
    with pytest.raises(ValueError, match="src must be"):
        model(torch.randn(2, 5, D_MODEL + 1), torch.randn(2, 3, D_MODEL))
    with pytest.raises(ValueError, match="same batch size"):
        model(torch.randn(2, 5, D_MODEL), torch.randn(3, 3, D_MODEL))
    with pytest.raises(ValueError, match="both be batched"):
        model.decoder(torch.randn(3, D_MODEL), memory)
    cache = model.decoder.new_cache(memory, 2)
    with pytest.raises(ValueError, match="with a cache"):
        model.decoder(torch.randn(3, 1, D_MODEL), cache=cache, tgt_mask=torch.zeros(1, 1))
    with pytest.raises(ValueError, match="overflows the cache"):
        model.decoder(torch.randn(3, 3, D_MODEL), cache=cache)
    with pytest.raises(ValueError, match="max_len"):
        model.decoder.new_cache(memory, 0)
    with pytest.raises(ValueError, match="memory_key_padding_mask must be"):
        model.decoder.new_cache(memory, 4, memory_key_padding_mask=padding[:, :5])
    with pytest.raises(ValueError, match="activation"):
        fnn.TransformerEncoderLayer(D_MODEL, HEADS, activation="swish")
    with pytest.raises(ValueError, match="encoder_layer"):
        fnn.TransformerEncoder(nn.TransformerEncoderLayer(D_MODEL, HEADS), 2)
