"""fastseq.models.AutoencoderKL against diffusers' AutoencoderKL: posterior, samples, reconstructions,
gradients, state-dict round trip, converter and input refusals."""

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from tolerance import assert_within_rule

from fastseq.models.autoencoder import AutoencoderKL, AutoencoderKLConfig

VARIANTS = {
    "two_levels": dict(block_out_channels=(32, 64), norm_num_groups=8),
    "three_levels_two_layers_grey": dict(block_out_channels=(32, 32, 64), layers_per_block=2,
                                         norm_num_groups=16, in_channels=1, out_channels=1),
    "no_attention_no_quant_convs": dict(block_out_channels=(32, 64), norm_num_groups=8, in_channels=1,
                                        mid_block_add_attention=False, use_quant_conv=False,
                                        use_post_quant_conv=False),
    "one_level_shifted": dict(block_out_channels=(16,), norm_num_groups=8, latent_channels=3,
                              scaling_factor=0.3611, shift_factor=0.1159),
}
SIZE = (24, 40)  # not square, and not a power of two


def _diffusers(seed=0, **options):
    options = {"layers_per_block": 1, "latent_channels": 4, **options}
    levels = len(options["block_out_channels"])
    options.setdefault("down_block_types", ("DownEncoderBlock2D",) * levels)
    options.setdefault("up_block_types", ("UpDecoderBlock2D",) * levels)
    torch.manual_seed(seed)
    model = DiffusersAutoencoderKL(**options)
    with torch.no_grad():  # every weight away from its initial value, GroupNorm scales included
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _images(options, batch=2):
    return torch.randn(batch, options.get("in_channels", 3), *SIZE)


def _generator(seed=1):
    return torch.Generator().manual_seed(seed)


def _outputs(model, images, ours):
    """Every output compared, by name, computed by ``model`` (ours or diffusers') on ``images``."""
    dtype = next(model.parameters()).dtype
    images = images.to(dtype)
    posterior = model.encode(images) if ours else model.encode(images).latent_dist
    latents = torch.randn(posterior.mean.shape, generator=_generator(2), dtype=torch.float64).to(dtype)
    decode = model.decode if ours else (lambda z: model.decode(z).sample)
    run = model if ours else (lambda x, **kw: model(x, **kw).sample)
    return {"mean": posterior.mean, "logvar": posterior.logvar, "std": posterior.std, "kl": posterior.kl(),
            "sample": posterior.sample(generator=_generator()), "decode": decode(latents),
            "forward": run(images), "forward_sampled": run(images, sample_posterior=True,
                                                            generator=_generator(3))}


@pytest.mark.parametrize("variant", VARIANTS)
def test_outputs_match_diffusers(variant):
    options = VARIANTS[variant]
    theirs = _diffusers(**options)
    ours = AutoencoderKL.from_diffusers(theirs)
    images = _images(options)
    with torch.no_grad():
        truth = _outputs(_diffusers(**options).double(), images, ours=False)
        low, got = _outputs(theirs, images, ours=False), _outputs(ours, images, ours=True)
    for name in truth:
        assert_within_rule(got[name], truth[name], low[name], name)
    assert got["forward"].shape == (2, options.get("out_channels", 3), *SIZE)


@pytest.mark.parametrize("variant", ["three_levels_two_layers_grey", "no_attention_no_quant_convs"])
def test_gradients_match_diffusers(variant):
    options = VARIANTS[variant]
    theirs, truth_model = _diffusers(**options), _diffusers(**options).double()
    ours = AutoencoderKL.from_diffusers(theirs)
    images = _images(options)

    def run(model, is_ours):
        model.zero_grad()
        x = images.to(next(model.parameters()).dtype).requires_grad_()
        posterior = model.encode(x) if is_ours else model.encode(x).latent_dist
        z = posterior.sample(generator=_generator())
        recon = model.decode(z) if is_ours else model.decode(z).sample
        weights = torch.linspace(-1, 1, recon.numel(), dtype=recon.dtype).view_as(recon)
        ((recon * weights).sum() + 1e-3 * posterior.kl().sum()).backward()
        return {"images": x.grad, **{name: p.grad for name, p in model.named_parameters()}}

    truth, low, got = run(truth_model, False), run(theirs, False), run(ours, True)
    assert set(got) == set(truth)
    for name, grad in got.items():
        assert_within_rule(grad, truth[name], low[name], name, factor=3.0)


