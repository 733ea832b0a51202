"""fastseq.models.UNet2DCondition against diffusers' UNet2DConditionModel: outputs, gradients, the
cross-attention mask, the converter's refusals and bad input."""

import pytest
import torch
from tolerance import assert_within_rule

diffusers = pytest.importorskip("diffusers")  # a test extra; see pyproject.toml

from fastseq.models import UNet2DCondition, UNetConfig  # noqa: E402

SMALL = dict(in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
             attention_head_dim=2, norm_num_groups=8)
VARIANTS = {
    "sd15_like": {},
    "three_levels_linear_projection": dict(
        block_out_channels=(16, 16, 32), down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2, attention_head_dim=(2, 4, 4),
        use_linear_projection=True, layers_per_block=(1, 2, 1), transformer_layers_per_block=(2, 1, 1)),
    "all_attention_no_mid_block": dict(down_block_types=("CrossAttnDownBlock2D",) * 2,
                                       up_block_types=("CrossAttnUpBlock2D",) * 2, mid_block_type=None,
                                       flip_sin_to_cos=False, freq_shift=1),
    "no_attention_levels_num_heads": dict(down_block_types=("DownBlock2D",) * 2,
                                          up_block_types=("UpBlock2D",) * 2, in_channels=3,
                                          out_channels=8),
}


def _diffusers(**options):
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(**{**SMALL, **options})
    with torch.no_grad():  # diffusers zeroes conv_out and proj_out: give every weight a value
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _inputs(model, batch=2, size=(8, 8), tokens=5):
    config = model.config
    torch.manual_seed(1)
    sample = torch.randn(batch, config.in_channels, *size)
    return sample, torch.tensor([3, 917])[:batch], torch.randn(batch, tokens, SMALL["cross_attention_dim"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_prediction_and_gradients_match_diffusers(variant):
    options = VARIANTS[variant]
    theirs, truth_model = _diffusers(**options), _diffusers(**options).double()
    ours = UNet2DCondition.from_diffusers(theirs)
    sample, timesteps, context = _inputs(theirs, size=(7, 10))  # odd sizes: upsampling to the skip's size

    def run(model, diffusers_api):
        model.zero_grad()
        dtype = next(model.parameters()).dtype
        x = sample.to(dtype).requires_grad_()
        out = model(x, timesteps, context.to(dtype))
        out = out.sample if diffusers_api else out
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out).to(dtype))
        return out.detach(), x.grad, {name: p.grad for name, p in model.named_parameters()}

    truth, low, got = run(truth_model, True), run(theirs, True), run(ours, False)
    assert_within_rule(got[0], truth[0], low[0], "prediction")
    assert_within_rule(got[1], truth[1], low[1], "sample grad", factor=3.0)
    assert set(got[2]) == set(truth[2])
    for name, grad in got[2].items():
        # A bias's or a norm's gradient sums B*H*W terms, whose fp32 order differs between the two
        # models: the absolute floor scales with the gradient's size.
        floor = 1e-6 * max(1.0, truth[2][name].abs().max().item())
        assert_within_rule(grad, truth[2][name], low[2][name], name, factor=3.0, floor=floor)


@pytest.mark.parametrize("mask", [
    [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]],  # all ones: no mask
    [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]],  # padding at the end: the short-context kernel's lengths
    [[0, 1, 1, 0, 1], [1, 0, 1, 1, 1]],  # any pattern: a bool mask
    [[0, 0, 0, 0, 0], [1, 1, 0, 0, 0]],  # a row that masks everything attends to everything
], ids=["all_ones", "prefix", "pattern", "fully_masked_row"])
def test_encoder_attention_mask_matches_diffusers(mask):
    theirs, truth_model = _diffusers(), _diffusers().double()
    ours = UNet2DCondition.from_diffusers(theirs)
    sample, timesteps, context = _inputs(theirs)
    mask = torch.tensor(mask)
    with torch.no_grad():
        # diffusers adds -10000 to masked scores, which in fp32 rounds the scores of a fully masked
        # row to 1e-3: the truth is its fp64 run.
        truth = truth_model(sample.double(), timesteps, context.double(), encoder_attention_mask=mask).sample
        low = theirs(sample, timesteps, context, encoder_attention_mask=mask).sample
        assert_within_rule(ours(sample, timesteps, context, mask), truth, low, "prediction")
        assert_within_rule(ours(sample, timesteps, context, mask.bool()), truth, low, "prediction")


def test_masking_the_last_token_equals_dropping_it():
    ours = UNet2DCondition.from_diffusers(_diffusers())
    sample, timesteps, context = _inputs(ours)
    mask = torch.ones(2, 5)
    mask[:, -1] = 0
    with torch.no_grad():
        dropped = ours(sample, timesteps, context[:, :4])
        torch.testing.assert_close(ours(sample, timesteps, context, mask), dropped)
        torch.testing.assert_close(ours(sample, timesteps, context, torch.ones(2, 5)),
                                   ours(sample, timesteps, context))


