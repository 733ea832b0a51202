"""fastseq.models.CLIP against transformers' CLIPModel: outputs, gradients, pooling, zero-shot,
converter refusals and input errors."""

import pytest
import torch
import transformers
from tolerance import assert_within_rule

from fastseq.models import CLIP

transformers.logging.set_verbosity_error()

VOCAB, EOS = 99, 98


def _hf(eos_token_id=EOS, **text_overrides):
    torch.manual_seed(0)
    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=16, eos_token_id=eos_token_id,
                bos_token_id=1, pad_token_id=0, **text_overrides)
    vision = dict(image_size=16, patch_size=4, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=4, num_channels=3)
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
    return transformers.CLIPModel(config).eval()


def _batch(eos=EOS):
    ids = torch.randint(3, VOCAB - 2, (3, 9))
    lengths = [9, 6, 3]
    mask = torch.zeros(3, 9, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, n - 1] = eos
        ids[row, n:] = 0
        mask[row, :n] = 1
    return ids, mask, torch.randn(4, 3, 16, 16)  # more images than texts: logits are (4, 3)


FIELDS = ("logits_per_image", "logits_per_text", "text_embeds", "image_embeds")


@pytest.mark.parametrize("eos", [EOS, 2], ids=["eos_token", "legacy_argmax"])
def test_outputs_and_gradients_match_transformers(eos):
    hf, truth_model = _hf(eos), _hf(eos).double()
    ours = CLIP.from_hf(hf)
    ids, mask, images = _batch(eos if eos != 2 else VOCAB - 1)  # legacy: the EOS has the top id

    def run(model, fastseq):
        model.zero_grad()
        pixels = images.to(next(model.parameters()).dtype)
        out = model(ids, pixels, attention_mask=mask) if fastseq else model(
            input_ids=ids, pixel_values=pixels, attention_mask=mask)
        values = {f: getattr(out, f) for f in FIELDS}
        sum(v.sum() * (i + 1) for i, v in enumerate(values.values())).backward()
        return {f: v.detach() for f, v in values.items()}, {n: p.grad for n, p in model.named_parameters()
                                                            if p.grad is not None}

    (truth, truth_grads), (low, low_grads), (got, got_grads) = (run(truth_model, False), run(hf, False),
                                                                run(ours, True))
    for field in FIELDS:
        assert_within_rule(got[field], truth[field], low[field], field)
    assert set(got_grads) == set(truth_grads)
    for name, grad in got_grads.items():
        assert_within_rule(grad, truth_grads[name], low_grads[name], name, factor=3.0)


def test_without_a_mask_the_text_tower_is_causal_and_matches_transformers():
    hf = _hf()
    ours = CLIP.from_hf(hf)
    ids, _, images = _batch()
    ids = ids[:1]  # the full-length row: no padding
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_text(ids), hf.get_text_features(input_ids=ids).pooler_output,
                                   atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours.encode_image(images),
                                   hf.get_image_features(pixel_values=images).pooler_output,
                                   atol=1e-5, rtol=1e-4)


def test_loss_is_the_symmetric_cross_entropy_of_transformers():
    hf = _hf()
    ours = CLIP.from_hf(hf)
    ids, mask, images = _batch()
    with torch.no_grad():
        want = hf(input_ids=ids, pixel_values=images[:3], attention_mask=mask, return_loss=True).loss
        got = ours(ids, images[:3], attention_mask=mask, return_loss=True).loss
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_zero_shot_logits_average_each_class_s_prompts():
    ours = CLIP.from_hf(_hf())
    ids, mask, images = _batch()
    prompts = ids[:2].unsqueeze(0).expand(2, 2, 9)  # two classes, the same two prompts each
    logits = ours.zero_shot_logits(images, prompts, mask[:2].unsqueeze(0).expand(2, 2, 9))
    assert logits.shape == (4, 2)
    torch.testing.assert_close(logits[:, 0], logits[:, 1])


def test_converter_refuses_what_fastseq_does_not_implement():
    with pytest.raises(ValueError, match="hidden_act = 'gelu_new' is not implemented"):
        CLIP.from_hf(_hf(hidden_act="gelu_new"))
    with pytest.raises(ValueError, match="expected a transformers CLIPModel"):
        CLIP.from_hf(torch.nn.Linear(2, 2))


def test_bad_inputs_are_refused_by_name():
    ours = CLIP.from_hf(_hf())
    ids, mask, images = _batch()
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 99\)"):
        ours.encode_text(ids + VOCAB)
    with pytest.raises(ValueError, match="more than the 16 positions"):
        ours.encode_text(torch.ones(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must be"):
        ours.encode_text(ids, mask[:, :4])
    with pytest.raises(ValueError, match=r"pixel_values must be \(B, 3, 16, 16\)"):
        ours.encode_image(torch.randn(2, 3, 32, 32))