def test_state_dict_round_trips_to_diffusers():
    options = VARIANTS["three_levels_two_layers_grey"]
    theirs = _diffusers(**options)
    ours = AutoencoderKL.from_diffusers(theirs)
    shapes = lambda model: {name: t.shape for name, t in model.state_dict().items()}
    assert shapes(ours) == shapes(theirs)  # the same names and shapes (registered in another order)
    fresh = _diffusers(seed=5, **options)
    fresh.load_state_dict(ours.state_dict())
    images = _images(options)
    with torch.no_grad():
        torch.testing.assert_close(fresh(images).sample, theirs(images).sample, rtol=0, atol=0)
        torch.testing.assert_close(ours(images), fresh(images).sample, rtol=1e-5, atol=1e-5)


def test_latent_scaling_as_the_pipelines_do_it():
    options = VARIANTS["one_level_shifted"]
    theirs = _diffusers(**options)
    ours = AutoencoderKL.from_diffusers(theirs)
    scale, shift = options["scaling_factor"], options["shift_factor"]
    images = _images(options)
    with torch.no_grad():
        z = (theirs.encode(images).latent_dist.sample(generator=_generator()) - shift) * scale
        latents = ours.images_to_latents(images, generator=_generator())
        torch.testing.assert_close(latents, z, rtol=1e-5, atol=1e-5)
        mode = (theirs.encode(images).latent_dist.mode() - shift) * scale
        torch.testing.assert_close(ours.images_to_latents(images, sample_posterior=False), mode)
        torch.testing.assert_close(ours.latents_to_images(latents), theirs.decode(z / scale + shift).sample,
                                   rtol=1e-5, atol=1e-5)


def test_noise_sources():
    options = VARIANTS["two_levels"]
    theirs = _diffusers(**options)
    ours = AutoencoderKL.from_diffusers(theirs)
    images = _images(options, batch=3)
    with torch.no_grad():
        posterior, reference = ours.encode(images), theirs.encode(images).latent_dist
        generators = lambda: [_generator(seed) for seed in (7, 8, 9)]  # one per sample, as pipelines pass
        torch.testing.assert_close(posterior.sample(generator=generators()),
                                   reference.sample(generator=generators()), rtol=1e-5, atol=1e-5)
        noise = torch.randn(posterior.mean.shape)
        torch.testing.assert_close(posterior.sample(noise=noise), posterior.mean + posterior.std * noise)
        assert torch.equal(posterior.mode(), posterior.mean)
        with pytest.raises(ValueError, match=r"noise must be \(3, 4, 12, 20\), got .* \(3, 4, 12\)"):
            posterior.sample(noise=noise[..., 0])
        with pytest.raises(ValueError, match="a list of 3, got 2"):
            posterior.sample(generator=generators()[:2])


def test_empty_batch_gives_empty_outputs():
    # diffusers' attention cannot reshape an empty batch; fastseq's model returns empty outputs.
    options = VARIANTS["two_levels"]
    ours = AutoencoderKL.from_diffusers(_diffusers(**options))
    images = _images(options, batch=0)
    with torch.no_grad():
        posterior = ours.encode(images)
        assert posterior.mean.shape == (0, 4, 12, 20) and posterior.kl().shape == (0,)
        assert ours(images, sample_posterior=True).shape == (0, 3, *SIZE)