def test_scalar_timestep_and_batch_of_one_match_diffusers():
    theirs = _diffusers()
    ours = UNet2DCondition.from_diffusers(theirs)
    sample, _, context = _inputs(theirs, batch=1, tokens=1)
    with torch.no_grad():
        for t in (0, 999, torch.tensor(250), torch.tensor([17.5])):
            torch.testing.assert_close(ours(sample, t, context), theirs(sample, t, context).sample,
                                       atol=1e-6, rtol=1e-5)


def test_bfloat16_prediction_matches_diffusers():
    theirs = _diffusers()
    sample, timesteps, context = _inputs(theirs)
    with torch.no_grad():
        truth = _diffusers().double()(sample.double(), timesteps, context.double()).sample
        theirs = theirs.to(torch.bfloat16)
        low = theirs(sample.bfloat16(), timesteps, context.bfloat16()).sample
        got = UNet2DCondition.from_diffusers(theirs)(sample.bfloat16(), timesteps, context.bfloat16())
    assert got.dtype == torch.bfloat16
    assert_within_rule(got, truth, low, "prediction")


def test_state_dict_loads_back_into_diffusers():
    theirs = _diffusers()
    ours = UNet2DCondition.from_diffusers(theirs)
    fresh = diffusers.UNet2DConditionModel(**SMALL).eval()
    fresh.load_state_dict(ours.state_dict())
    sample, timesteps, context = _inputs(theirs)
    with torch.no_grad():
        torch.testing.assert_close(fresh(sample, timesteps, context).sample, ours(sample, timesteps, context))


@pytest.mark.parametrize("option, value", [
    ("class_embed_type", "timestep"), ("resnet_time_scale_shift", "scale_shift"),
    ("only_cross_attention", True), ("dual_cross_attention", True), ("time_cond_proj_dim", 8),
    ("conv_in_kernel", 1), ("attention_type", "gated"), ("center_input_sample", True),
    ("mid_block_scale_factor", 2.0), ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
])
def test_converter_refuses_options_it_does_not_implement(option, value):
    model = diffusers.UNet2DConditionModel(**{**SMALL, option: value, **(
        {"num_class_embeds": None} if option == "class_embed_type" else {})})
    with pytest.raises(ValueError, match=f"from_diffusers: {option}"):
        UNet2DCondition.from_diffusers(model)


def test_converter_refuses_block_types_it_does_not_implement():
    model = diffusers.UNet2DConditionModel(**{**SMALL, "down_block_types": ("SimpleCrossAttnDownBlock2D",
                                                                             "DownBlock2D")})
    with pytest.raises(ValueError, match="down_block_types .*SimpleCrossAttnDownBlock2D"):
        UNet2DCondition.from_diffusers(model)
    with pytest.raises(ValueError, match="expected a diffusers UNet2DConditionModel"):
        UNet2DCondition.from_diffusers(torch.nn.Linear(2, 2))


def test_bad_input_is_refused_by_name():
    ours = UNet2DCondition.from_diffusers(_diffusers())
    sample, timesteps, context = _inputs(ours)
    cases = [
        ((sample[:, :3], timesteps, context), r"sample must be \(B, 4, H, W\)"),
        ((sample, timesteps, context[..., :20]), r"encoder_hidden_states must be \(2, M, 24\)"),
        ((sample, timesteps, context[:1]), r"encoder_hidden_states must be \(2, M, 24\)"),
        ((sample, torch.tensor([1, 2, 3]), context), r"timestep must be a number or a \(2,\) tensor"),
        ((sample, timesteps, context, torch.ones(2, 4)), r"encoder_attention_mask must be \(2, 5\)"),
        ((sample, timesteps, context, torch.full((2, 5), 0.5)), "only 0s and 1s"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            ours(*args)


def test_config_refuses_bad_sizes():
    with pytest.raises(ValueError, match="block_out_channels\\[1\\] must be a positive multiple"):
        UNetConfig(block_out_channels=(32, 36), down_block_types=("DownBlock2D",) * 2,
                   up_block_types=("UpBlock2D",) * 2)
    with pytest.raises(ValueError, match="layers_per_block must be a positive int or 2 of them"):
        UNetConfig(block_out_channels=(32, 64), down_block_types=("DownBlock2D",) * 2,
                   up_block_types=("UpBlock2D",) * 2, layers_per_block=(1, 2, 3))
    with pytest.raises(ValueError, match="down_block_types must be 2 of"):
        UNetConfig(block_out_channels=(32, 64))
