"""Diffusion noise schedules and the DDPM / DDIM samplers of the latent-diffusion model, equal bit for bit
to diffusers' ``DDPMScheduler`` / ``DDIMScheduler`` given the same model output and noise (the same float32
and numpy calls, the same expressions in the same order); ``from_diffusers`` refuses what is not here."""

from __future__ import annotations

import dataclasses
import inspect
import math
from functools import cached_property

import numpy as np
import torch

from fastseq.models.inputs import check_positive_ints, describe

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
# Every __init__ argument of diffusers' DDPMScheduler and DDIMScheduler is read, required to keep the one
# value implemented here, or ignored (the last two only matter with thresholding=True, which is refused).
_READ = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type", "clip_sample",
         "clip_sample_range", "timestep_spacing", "steps_offset", "set_alpha_to_one")
_REQUIRED = {"trained_betas": None, "variance_type": "fixed_small", "thresholding": False,
             "rescale_betas_zero_snr": False}
_IGNORED = ("dynamic_thresholding_ratio", "sample_max_value")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fail(where, message):
    raise ValueError(f"{where}: {message}")


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """The forward process q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), t in [0, num_train_timesteps),
    and what a sampler needs to run it backwards: diffusers' scheduler arguments of the same names, with
    Stable Diffusion's values as defaults."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"  # what the model predicts: the noise, v, or x_0 ("sample")
    clip_sample: bool = False  # clamp the predicted x_0 to [-clip_sample_range, clip_sample_range]
    clip_sample_range: float = 1.0
    timestep_spacing: str = "leading"
    steps_offset: int = 0  # added to "leading" timesteps only, as in diffusers
    set_alpha_to_one: bool = True  # DDIM's abar after its last step: 1, or else abar_0

    def __post_init__(self):
        check_positive_ints(self, ("num_train_timesteps",), "NoiseSchedule")
        for name, allowed in (("beta_schedule", BETA_SCHEDULES), ("prediction_type", PREDICTION_TYPES),
                              ("timestep_spacing", TIMESTEP_SPACINGS)):
            if getattr(self, name) not in allowed:
                _fail("NoiseSchedule", f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        start, end = self.beta_start, self.beta_end
        if not (isinstance(start, int | float) and isinstance(end, int | float) and 0 < start <= end < 1):
            _fail("NoiseSchedule", f"beta_start and beta_end must satisfy 0 < beta_start <= beta_end < 1, "
                                   f"got {start!r} and {end!r}")
        if not _is_int(self.steps_offset) or self.steps_offset < 0:
            _fail("NoiseSchedule", f"steps_offset must be an int >= 0, got {self.steps_offset!r}")
        if not isinstance(self.clip_sample_range, int | float) or not self.clip_sample_range > 0:
            _fail("NoiseSchedule", f"clip_sample_range must be a number > 0, got {self.clip_sample_range!r}")
        for name in ("clip_sample", "set_alpha_to_one"):  # a truthy string would pass silently
            if not isinstance(getattr(self, name), bool):
                _fail("NoiseSchedule", f"{name} must be a bool, got {getattr(self, name)!r}")

    @cached_property
    def betas(self) -> torch.Tensor:
        """``(num_train_timesteps,)`` float32: the variance each training step adds."""
        n = self.num_train_timesteps
        if self.beta_schedule == "linear":
            return torch.linspace(self.beta_start, self.beta_end, n, dtype=torch.float32)
        if self.beta_schedule == "scaled_linear":  # linear in sqrt(beta), Stable Diffusion's
            return torch.linspace(self.beta_start**0.5, self.beta_end**0.5, n, dtype=torch.float32) ** 2

        # squaredcos_cap_v2 (Nichol & Dhariwal 2021) fixes abar(s) = cos^2(pi/2 (s + 0.008) / 1.008); a beta
        # is one minus the ratio of consecutive abars, capped so that the last steps keep some signal. In
        # Python floats, then float32, as diffusers does, for the same rounding.
        def abar(s):
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        return torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)],
                            dtype=torch.float32)

    @cached_property
    def alphas_cumprod(self) -> torch.Tensor:
        """``(num_train_timesteps,)`` float32: abar_t, the fraction of x_0's variance left at step t."""
        return torch.cumprod(1.0 - self.betas, dim=0)

    def _scales(self, x0, noise, timesteps):
        """sqrt(abar_t), sqrt(1 - abar_t): float32, ``(B, 1, ...)`` to broadcast against a (B, ...) x0."""
        if not (isinstance(x0, torch.Tensor) and isinstance(noise, torch.Tensor)) or x0.shape != noise.shape \
                or x0.dim() < 1:
            _fail("NoiseSchedule", f"x0 and noise must be (B, ...) tensors of one shape, got {describe(x0)} "
                                   f"and {describe(noise)}")
        t = torch.as_tensor(timesteps)
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool or t.dim() > 1 \
                or t.numel() not in (1, x0.shape[0]):
            _fail("NoiseSchedule", f"timesteps must be an int or a ({x0.shape[0]},) integer tensor, got "
                                   f"{describe(t)}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_train_timesteps):
            _fail("NoiseSchedule", f"timesteps must lie in [0, {self.num_train_timesteps}), got "
                                   f"{int(t.min())}..{int(t.max())}")
        abar = self.alphas_cumprod.to(x0.device)[t.to(x0.device).long()].reshape(-1, *[1] * (x0.dim() - 1))
        return abar.sqrt(), (1 - abar).sqrt()

    def add_noise(self, x0, noise, timesteps) -> torch.Tensor:
        """x_t ~ q(x_t | x_0) from ``x0`` and ``noise`` (both ``(B, ...)``) at ``timesteps`` (``(B,)`` ints,
        or one int); float32 math (or x0's, if wider), the result in x0's dtype."""
        a, s = self._scales(x0, noise, timesteps)
        return (a * x0 + s * noise).to(x0.dtype)

    def velocity(self, x0, noise, timesteps) -> torch.Tensor:
        """v = sqrt(abar_t) noise - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022); arguments as add_noise's."""
        a, s = self._scales(x0, noise, timesteps)
        return (a * noise - s * x0).to(x0.dtype)

    def training_target(self, x0, noise, timesteps) -> torch.Tensor:
        """What the model learns to predict from x_t for ``prediction_type``; arguments as add_noise's."""
        if self.prediction_type == "v_prediction":
            return self.velocity(x0, noise, timesteps)
        self._scales(x0, noise, timesteps)  # for its checks
        return noise if self.prediction_type == "epsilon" else x0

    def inference_timesteps(self, num_steps: int) -> torch.Tensor:
        """``(num_steps,)`` int64, descending: the timesteps diffusers' ``set_timesteps`` picks."""
        n, big = num_steps, self.num_train_timesteps
        if not _is_int(n) or not 1 <= n <= big:
            _fail("NoiseSchedule", f"num_inference_steps must be an int in [1, {big}] (num_train_timesteps), "
                                   f"got {n!r}")
        if self.timestep_spacing == "leading":
            steps = np.arange(n)[::-1] * (big // n) + self.steps_offset
            if steps[0] >= big:  # diffusers would index past the schedule
                _fail("NoiseSchedule", f"steps_offset = {self.steps_offset} puts timestep {steps[0]} past "
                                       f"num_train_timesteps = {big} with {n} steps")
        elif self.timestep_spacing == "trailing":
            # np.arange with a float step can give n + 1 values, the last a timestep of -1 that diffusers
            # keeps (and reads abar[-1] at); the first n are the ones meant.
            steps = np.round(np.arange(big, 0, -big / n))[:n] - 1
        else:
            steps = np.linspace(0, big - 1, n).round()[::-1]
        return torch.from_numpy(steps.astype(np.int64))

    @classmethod
    def from_diffusers(cls, scheduler) -> NoiseSchedule:
        """The schedule of a diffusers ``DDPMScheduler`` or ``DDIMScheduler``; ValueError naming any option
        set to something not implemented here."""
        where, kind = "fastseq NoiseSchedule.from_diffusers", type(scheduler).__name__
        config = scheduler.config
        if kind not in ("DDPMScheduler", "DDIMScheduler"):
            _fail(where, f"expected a diffusers DDPMScheduler or DDIMScheduler, got {kind}")
        # Config keys that are no __init__ argument (a pipeline's leftovers) diffusers ignores; so do we.
        unknown = sorted(set(inspect.signature(type(scheduler).__init__).parameters) - {"self"} - set(_READ)
                         - set(_REQUIRED) - set(_IGNORED))
        if unknown:  # an option of a newer diffusers
            _fail(where, f"{unknown[0]} = {config.get(unknown[0])!r} is not implemented (an unknown option)")
        for option, want in _REQUIRED.items():
            got = config.get(option, want)
            if (got is not None) if want is None else got != want:
                _fail(where, f"{option} = {got!r} is not implemented (only {want!r})")
        for option, allowed in (("beta_schedule", BETA_SCHEDULES), ("prediction_type", PREDICTION_TYPES),
                                ("timestep_spacing", TIMESTEP_SPACINGS)):
            if config[option] not in allowed:
                _fail(where, f"{option} = {config[option]!r} is not implemented (implemented: {allowed})")
        return cls(**{name: config[name] for name in _READ if name in config})


class _Sampler:
    """What DDPM and DDIM share: the timesteps, the checks, the x_0 / noise predictions, the noise draw."""

    diffusers_class = ""

    def __init__(self, schedule: NoiseSchedule, num_inference_steps: int):
        if not isinstance(schedule, NoiseSchedule):
            _fail(type(self).__name__, f"schedule must be a NoiseSchedule, got {describe(schedule)}")
        self.schedule, self.num_inference_steps = schedule, num_inference_steps
        self.timesteps = schedule.inference_timesteps(num_inference_steps)
        self.alphas_cumprod = schedule.alphas_cumprod  # on the CPU: its 0-d entries act as scalars anywhere
        self._index = {t: i for i, t in enumerate(self.timesteps.tolist())}

    @classmethod
    def from_diffusers(cls, scheduler, num_inference_steps: int, **options):
        """The sampler stepping as ``scheduler`` does after ``set_timesteps(num_inference_steps)``."""
        if type(scheduler).__name__ != cls.diffusers_class:
            _fail(f"fastseq {cls.__name__}.from_diffusers",
                  f"expected a diffusers {cls.diffusers_class}, got {type(scheduler).__name__}")
        return cls(NoiseSchedule.from_diffusers(scheduler), num_inference_steps, **options)

    def _prepare(self, model_output, timestep, sample, noise, generator):
        """Check the step's arguments; return t as an int and the inputs in (at least) float32."""
        where, t = f"{type(self).__name__}.step", timestep
        if isinstance(t, torch.Tensor) and t.numel() == 1 and not t.is_floating_point():
            t = int(t)
        if not _is_int(t) or t not in self._index:
            _fail(where, f"timestep must be one of .timesteps ({int(self.timesteps[0])}, ..., "
                         f"{int(self.timesteps[-1])}), got {timestep!r}")
        for name, value in (("model_output", model_output), ("noise", noise)):
            if (value is not None or name == "model_output") and not (
                    isinstance(value, torch.Tensor) and isinstance(sample, torch.Tensor)
                    and value.shape == sample.shape):
                _fail(where, f"{name} must be a tensor of the sample's shape, got {describe(value)} for a "
                             f"{describe(sample)} sample")
        if noise is not None and generator is not None:
            _fail(where, "pass noise or generator, not both")
        # Upcast by hand: the 0-d float32 coefficients would not promote a half-precision sample.
        dtype = torch.promote_types(sample.dtype, torch.float32)
        return t, model_output.to(dtype), sample.to(dtype)

    def _predict(self, model_output, sample, abar):
        """(x_0, noise) read off the model output at abar_t; x_0 clipped if the schedule says so, the noise
        not recomputed from the clipped x_0 (as diffusers)."""
        s = self.schedule
        if s.prediction_type == "epsilon":
            x0, eps = (sample - (1 - abar).sqrt() * model_output) / abar.sqrt(), model_output
        elif s.prediction_type == "sample":
            x0, eps = model_output, (sample - abar.sqrt() * model_output) / (1 - abar).sqrt()
        else:
            x0 = abar.sqrt() * sample - (1 - abar).sqrt() * model_output
            eps = abar.sqrt() * model_output + (1 - abar).sqrt() * sample
        if s.clip_sample:
            x0 = x0.clamp(-s.clip_sample_range, s.clip_sample_range)
        return x0, eps

    @staticmethod
    def _noise(noise, generator, like):
        if noise is not None:
            return noise
        # diffusers' randn_tensor draw: the model output's dtype, on the generator's device, then moved.
        device = generator.device if generator is not None else like.device
        return torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


class DDPMSampler(_Sampler):
    """Ancestral sampling (Ho et al. 2020) on ``num_inference_steps`` of the schedule's timesteps with the
    posterior's variance ("fixed_small"), as diffusers' ``DDPMScheduler``."""

    diffusers_class = "DDPMScheduler"

    def step(self, model_output, timestep, sample, noise=None, generator=None) -> torch.Tensor:
        """x_prev from ``model_output`` and x_t ``sample`` (one shape ``(B, ...)``) at ``timestep`` (one of
        ``.timesteps``); ``noise`` (that shape) is added as is, else drawn with ``generator``, except at
        t = 0. Float32 math, the result in the sample's dtype."""
        t, out, x = self._prepare(model_output, timestep, sample, noise, generator)
        i = self._index[t] + 1  # the previous timestep is the next of .timesteps: t - T // n for "leading"
        prev = int(self.timesteps[i]) if i < len(self.timesteps) else -1
        abar = self.alphas_cumprod[t]
        abar_prev = self.alphas_cumprod[prev] if prev >= 0 else torch.tensor(1.0)
        x0, _ = self._predict(out, x, abar)
        alpha = abar / abar_prev  # 1 - beta over the steps skipped
        beta = 1 - alpha
        # The mean of q(x_prev | x_t, x_0).
        x0_coef, x_coef = abar_prev.sqrt() * beta / (1 - abar), alpha.sqrt() * (1 - abar_prev) / (1 - abar)
        prev_sample = x0_coef * x0 + x_coef * x
        if t > 0:  # not "on the last step": with steps_offset it is t > 0, and draws (a variance of 1e-20)
            variance = ((1 - abar_prev) / (1 - abar) * beta).clamp(min=1e-20)
            prev_sample = prev_sample + variance.sqrt() * self._noise(noise, generator, model_output)
        return prev_sample.to(sample.dtype)


class DDIMSampler(_Sampler):
    """DDIM (Song et al. 2021) on ``num_inference_steps`` of the schedule's timesteps: deterministic at
    ``eta`` = 0, DDPM-like at ``eta`` = 1, as diffusers' ``DDIMScheduler`` (``eta`` is its step's)."""

    diffusers_class = "DDIMScheduler"

    def __init__(self, schedule: NoiseSchedule, num_inference_steps: int, eta: float = 0.0):
        super().__init__(schedule, num_inference_steps)
        if not isinstance(eta, int | float) or isinstance(eta, bool) or not 0 <= eta < math.inf:
            _fail("DDIMSampler", f"eta must be a finite number >= 0, got {eta!r}")
        self.eta = float(eta)
        self.final_alpha_cumprod = torch.tensor(1.0) if schedule.set_alpha_to_one else self.alphas_cumprod[0]

    def step(self, model_output, timestep, sample, noise=None, generator=None) -> torch.Tensor:
        """x_prev from ``model_output`` and x_t ``sample`` (one shape ``(B, ...)``) at ``timestep`` (one of
        ``.timesteps``); if eta > 0, ``noise`` (that shape) is added as is, else drawn with ``generator``.
        Float32 math, the result in the sample's dtype."""
        t, out, x = self._prepare(model_output, timestep, sample, noise, generator)
        # diffusers' rule for every spacing, even where the next of .timesteps is another ("linspace").
        prev = t - self.schedule.num_train_timesteps // self.num_inference_steps
        abar = self.alphas_cumprod[t]
        abar_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
        x0, eps = self._predict(out, x, abar)
        variance = (1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)  # of q(x_prev | x_t, x_0)
        std = self.eta * variance.sqrt()
        # The clamp only acts where rounding takes it below 0 (diffusers gets NaN there).
        prev_sample = abar_prev.sqrt() * x0 + (1 - abar_prev - std**2).clamp(min=0).sqrt() * eps
        if self.eta > 0:
            prev_sample = prev_sample + std * self._noise(noise, generator, model_output)
        return prev_sample.to(sample.dtype)
