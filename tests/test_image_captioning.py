"""The image captioner against its torch.nn build (``to_torch_nn``: the same model and weights with
the decoder on torch.nn's modules), its decoding (greedy, beam, the KV cache), its attention maps
and its input checks."""

import functools

import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_within_rule

from fastseq.models import ImageCaptioner, ImageCaptionerConfig
from fastseq.nn import to_torch_nn

pytestmark = pytest.mark.filterwarnings("ignore:.*(nested_tensor|mismatched).*:UserWarning")

VOCAB = 13
KINDS = ["vit-transformer", "vit-lstm-luong", "cnn-lstm-bahdanau", "cnn-transformer"]


def _model(kind, **overrides):
    encoder, decoder, *attention = kind.split("-")
    torch.manual_seed(0)
    options = dict(image_height=8, image_width=16, patch_size=4, encoder=encoder, decoder=decoder, width=16,
                   encoder_layers=1, encoder_heads=2, decoder_layers=2, decoder_heads=2, max_len=12,
                   attention=attention[0] if attention else "luong")
    return ImageCaptioner(ImageCaptionerConfig(VOCAB, **{**options, **overrides}))


def _batch():
    generator = torch.Generator().manual_seed(1)
    return torch.rand(3, 1, 8, 16, generator=generator), torch.randint(3, VOCAB, (3, 6), generator=generator)


@functools.cache
def _trained(kind):
    """A model that has learnt one caption per image of :func:`_batch` (EOS after 3, 5 and 7
    words), so that greedy decoding writes different lengths and words for each image (a random
    model repeats one token)."""
    model = _model(kind)
    images, _ = _batch()
    captions = torch.randint(3, VOCAB, (3, 9), generator=torch.Generator().manual_seed(2))
    captions[:, 0] = model.config.bos_id
    for row, length in enumerate((3, 5, 7)):
        captions[row, length + 1] = model.config.eos_id
        captions[row, length + 2:] = model.config.pad_id
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = F.cross_entropy(model(images, captions[:, :-1]).flatten(0, 1), captions[:, 1:].flatten(),
                               ignore_index=model.config.pad_id)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), captions[:, 1:]


@pytest.mark.parametrize("kind", KINDS)
def test_logits_and_gradients_match_the_torch_nn_build(kind):
    ours = _model(kind)
    low = to_torch_nn(ours)
    truth = to_torch_nn(ours).double()
    images, captions = _batch()
    results = []
    for model, dtype in ((truth, torch.float64), (low, torch.float32), (ours, torch.float32)):
        model.zero_grad()
        out = model(images.to(dtype), captions)
        out.backward(torch.ones_like(out) / out.numel() + out.detach() * 0.01)
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (t_out, t_grads), (l_out, l_grads), (out, grads) = results
    assert_within_rule(out, t_out, l_out, "logits")
    assert grads.keys() == t_grads.keys()
    for param, grad in grads.items():
        assert_within_rule(grad, t_grads[param], l_grads[param], param, factor=3.0)


def _rerun_greedy(model, images, max_len):
    """Greedy decoding that reruns the whole model over the prefix at every step (no cache)."""
    tokens = torch.full((images.shape[0], 1), model.config.bos_id)
    with torch.no_grad():
        for _ in range(max_len):
            tokens = torch.cat([tokens, model(images, tokens)[:, -1].argmax(-1, keepdim=True)], 1)
    out = tokens[:, 1:]
    return out.masked_fill((out == model.config.eos_id).cumsum(1) > 0, model.config.eos_id)


@pytest.mark.parametrize("kind", ["vit-transformer", "cnn-lstm-bahdanau", "vit-lstm-luong"])
def test_beam_size_one_is_greedy_decoding_by_rerunning_the_prefix(kind):
    model, learnt = _trained(kind)
    images, _ = _batch()
    got = model.generate(images, max_len=8, beam_size=1)
    assert torch.equal(got, _rerun_greedy(model, images, 8))
    eos = model.config.eos_id
    assert [row.index(eos) for row in got.tolist()] == [3, 5, 7]  # not a repeated token: it learnt
    assert torch.equal(got[0, :4], learnt[0, :4])
    assert torch.equal(model.generate(images, max_len=8), got)  # beam_size=1 is the default
    assert torch.equal(model.generate(images, max_len=8), _rerun_greedy(to_torch_nn(model), images, 8))


@pytest.mark.parametrize("kind", ["vit-transformer", "vit-lstm-luong"])
def test_decoding_steps_give_the_log_probs_of_the_full_forward(kind):
    """Each step over the KV cache (the LSTM's carried state) scores the next token as the
    teacher-forced forward over the whole prefix does."""
    model, _ = _trained(kind)
    images, captions = _batch()
    captions[:, 0] = model.config.bos_id
    with torch.no_grad():
        want = F.log_softmax(model(images, captions), -1)
        state = model.decoder.start(model.encode(images), 1, captions.shape[1])
        steps = []
        for t in range(captions.shape[1]):
            log_probs, state = model.decoder.step(captions[:, t], state)
            steps.append(log_probs)
    torch.testing.assert_close(torch.stack(steps, 1), want, atol=1e-5, rtol=1e-5)


