"""fastseq.models.GPT against transformers: logits, gradients, generation, checkpoints, errors.

Every reference model is a randomly initialised transformers model of a small config (nothing can
be downloaded); the fastseq model takes its weights through ``GPT.from_hf``.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers
from tolerance import assert_within_rule

from fastseq.models import GPT, GPTConfig
from fastseq.models.gpt_weights import state_dict_from_hf

transformers.logging.set_verbosity_error()

VOCAB = 97
FLAVOURS = ["gpt2", "llama", "mistral", "qwen2"]


def _hf_model(flavour, **overrides):
    """A small random transformers model of ``flavour``, in eval mode (no dropout)."""
    common = dict(vocab_size=VOCAB, initializer_range=0.2)
    if flavour == "gpt2":
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                         bos_token_id=0, eos_token_id=1, **common)
        config.update(overrides)
        model = transformers.GPT2LMHeadModel(config)
    else:
        cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
               "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
               "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[flavour]
        extra = {"mistral": dict(sliding_window=7), "qwen2": dict(tie_word_embeddings=True)}
        config = cls[0](hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, bos_token_id=0,
                        eos_token_id=1, **common, **extra.get(flavour, {}))
        config.update(overrides)
        model = cls[1](config)
    return model.eval()


def _pair(flavour, dtype=torch.float32, **overrides):
    torch.manual_seed(0)
    hf = _hf_model(flavour, **overrides).to(dtype)
    return hf, GPT.from_hf(hf)


def _hf_logits(hf, ids, **kwargs):
    with torch.no_grad():
        return hf(ids, **kwargs).logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_logits_match_transformers(flavour, dtype):
    hf, ours = _pair(flavour, dtype)
    ids = torch.randint(0, VOCAB, (2, 13))  # longer than mistral's window of 7
    torch.manual_seed(0)
    truth = _hf_logits(_hf_model(flavour).double(), ids)  # the same weights, in float64
    with torch.no_grad():
        got = ours(ids)
    assert_within_rule(got, truth, _hf_logits(hf, ids), "logits")


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_padded_batch_gives_each_sequences_own_logits(flavour, side):
    hf, ours = _pair(flavour)
    lengths = [9, 5, 1]
    ids = torch.randint(2, VOCAB, (3, 9))
    mask = torch.zeros(3, 9, dtype=torch.long)
    for row, n in enumerate(lengths):
        (mask[row, 9 - n:] if side == "left" else mask[row, :n]).fill_(1)
    with torch.no_grad():
        logits = ours(ids, attention_mask=mask)
    for row in range(3):
        tokens = mask[row].bool()
        alone = _hf_logits(hf, ids[row, tokens][None])[0]
        torch.testing.assert_close(logits[row, tokens], alone, atol=2e-5, rtol=2e-5)
        assert torch.isfinite(logits[row]).all()


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_parameter_gradients_match_transformers(flavour):
    hf, ours = _pair(flavour)
    torch.manual_seed(0)
    truth_model = _hf_model(flavour).double()
    ids = torch.randint(0, VOCAB, (2, 12))

    def grads(model, logits_of):
        model.zero_grad()
        logits = logits_of(model)
        F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
        return {name: p.grad for name, p in model.named_parameters()}

    def hf_logits(model):
        return model(ids).logits

    config = ours.config
    truth = state_dict_from_hf(config, grads(truth_model, hf_logits))
    low = state_dict_from_hf(config, grads(hf, hf_logits))
    got = grads(ours, lambda model: model(ids))
    assert set(got) <= set(truth)
    for name, grad in got.items():
        assert_within_rule(grad, truth[name], low[name], name, factor=3.0)


def _left_padded(prompts):
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    return ids, mask


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_greedy_generate_equals_transformers_token_for_token(flavour):
    hf, ours = _pair(flavour)
    torch.manual_seed(1)
    prompts = [torch.randint(2, VOCAB, (n,)).tolist() for n in (6, 3, 9)]
    ids, mask = _left_padded(prompts)
    out = ours.generate(ids, 12, attention_mask=mask)
    assert out.shape == (3, 9 + 12)
    assert torch.equal(out[:, :9], ids)
    for row, prompt in enumerate(prompts):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                               pad_token_id=0, eos_token_id=None)
        assert out[row, 9:].tolist() == want[0, len(prompt):].tolist()


def _no_cache_greedy(model, prompt, steps):
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    return tokens[len(prompt):]


@pytest.mark.parametrize("flavour", ["gpt2", "llama", "mistral"])
def test_generate_equals_a_loop_that_recomputes_the_prefix(flavour):
    _, ours = _pair(flavour)
    prompt = torch.randint(2, VOCAB, (5,)).tolist()
    out = ours.generate(torch.tensor([prompt]), 10)
    assert out[0, 5:].tolist() == _no_cache_greedy(ours, prompt, 10)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_chunked_prefill_gives_the_logits_of_one_forward(flavour):
    _, ours = _pair(flavour)
    ids = torch.randint(0, VOCAB, (2, 20))
    cache = ours.new_cache(2, 24)
    with torch.no_grad():
        whole = ours(ids)
        chunks = [ours(ids[:, a:b], cache=cache) for a, b in ((0, 10), (10, 14), (14, 20))]
    torch.testing.assert_close(torch.cat(chunks, dim=1), whole, atol=2e-5, rtol=2e-5)


def test_eos_stops_each_row_and_fills_it():
    _, ours = _pair("llama")
    prompt = torch.randint(2, VOCAB, (1, 4))
    free = ours.generate(prompt, 6)[0, 4:].tolist()
    eos = free[2]  # the third new token
    out = ours.generate(torch.cat([prompt, prompt]), 6, eos_token_id=eos)
    stop = free.index(eos)
    assert out[0, 4:4 + stop + 1].tolist() == free[:stop + 1]
    assert out.shape[1] == 4 + stop + 1  # every row stopped: no more steps


def test_batches_of_different_sizes_between_calls():
    _, ours = _pair("llama")
    prompts = [torch.randint(2, VOCAB, (n,)).tolist() for n in (4, 7, 2)]
    alone = [ours.generate(torch.tensor([p]), 5)[0, len(p):].tolist() for p in prompts]
    for rows in ([0, 1, 2], [1], [2, 0]):
        ids, mask = _left_padded([prompts[r] for r in rows])
        out = ours.generate(ids, 5, attention_mask=mask)
        assert [out[i, ids.shape[1]:].tolist() for i in range(len(rows))] == [alone[r] for r in rows]


def test_sampling_is_reproducible_and_respects_top_k():
    _, ours = _pair("gpt2")
    prompt = torch.randint(2, VOCAB, (2, 3))
    draws = [ours.generate(prompt, 8, temperature=1.0, top_k=1,
                           generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    assert torch.equal(draws[0], draws[1])  # top_k=1 is greedy whatever the draw
    assert torch.equal(draws[0], ours.generate(prompt, 8))
    a, b = (ours.generate(prompt, 8, temperature=1.5, top_p=0.9,
                          generator=torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(a, b)


def test_decode_step_compiles_with_fullgraph():
    _, ours = _pair("llama")
    cache = ours.new_cache(2, 16)
    with torch.no_grad():
        ours(torch.randint(0, VOCAB, (2, 5)), cache=cache)
        want_cache = [type(c)(c.k.clone(), c.v.clone(), c.lengths.clone()) for c in cache]
        token = torch.randint(0, VOCAB, (2, 1))
        step = torch.compile(lambda t, c: ours(t, cache=c), fullgraph=True, backend="aot_eager")
        got = step(token, cache)
        want = ours(token, cache=want_cache)
    torch.testing.assert_close(got, want)


def test_compiled_generate_equals_eager_generate():
    """generate(compile=True) runs the decode step through inductor; on a padded batch of prompts
    it gives the eager tokens, and a prompt of another length reuses the compiled step."""
    for flavour in ("llama", "gpt2"):
        _, ours = _pair(flavour)
        prompt = torch.randint(0, VOCAB, (2, 6))
        mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
        for length in (6, 4):
            want = ours.generate(prompt[:, :length], 9, attention_mask=mask[:, :length])
            got = ours.generate(prompt[:, :length], 9, attention_mask=mask[:, :length], compile=True)
            assert torch.equal(got, want)


def test_from_pretrained_reads_a_checkpoint_folder(tmp_path):
    for flavour in ("gpt2", "qwen2"):
        hf, ours = _pair(flavour)
        hf.save_pretrained(tmp_path / flavour)
        loaded = GPT.from_pretrained(tmp_path / flavour)
        ids = torch.randint(0, VOCAB, (1, 8))
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids), ours(ids))


def test_bad_inputs_are_refused_by_name():
    _, ours = _pair("gpt2")
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 97\)"):
        ours(torch.tensor([[3, 97]]))
    with pytest.raises(ValueError, match="input_ids must be a"):
        ours(torch.rand(1, 3))
    with pytest.raises(ValueError, match="65 positions exceed the 64 learned positions"):
        ours(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must be"):
        ours(torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="max_new_tokens"):
        ours.generate(torch.zeros(1, 3, dtype=torch.long), -1)
    with pytest.raises(ValueError, match="reach 66 positions, past the 64 learned positions"):
        ours.generate(torch.zeros(1, 6, dtype=torch.long), 60)


@pytest.mark.parametrize("flavour,overrides,match", [
    ("gpt2", dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    ("gpt2", dict(activation_function="relu"), "activation"),
    ("llama", dict(hidden_act="gelu"), "hidden_act"),
    ("llama", dict(rope_parameters=dict(rope_type="longrope", rope_theta=10000.0)), "longrope"),
    ("qwen2", dict(use_sliding_window=True, sliding_window=4), "sliding"),
])
def test_converter_refuses_what_the_model_does_not_implement(flavour, overrides, match):
    torch.manual_seed(0)
    hf = _hf_model(flavour)
    hf.config.update(overrides)
    with pytest.raises(ValueError, match=match):
        GPT.from_hf(hf)


def test_checkpoint_that_does_not_fit_the_config_is_refused(tmp_path):
    import json

    hf, _ = _pair("llama")
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 40
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.\w+\.weight has shape .* the config expects"):
        GPT.from_pretrained(tmp_path)


def test_config_checks_its_sizes():
    with pytest.raises(ValueError, match="n_head .* multiple of n_kv_head"):
        GPTConfig(n_head=4, n_kv_head=3)
    with pytest.raises(ValueError, match="flavour"):
        GPTConfig(flavour="bert")


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_position_ids_of_one_row_apply_to_every_row(flavour):
    hf, ours = _pair(flavour)
    ids = torch.randint(0, VOCAB, (3, 6))
    positions = torch.arange(4, 10)
    with torch.no_grad():
        got = ours(ids, position_ids=positions)
        torch.testing.assert_close(got, ours(ids, position_ids=positions.expand(3, 6)))
        torch.testing.assert_close(got, hf(ids, position_ids=positions.expand(3, 6)).logits,
                                   atol=2e-5, rtol=2e-5)
