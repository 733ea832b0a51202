"""fastseq as a transformers attention backend, checked against ``attn_implementation="sdpa"`` on
the same weights: logits of padded batches, greedy generation, and a Liger-style convergence
test (the same 32 AdamW steps on real text, compared step by step)."""

import pydoc_data.topics

import pytest
import torch
import torch.nn.functional as F
import transformers
from test_gpt import VOCAB, _hf_model

import fastseq
import fastseq.integrations.transformers as integration

FLAVOURS = ["gpt2", "llama", "mistral", "qwen2"]


def _pair(flavour, dtype=torch.float32, **overrides):
    """(sdpa model, fastseq model) with the same weights."""
    integration.register()
    torch.manual_seed(0)
    sdpa = _hf_model(flavour, **overrides).to(dtype)
    torch.manual_seed(0)
    ours = _hf_model(flavour, **overrides).to(dtype)
    ours.set_attn_implementation("fastseq")
    return sdpa, ours


def _left_padded_batch():
    ids = torch.randint(2, VOCAB, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :11] = 0
    return ids, mask


def test_register_is_idempotent_and_adds_a_mask_function():
    from transformers.masking_utils import AttentionMaskInterface

    integration.register()
    integration.register()
    assert integration.is_registered()
    assert "fastseq" in AttentionMaskInterface._global_mapping


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_padded_logits_match_sdpa(flavour, backend):
    sdpa, ours = _pair(flavour)
    ids, mask = _left_padded_batch()
    with torch.no_grad():
        want = sdpa(ids, attention_mask=mask).logits
        with fastseq.use_backend(backend):
            got = ours(ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_greedy_generate_matches_sdpa(flavour):
    sdpa, ours = _pair(flavour)
    ids, mask = _left_padded_batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **kwargs), sdpa.generate(ids, **kwargs))


def test_the_backend_is_what_runs():
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[1].shape)
        return integration.fastseq_attention_forward(*args, **kwargs)

    _, ours = _pair("llama")
    transformers.AttentionInterface.register("fastseq", counting)
    try:
        with torch.no_grad():
            ours(torch.randint(0, VOCAB, (1, 5)))
    finally:
        integration.register()
    assert len(calls) == ours.config.num_hidden_layers
    assert calls[0][1] == ours.config.num_attention_heads  # query heads; k/v keep their own


def test_apply_swaps_attention_and_rotary_in_place():
    import transformers.models.llama.modeling_llama as modelling

    original = modelling.apply_rotary_pos_emb
    torch.manual_seed(0)
    sdpa = _hf_model("llama")
    torch.manual_seed(0)
    model = _hf_model("llama")
    try:
        assert integration.apply(model) is model
        assert model.config._attn_implementation == "fastseq"
        assert modelling.apply_rotary_pos_emb is fastseq.apply_rotary_pos_emb
        ids, mask = _left_padded_batch()
        with torch.no_grad():
            got, want = model(ids, attention_mask=mask).logits, sdpa(ids, attention_mask=mask).logits
        keep = mask.bool()
        torch.testing.assert_close(got[keep], want[keep], atol=2e-5, rtol=2e-5)
    finally:
        modelling.apply_rotary_pos_emb = original


def test_bidirectional_model_is_not_made_causal():
    integration.register()
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=48)
    torch.manual_seed(0)
    sdpa = transformers.BertModel(config).eval()
    torch.manual_seed(0)
    ours = transformers.BertModel(config).eval()
    ours.set_attn_implementation("fastseq")
    ids, mask = _left_padded_batch()
    with torch.no_grad():
        got = ours(ids, attention_mask=mask).last_hidden_state
        want = sdpa(ids, attention_mask=mask).last_hidden_state
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], atol=2e-5, rtol=2e-5)


def test_attention_dropout_runs_in_training_only():
    _, ours = _pair("llama", attention_dropout=0.5)
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        evaluated = ours(ids).logits
        ours.train()
        trained = ours(ids).logits
    assert torch.isfinite(trained).all()
    assert not torch.allclose(trained, evaluated)


# --------------------------------------------------------------------------------------------
# Convergence: the same training run through both backends, compared step by step
# --------------------------------------------------------------------------------------------

STEPS = 32


def _text_batches(batches=STEPS + 1, batch=4, length=24):
    """Byte tokens of Python's bundled documentation, folded into the small vocabulary."""
    text = " ".join(pydoc_data.topics.topics.values()).encode()[: batches * batch * length]
    tokens = torch.tensor(list(text), dtype=torch.long) % VOCAB
    return tokens.view(batches, batch, length)


def _train(model, data):
    """Per-step losses, the top-5 log-probabilities on a held-out batch, the final parameters."""
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for batch in data[:STEPS]:
        logits = model(batch).logits.float()
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        logprobs = model(data[STEPS]).logits.float().log_softmax(-1).topk(5, dim=-1).values
    return torch.tensor(losses), logprobs, [p.detach().float() for p in model.parameters()]


# (losses, top-k log-probabilities, parameters): float32 agrees to rounding; bfloat16 rounds
# every activation, so two backends' runs part by more over 32 steps.
TOLERANCES = {torch.float32: (1e-5, 1e-4, 1e-4), torch.bfloat16: (5e-2, 2e-1, 5e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_training_converges_as_with_sdpa(flavour, dtype):
    data = _text_batches()
    # No dropout: the two backends draw their masks differently.
    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0) if flavour == "gpt2" else {}
    sdpa, ours = _pair(flavour, dtype, **no_dropout)
    want, got = _train(sdpa, data), _train(ours, data)
    loss_tol, logprob_tol, param_tol = TOLERANCES[dtype]
    assert want[0][-1] < want[0][0] - 0.5  # the run learns something
    torch.testing.assert_close(got[0], want[0], atol=loss_tol, rtol=loss_tol)
    torch.testing.assert_close(got[1], want[1], atol=logprob_tol, rtol=logprob_tol)
    for a, b in zip(got[2], want[2], strict=True):
        torch.testing.assert_close(a, b, atol=param_tol, rtol=param_tol)