def test_the_cache_follows_the_beams_and_beam_search_is_at_least_as_likely_as_greedy():
    model = _model("vit-transformer").eval()  # untrained: greedy is far from the likeliest
    images, _ = _batch()

    def log_prob(tokens):
        captions_in = torch.cat([torch.full((3, 1), model.config.bos_id), tokens[:, :-1]], 1)
        with torch.no_grad():
            logp = F.log_softmax(model(images, captions_in), -1).gather(-1, tokens[..., None])[..., 0]
        return logp.masked_fill((tokens == model.config.eos_id).cumsum(1) > 1, 0.0).sum(1)

    greedy = model.generate(images, max_len=8, stop_at_eos=False)
    beam = model.generate(images, max_len=8, beam_size=5, length_penalty=0.0, stop_at_eos=False)
    assert beam.shape == greedy.shape == (3, 8)
    assert (log_prob(beam) >= log_prob(greedy) - 1e-5).all()
    assert (log_prob(beam) > log_prob(greedy) + 1e-3).any()  # the beams found better captions


@pytest.mark.parametrize("kind", KINDS)
def test_attention_maps_are_distributions_over_the_patches(kind):
    model = _model(kind).eval()
    images, _ = _batch()
    tokens = model.generate(images, max_len=5)
    maps = model.attention_maps(images, tokens)
    assert maps.shape == (3, 5, model.config.num_patches) == (3, 5, 8)
    assert (maps >= 0).all()
    torch.testing.assert_close(maps.sum(-1), torch.ones(3, 5))


def test_transformer_attention_maps_are_the_weights_the_kernel_applied():
    """With one head, the cross-attention's output is out_proj(weights @ values): the weights
    recomputed for the maps are those fastseq's attention kernel used."""
    model = _model("vit-transformer", decoder_heads=1).eval()
    images, captions = _batch()
    tokens = captions[:, 1:]
    layer = model.decoder.decoder.layers[-1]
    seen = {}
    # Pre-norm: norm2 reads h, norm3 reads h + cross_attention(norm2(h)).
    hooks = [layer.norm2.register_forward_hook(lambda m, args, out: seen.update(before=args[0])),
             layer.norm3.register_forward_hook(lambda m, args, out: seen.update(after=args[0]))]
    maps = model.attention_maps(images, tokens)
    for hook in hooks:
        hook.remove()
    _, values = layer.multihead_attn.key_value_heads(model.encode(images))
    with torch.no_grad():
        applied = layer.multihead_attn.out_projection((maps @ values[:, 0])[:, None])
    torch.testing.assert_close(applied, seen["after"] - seen["before"], atol=1e-5, rtol=1e-5)


def test_bad_input_is_refused_by_name():
    model = _model("vit-transformer")
    images, captions = _batch()
    with pytest.raises(ValueError, match=r"images must be a floating \(B, 1, 8, 16\) tensor, got "
                                         r"torch.float32 \(3, 3, 8, 16\)"):
        model(images.expand(3, 3, 8, 16), captions)
    with pytest.raises(ValueError, match=r"images must be .* got torch.float32 \(3, 1, 8, 8\)"):
        model(images[..., :8], captions)
    with pytest.raises(ValueError, match=r"images must be .* got torch.int64"):
        model.generate((images * 10).long())
    with pytest.raises(ValueError, match=r"images must be .* got list"):
        model.generate([images])
    with pytest.raises(ValueError, match=r"captions_in must lie in \[0, 13\), got 1..13"):
        model(images, torch.tensor([[1, 2, VOCAB]] * 3))
    with pytest.raises(ValueError, match=r"captions_in must be a \(B, T\) integer tensor"):
        model(images, captions.float())
    with pytest.raises(ValueError, match="images and captions_in must have the same batch size"):
        model(images, captions[:2])
    with pytest.raises(ValueError, match="captions_in has 13 positions, more than max_len=12"):
        model(images, torch.ones(3, 13, dtype=torch.long))
    with pytest.raises(ValueError, match="tokens must lie in"):
        model.attention_maps(images, captions - 3 - 1)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="max_len must be a positive int"):
            model.generate(images, max_len=bad)
        with pytest.raises(ValueError, match="beam_size must be a positive int"):
            model.generate(images, beam_size=bad)
    with pytest.raises(ValueError, match="max_len must be at most the config's max_len=12, got 13"):
        model.generate(images, max_len=13)


@pytest.mark.parametrize("overrides, message", [
    (dict(encoder="resnet"), "encoder must be one of"),
    (dict(decoder="gru"), "decoder must be one of"),
    (dict(attention="dot"), "attention must be one of"),
    (dict(image_width=30), r"image_width \(30\) must be a multiple of patch_size \(4\)"),
    (dict(width=18, encoder_heads=4), r"width \(18\) must be a multiple of encoder_heads \(4\)"),
    (dict(decoder_layers=0), "decoder_layers must be a positive int, got 0"),
    (dict(eos_id=13), r"eos_id must be an int in \[0, 13\), got 13"),
])
def test_bad_configs_are_refused_by_name(overrides, message):
    options = dict(width=16, encoder_heads=2, decoder_heads=2)
    with pytest.raises(ValueError, match=f"ImageCaptionerConfig: {message}"):
        ImageCaptionerConfig(VOCAB, **{**options, **overrides})
