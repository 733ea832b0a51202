"""fastseq.models.ViT against timm's VisionTransformer: outputs, gradients, converter refusals."""

import pytest
import timm.models.vision_transformer as tvit
import torch
from tolerance import assert_within_rule

from fastseq.models import ViT, ViTConfig

SMALL = dict(img_size=16, patch_size=4, in_chans=3, num_classes=10, embed_dim=32, depth=2, num_heads=4,
             mlp_ratio=2.0)
VARIANTS = {
    "cls_token": {},
    "avg_pool_fc_norm": dict(global_pool="avg", class_token=False),
    "registers": dict(reg_tokens=2),
    "no_embed_class": dict(reg_tokens=1, no_embed_class=True),
    "qk_norm_layer_scale": dict(qk_norm=True, init_values=1e-2, qkv_bias=False),
    "pre_norm_no_final_norm": dict(pre_norm=True, final_norm=False),
    "other_image_and_patch_size": dict(img_size=24, patch_size=8, in_chans=1),
}


def _timm(**options):
    torch.manual_seed(0)
    model = tvit.VisionTransformer(**{**SMALL, **options})
    with torch.no_grad():  # timm zeroes the head and some tokens: give every weight a value
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_and_gradients_match_timm(variant):
    options = VARIANTS[variant]
    theirs = _timm(**options)
    truth_model = _timm(**options).double()
    ours = ViT.from_timm(theirs)
    chans, size = options.get("in_chans", 3), options.get("img_size", 16)
    images = torch.randn(3, chans, size, size)

    def run(model):
        model.zero_grad()
        out = model(images.to(next(model.parameters()).dtype))
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out).to(out.dtype))
        return out.detach(), {name: p.grad for name, p in model.named_parameters()}

    (truth, truth_grads), (low, low_grads), (got, got_grads) = run(truth_model), run(theirs), run(ours)
    assert_within_rule(got, truth, low, "logits")
    assert set(got_grads) == set(truth_grads)
    for name, grad in got_grads.items():
        assert_within_rule(grad, truth_grads[name], low_grads[name], name, factor=3.0)


def test_bfloat16_logits_match_timm():
    theirs = _timm()
    images = torch.randn(2, 3, 16, 16)
    truth = _timm().double()(images.double())
    ours = ViT.from_timm(theirs.to(torch.bfloat16))
    with torch.no_grad():
        assert_within_rule(ours(images.bfloat16()), truth, theirs(images.bfloat16()), "logits")


@pytest.mark.parametrize("options, match", [
    (dict(global_pool="map"), "global_pool = 'map'"),
    (dict(dynamic_img_size=True), "dynamic_img_size"),
    (dict(block_fn=tvit.ResPostBlock), "block_fn = ResPostBlock"),
    (dict(act_layer="gelu_tanh"), "act_layer"),
    (dict(scale_mlp_norm=True), "mlp_layer = Mlp with a norm"),
    (dict(img_size=(16, 24)), "square image"),
])
def test_converter_refuses_what_fastseq_does_not_implement(options, match):
    with pytest.raises(ValueError, match=match):
        ViT.from_timm(tvit.VisionTransformer(**{**SMALL, **options}))


def test_bad_inputs_are_refused_by_name():
    model = ViT(ViTConfig(**SMALL))
    with pytest.raises(ValueError, match=r"images must be \(B, 3, 16, 16\), got .* \(2, 1, 16, 16\)"):
        model(torch.randn(2, 1, 16, 16))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ViTConfig(img_size=30, patch_size=4)
    with pytest.raises(ValueError, match="global_pool='token' needs class_token"):
        ViTConfig(class_token=False)
