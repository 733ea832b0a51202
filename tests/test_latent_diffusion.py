"""fastseq.models.LatentDiffusion against diffusers' StableDiffusionPipeline built from the same
(small, random) text encoder, U-Net, autoencoder and scheduler; the DDPM objective; guidance; bad
input."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")  # a test extra; see pyproject.toml
transformers = pytest.importorskip("transformers")

from fastseq.models import (  # noqa: E402
    AutoencoderKL,
    LatentDiffusion,
    NoiseSchedule,
    UNet2DCondition,
)
from fastseq.models.clip import TextTransformer  # noqa: E402
from fastseq.models.latent_diffusion import diffusion_loss, guided_prediction  # noqa: E402

WIDTH, VOCAB, LENGTH = 32, 100, 8
SD_SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                   steps_offset=1)


def _ddim():
    return diffusers.DDIMScheduler(**SD_SCHEDULE, set_alpha_to_one=False)


def _perturbed(model):
    with torch.no_grad():  # diffusers zeroes some output layers: give every weight a value
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _references():
    torch.manual_seed(0)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=LENGTH, eos_token_id=VOCAB - 1, bos_token_id=VOCAB - 2,
        pad_token_id=0)).eval()
    unet = _perturbed(diffusers.UNet2DConditionModel(
        in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=WIDTH, attention_head_dim=2,
        norm_num_groups=8))
    vae = _perturbed(diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, norm_num_groups=8, layers_per_block=1))
    return text, unet, vae


def _ours(text, unet, vae, scheduler):
    return LatentDiffusion(TextTransformer.from_hf(text), UNet2DCondition.from_diffusers(unet),
                           AutoencoderKL.from_diffusers(vae), NoiseSchedule.from_diffusers(scheduler))


def _ids(batch):
    ids = torch.randint(0, VOCAB - 1, (batch, LENGTH), generator=torch.Generator().manual_seed(2))
    ids[:, -1] = VOCAB - 1
    return ids


@pytest.mark.parametrize("sampler, eta, guidance", [
    ("ddim", 0.0, 3.0), ("ddim", 0.7, 3.0), ("ddpm", 0.0, 2.0), ("ddim", 0.0, 1.0)])
def test_generate_matches_stable_diffusion_pipeline(sampler, eta, guidance):
    text, unet, vae = _references()
    scheduler = _ddim() if sampler == "ddim" else diffusers.DDPMScheduler(**SD_SCHEDULE)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=None, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    ours = _ours(text, unet, vae, scheduler)
    ids, empty = _ids(2), _ids(1)
    latents = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = pipe(prompt_embeds=text(ids).last_hidden_state,
                    negative_prompt_embeds=text(empty).last_hidden_state.expand(2, -1, -1),
                    latents=latents, height=16, width=24, num_inference_steps=4, guidance_scale=guidance,
                    eta=eta, generator=torch.Generator().manual_seed(4), output_type="pt").images
    got = ours.generate(ids, empty, latents=latents, steps=4, guidance_scale=guidance, sampler=sampler,
                        eta=eta, generator=torch.Generator().manual_seed(4))
    assert got.shape == (2, 3, 16, 24)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_generate_from_noise_of_an_image_size():
    ours = _ours(*_references(), _ddim())
    first, again = (ours.generate(_ids(3), _ids(1), image_size=(8, 12), steps=2,
                                  generator=torch.Generator().manual_seed(0)) for _ in range(2))
    assert first.shape == (3, 3, 8, 12) and first.min() >= 0 and first.max() <= 1
    torch.testing.assert_close(first, again)


def test_text_tower_token_states_match_clip_text_model():
    text = _references()[0]
    ours = TextTransformer.from_hf(text)
    ids = _ids(3)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    with torch.no_grad():
        torch.testing.assert_close(ours.token_states(ids), text(ids).last_hidden_state)
        torch.testing.assert_close(ours.token_states(ids, mask)[0, :5],
                                   text(ids, attention_mask=mask).last_hidden_state[0, :5])
    with pytest.raises(ValueError, match="expected a transformers CLIPTextModel"):
        TextTransformer.from_hf(torch.nn.Linear(2, 2))


def test_diffusion_loss_is_the_ddpm_objective():
    text, unet, vae = _references()
    scheduler = diffusers.DDPMScheduler(**SD_SCHEDULE)
    ours = _ours(text, unet, vae, scheduler)
    latents, context = torch.randn(3, 4, 4, 4), torch.randn(3, LENGTH, WIDTH)
    loss = diffusion_loss(ours.unet, ours.schedule, latents, context, torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(5)  # the same draws, in the same order
    timesteps = torch.randint(0, 1000, (3,), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    with torch.no_grad():
        prediction = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, context).sample
    torch.testing.assert_close(loss.detach(), torch.nn.functional.mse_loss(prediction, noise))
    loss.backward()
    assert all(p.grad is not None for p in ours.unet.parameters())


def test_loss_trains_text_tower_and_unet_not_autoencoder():
    ours = _ours(*_references(), diffusers.DDPMScheduler(**SD_SCHEDULE))
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    ours.loss(images, _ids(2), generator=torch.Generator().manual_seed(0)).backward()
    assert ours.text_encoder.embeddings.token_embedding.weight.grad is not None
    assert ours.unet.conv_in.weight.grad is not None
    assert all(p.grad is None for p in ours.autoencoder.parameters())


def test_guidance_combines_conditional_and_unconditional_predictions():
    unet = UNet2DCondition.from_diffusers(_references()[1])
    latents, cond, uncond = torch.randn(2, 4, 4, 4), torch.randn(2, 3, WIDTH), torch.randn(2, 3, WIDTH)
    with torch.no_grad():
        c, u = unet(latents, 10, cond), unet(latents, 10, uncond)
        torch.testing.assert_close(guided_prediction(unet, latents, 10, cond, uncond, 4.0), u + 4.0 * (c - u),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(guided_prediction(unet, latents, 10, cond, uncond, 1.0), c)
        torch.testing.assert_close(guided_prediction(unet, latents, 10, cond, None, 4.0), c)


def test_bad_input_is_refused_by_name():
    ours = _ours(*_references(), _ddim())
    ids = _ids(2)
    cases = [
        (dict(image_size=(8, 7)), "image_size must be an int or \\(H, W\\), positive multiples of 2"),
        (dict(), "image_size must be"),
        (dict(image_size=8, steps=0), "steps must be a positive int, got 0"),
        (dict(image_size=8, sampler="euler"), "sampler must be one of \\('ddim', 'ddpm'\\)"),
        (dict(latents=torch.randn(2, 3, 4, 4)), "latents must be \\(2, 4, h, w\\)"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            ours.generate(ids, **options)
    with pytest.raises(ValueError, match="input_ids must lie in"):
        ours.generate(ids + VOCAB, image_size=8)
    with pytest.raises(ValueError, match="one caption per image"):
        ours.loss(torch.rand(3, 3, 8, 8), ids)
    with pytest.raises(ValueError, match="schedule must be a NoiseSchedule"):
        LatentDiffusion(ours.text_encoder, ours.unet, ours.autoencoder, "ddpm")