@pytest.mark.parametrize("options, match", [
    (dict(down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D")),
     r"down_block_types = \('DownEncoderBlock2D', 'AttnDownEncoderBlock2D'\) is not implemented"),
    (dict(up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D")), "up_block_types = "),
    (dict(act_fn="gelu"), "act_fn = 'gelu' is not implemented"),
    (dict(latents_mean=(0.1,) * 4, latents_std=(1.0,) * 4), "latents_mean = "),
])
def test_converter_refuses_what_fastseq_does_not_implement(options, match):
    model = _diffusers(**{**VARIANTS["two_levels"], **options})
    with pytest.raises(ValueError, match="fastseq AutoencoderKL.from_diffusers: " + match):
        AutoencoderKL.from_diffusers(model)


def test_converter_refuses_runtime_options_and_other_models():
    model = _diffusers(**VARIANTS["two_levels"])
    model.enable_tiling()
    with pytest.raises(ValueError, match="use_tiling = True is not implemented"):
        AutoencoderKL.from_diffusers(model)
    model.disable_tiling()
    model.fuse_qkv_projections()
    with pytest.raises(ValueError, match="fused_projections"):
        AutoencoderKL.from_diffusers(model)
    model.unfuse_qkv_projections()
    model.register_to_config(norm_type="spatial")  # a key of a newer diffusers: refused, not ignored
    with pytest.raises(ValueError, match="norm_type = 'spatial' is not implemented"):
        AutoencoderKL.from_diffusers(model)
    with pytest.raises(ValueError, match="expected a diffusers AutoencoderKL, got Conv2d"):
        AutoencoderKL.from_diffusers(torch.nn.Conv2d(1, 1, 1))
    # force_upcast and slicing change no result: accepted
    AutoencoderKL.from_diffusers(_diffusers(**VARIANTS["two_levels"], force_upcast=False))


def test_bad_inputs_are_refused_by_name():
    model = AutoencoderKL(AutoencoderKLConfig(block_out_channels=(16, 16, 32), norm_num_groups=8))
    prefix = "fastseq AutoencoderKL: "
    with pytest.raises(ValueError, match=prefix + r"images must be a floating-point \(B, 3, H, W\) tensor, "
                                                  r"got torch.float32 \(2, 1, 16, 16\)"):
        model.encode(torch.randn(2, 1, 16, 16))
    with pytest.raises(ValueError, match=r"images must be .* got torch.float32 \(3, 16, 16\)"):
        model(torch.randn(3, 16, 16))
    with pytest.raises(ValueError, match=r"images must be .* got torch.int64 \(1, 3, 16, 16\)"):
        model(torch.zeros(1, 3, 16, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="images height and width must be positive multiples of 4, got "
                                         "16x18"):
        model(torch.randn(1, 3, 16, 18))
    with pytest.raises(ValueError, match=r"latents must be a floating-point \(B, 4, H, W\) tensor, got "
                                         r"torch.float32 \(1, 3, 4, 4\)"):
        model.decode(torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match="latents height and width must be positive multiples of 1, got 0x4"):
        model.latents_to_images(torch.randn(1, 4, 0, 4))


@pytest.mark.parametrize("options, match", [
    (dict(block_out_channels=(32, 40), norm_num_groups=16),
     r"block_out_channels must be .* each a multiple of 16 groups, got \(32, 40\)"),
    (dict(block_out_channels=[16, "32"], norm_num_groups=16), r"block_out_channels .* got \(16, '32'\)"),
    (dict(block_out_channels=()), r"block_out_channels must be a non-empty tuple .* got \(\)"),
    (dict(layers_per_block=0), "layers_per_block must be a positive int, got 0"),
    (dict(in_channels=True), "in_channels must be a positive int, got True"),
    (dict(scaling_factor=0.0), "scaling_factor must be a finite non-zero number, got 0.0"),
    (dict(shift_factor=float("nan")), "shift_factor must be a finite number or None, got nan"),
    (dict(sample_size=(512, 0)), r"sample_size must be an int > 0 or a pair, got \(512, 0\)"),
    (dict(use_quant_conv=1), "use_quant_conv must be a bool, got 1"),
    (dict(act_fn="relu"), "act_fn must be 'silu', got 'relu'"),
])
def test_bad_configs_are_refused_by_name(options, match):
    with pytest.raises(ValueError, match="AutoencoderKLConfig: " + match):
        AutoencoderKLConfig(**options)


def test_stable_diffusion_width_attention_matches_diffusers():
    # Stable Diffusion's VAE attends with one head of 512 channels: past the Triton kernels' head dim.
    from diffusers.models.attention_processor import Attention

    from fastseq.models.autoencoder import MidBlockAttention

    torch.manual_seed(0)
    kwargs = dict(heads=1, dim_head=512, eps=1e-6, norm_num_groups=32, residual_connection=True, bias=True,
                  upcast_softmax=True, _from_deprecated_attn_block=True)
    theirs, truth_model = Attention(512, **kwargs), Attention(512, **kwargs)
    truth_model.load_state_dict(theirs.state_dict())
    ours = MidBlockAttention(512, 512, 32)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 512, 6, 10)
    with torch.no_grad():
        assert_within_rule(ours(x), truth_model.double()(x.double()), theirs(x), "attention")


def test_bfloat16_model_keeps_its_dtype_and_matches_diffusers():
    options = VARIANTS["two_levels"]
    theirs = _diffusers(**options).to(torch.bfloat16)
    ours = AutoencoderKL.from_diffusers(theirs)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    images = _images(options)
    with torch.no_grad():
        truth = _diffusers(**options).double()(images.double()).sample
        assert_within_rule(ours(images.bfloat16()), truth, theirs(images.bfloat16()).sample, "forward")
