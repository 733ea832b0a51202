"""Latent diffusion (Rombach et al. 2022) on fastseq's models: text -> CLIP text tower -> U-Net
denoising loop in the autoencoder's latent space -> decoder -> image.

The pieces: :func:`diffusion_loss`, the DDPM training objective; :func:`guided_prediction`,
classifier-free guidance (Ho & Salimans 2022); :class:`LatentDiffusion`, which holds a
:class:`~fastseq.models.clip.TextTransformer`, a :class:`~fastseq.models.UNet2DCondition`, an
:class:`~fastseq.models.AutoencoderKL` and a :class:`~fastseq.models.NoiseSchedule`, trains on
(image, caption) pairs and generates images from captions. Its denoising loop is the one of
diffusers' ``StableDiffusionPipeline`` (same latents, same guidance, same scheduler steps).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastseq.models.inputs import describe
from fastseq.models.schedulers import DDIMSampler, DDPMSampler, NoiseSchedule

SAMPLERS = {"ddim": DDIMSampler, "ddpm": DDPMSampler}


def _fail(message):
    raise ValueError(f"fastseq LatentDiffusion: {message}")


def diffusion_loss(unet, schedule: NoiseSchedule, latents, context, generator=None):
    """The DDPM objective (Ho et al. 2020): the mean squared error of ``unet``'s prediction on
    ``latents`` ``(B, C, h, w)`` noised to timesteps drawn uniformly from the schedule, against what
    the schedule's ``prediction_type`` says it should predict (the noise, for "epsilon"). ``context``
    ``(B, M, width)`` conditions the U-Net. Timesteps and noise come from ``generator``."""
    batch = latents.shape[0]
    timesteps = torch.randint(0, schedule.num_train_timesteps, (batch,), generator=generator,
                              device=generator.device if generator is not None else "cpu").to(latents.device)
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype,
                        device=generator.device if generator is not None else "cpu").to(latents.device)
    prediction = unet(schedule.add_noise(latents, noise, timesteps), timesteps, context)
    return F.mse_loss(prediction.float(), schedule.training_target(latents, noise, timesteps).float())


def guided_prediction(unet, latents, timestep, context, uncond_context, guidance_scale: float):
    """Classifier-free guidance: ``uncond + guidance_scale * (cond - uncond)``, the two predictions
    from one U-Net call on the doubled batch; only the conditional one where ``uncond_context`` is
    None or ``guidance_scale <= 1`` (as diffusers' pipelines)."""
    if uncond_context is None or guidance_scale <= 1:
        return unet(latents, timestep, context)
    both = unet(torch.cat([latents, latents]), timestep, torch.cat([uncond_context, context]))
    uncond, cond = both.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


class LatentDiffusion(nn.Module):
    """A text-to-image latent-diffusion model.

    ``loss(images, input_ids)`` trains the U-Net (and the text tower, unless frozen) on images in
    ``[-1, 1]`` and their captions' token ids; ``generate(input_ids, uncond_input_ids)`` returns
    images in ``[0, 1]``. The autoencoder stays frozen: its latents are computed under ``no_grad``.
    """

    def __init__(self, text_encoder, unet, autoencoder, schedule: NoiseSchedule):
        super().__init__()
        if not isinstance(schedule, NoiseSchedule):
            _fail(f"schedule must be a NoiseSchedule, got {describe(schedule)}")
        self.text_encoder, self.unet, self.autoencoder = text_encoder, unet, autoencoder
        self.schedule = schedule

    def encode_prompt(self, input_ids, attention_mask=None):
        """Token ids ``(B, T)`` -> the U-Net's context ``(B, T, text width)``."""
        return self.text_encoder.token_states(input_ids, attention_mask)

    def loss(self, images, input_ids, attention_mask=None, generator=None):
        """:func:`diffusion_loss` of images ``(B, C, H, W)`` captioned by ``input_ids`` ``(B, T)``."""
        if input_ids.shape[0] != images.shape[0]:
            _fail(f"input_ids must hold one caption per image ({images.shape[0]}), got "
                  f"{describe(input_ids)}")
        with torch.no_grad():
            latents = self.autoencoder.images_to_latents(images, generator=generator)
        context = self.encode_prompt(input_ids, attention_mask)
        return diffusion_loss(self.unet, self.schedule, latents, context, generator)

    @torch.no_grad()
    def generate(self, input_ids, uncond_input_ids=None, *, image_size=None, latents=None, steps: int = 50,
                 guidance_scale: float = 7.5, sampler: str = "ddim", eta: float = 0.0, generator=None):
        """Images ``(B, C, H, W)`` in ``[0, 1]`` for captions ``input_ids`` ``(B, T)``.

        ``uncond_input_ids`` (``(B, T)`` or ``(1, T)``, e.g. the empty caption) enables guidance
        at ``guidance_scale``. The start is ``latents`` ``(B, C, h, w)`` or noise of
        ``image_size`` (an int or ``(H, W)``, multiples of the autoencoder's downscale) drawn
        with ``generator``; ``sampler`` is "ddim" (with ``eta``) or "ddpm".
        """
        context = self.encode_prompt(input_ids)
        uncond = None
        if uncond_input_ids is not None:
            uncond = self.encode_prompt(uncond_input_ids).expand(context.shape[0], -1, -1)
        latents = self.sample_latents(context, uncond, self._start(context, image_size, latents, generator),
                                      steps=steps, guidance_scale=guidance_scale, sampler=sampler, eta=eta,
                                      generator=generator)
        return (self.autoencoder.latents_to_images(latents) / 2 + 0.5).clamp(0, 1)

    def sample_latents(self, context, uncond_context, latents, *, steps: int = 50,
                       guidance_scale: float = 7.5, sampler: str = "ddim", eta: float = 0.0, generator=None):
        """The denoising loop from noise ``latents`` ``(B, C, h, w)`` given the U-Net's contexts
        ``(B, M, width)``: diffusers' pipeline loop with ``prompt_embeds=context`` and
        ``negative_prompt_embeds=uncond_context``."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            _fail(f"steps must be a positive int, got {steps!r}")
        if sampler not in SAMPLERS:
            _fail(f"sampler must be one of {tuple(SAMPLERS)}, got {sampler!r}")
        stepper = SAMPLERS[sampler](self.schedule, steps, **({"eta": eta} if sampler == "ddim" else {}))
        for t in stepper.timesteps.tolist():
            prediction = guided_prediction(self.unet, latents, t, context, uncond_context, guidance_scale)
            latents = stepper.step(prediction, t, latents, generator=generator)
        return latents

    def _start(self, context, image_size, latents, generator):
        """Noise latents ``(B, latent channels, H/f, W/f)``, or the given ``latents`` checked."""
        vae = self.autoencoder
        channels, factor = vae.config.latent_channels, vae.downscale
        if latents is not None:
            if not isinstance(latents, torch.Tensor) or latents.dim() != 4 \
                    or latents.shape[:2] != (context.shape[0], channels):
                _fail(f"latents must be ({context.shape[0]}, {channels}, h, w), got {describe(latents)}")
            return latents
        size = (image_size, image_size) if isinstance(image_size, int) else image_size
        if not isinstance(size, tuple | list) or len(size) != 2 or any(
                isinstance(s, bool) or not isinstance(s, int) or s < 1 or s % factor for s in size):
            _fail(f"image_size must be an int or (H, W), positive multiples of {factor} (the autoencoder's "
                  f"downscale), got {image_size!r}")
        shape = (context.shape[0], channels, size[0] // factor, size[1] // factor)
        device = generator.device if generator is not None else "cpu"
        return torch.randn(shape, generator=generator, device=device, dtype=context.dtype).to(context.device)
