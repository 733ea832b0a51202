"""fastseq.models.schedulers against diffusers' DDPMScheduler and DDIMScheduler: schedules, timesteps,
every step of a sampling loop, the forward process, and the refusals."""

import itertools

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, PNDMScheduler

from fastseq.models.schedulers import DDIMSampler, DDPMSampler, NoiseSchedule

EXACT = dict(rtol=1e-5, atol=1e-6)
SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTIONS = ("epsilon", "v_prediction", "sample")
SPACINGS = ("leading", "trailing", "linspace")


def _config(i, **options):
    """A small config, its secondary options varied with the case number ``i``."""
    return dict(num_train_timesteps=(1000, 100, 57)[i % 3], beta_start=(0.00085, 0.0001)[i % 2],
                beta_end=(0.012, 0.02)[i // 2 % 2], beta_schedule=SCHEDULES[i // 3 % 3],
                steps_offset=i // 4 % 2, clip_sample=i // 2 % 2 == 1,
                clip_sample_range=(1.0, 0.5)[i // 5 % 2], **options)


# Every spacing x prediction type x steps, with beta schedules, offsets, clipping, sizes cycled through.
LOOPS = [dict(case=i, spacing=spacing, prediction=prediction, steps=steps) for i, (spacing, prediction, steps)
         in enumerate(itertools.product(SPACINGS, PREDICTIONS, (1, 7, 50)))]


def _loop_id(loop):
    return f"{loop['case']}-{loop['spacing']}-{loop['prediction']}-{loop['steps']}"


def _model_output(sample, fixed):
    return 0.1 * sample + fixed  # a fake model, the same for both loops


def _start(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 4, 4, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)


@pytest.mark.parametrize("beta_schedule", SCHEDULES)
@pytest.mark.parametrize("num_train_timesteps", [1000, 37])
def test_betas_and_alphas_cumprod_equal_diffusers(beta_schedule, num_train_timesteps):
    config = dict(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, beta_start=0.001,
                  beta_end=0.015)
    theirs, ours = DDPMScheduler(**config), NoiseSchedule(**config)
    assert ours.betas.dtype == ours.alphas_cumprod.dtype == torch.float32
    torch.testing.assert_close(ours.betas, theirs.betas, rtol=0, atol=0)
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod, rtol=0, atol=0)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("num_train_timesteps", [1000, 30])
def test_inference_timesteps_equal_diffusers(spacing, steps_offset, num_train_timesteps):
    config = dict(num_train_timesteps=num_train_timesteps, timestep_spacing=spacing,
                  steps_offset=steps_offset)
    ours = NoiseSchedule(**config)
    for steps in (1, 2, 7, 29, 50, 333, 999, 1000):
        # diffusers' leading timesteps with an offset and steps == T overflow: refused below
        if steps > num_train_timesteps or (spacing == "leading" and steps_offset
                                           and steps == num_train_timesteps):
            continue
        for cls in (DDPMScheduler, DDIMScheduler):
            theirs = cls(**config)
            theirs.set_timesteps(steps)
            got = ours.inference_timesteps(steps)
            assert got.dtype == torch.int64 and torch.equal(got, theirs.timesteps), (cls.__name__, steps)


def test_trailing_spacing_keeps_the_steps_asked_for_where_diffusers_adds_a_minus_one():
    # np.arange(1000, 0, -1000 / 61) has 62 values: diffusers' last timestep is -1.
    theirs = DDIMScheduler(timestep_spacing="trailing")
    theirs.set_timesteps(61)
    ours = NoiseSchedule(timestep_spacing="trailing").inference_timesteps(61)
    assert len(theirs.timesteps) == 62 and int(theirs.timesteps[-1]) == -1
    assert torch.equal(ours, theirs.timesteps[:61])


@pytest.mark.parametrize("loop", LOOPS, ids=_loop_id)
def test_ddpm_sampling_loop_equals_diffusers(loop):
    config = _config(loop["case"], timestep_spacing=loop["spacing"], prediction_type=loop["prediction"])
    theirs = DDPMScheduler(**config)
    theirs.set_timesteps(loop["steps"])
    ours = DDPMSampler.from_diffusers(theirs, loop["steps"])
    assert torch.equal(ours.timesteps, theirs.timesteps[:loop["steps"]])  # see the trailing test above
    sample, fixed = _start()
    gen_theirs, gen_ours = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for t in ours.timesteps:
        out = _model_output(sample, fixed)
        want = theirs.step(out, t, sample, generator=gen_theirs).prev_sample
        torch.testing.assert_close(ours.step(out, t, sample, generator=gen_ours), want, **EXACT)
        sample = want
    assert torch.equal(gen_ours.get_state(), gen_theirs.get_state())  # the same number of draws


@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("loop", LOOPS, ids=_loop_id)
def test_ddim_sampling_loop_equals_diffusers(loop, eta):
    config = _config(loop["case"], timestep_spacing=loop["spacing"], prediction_type=loop["prediction"],
                     set_alpha_to_one=loop["case"] // 3 % 2 == 0)
    theirs = DDIMScheduler(**config)
    theirs.set_timesteps(loop["steps"])
    ours = DDIMSampler.from_diffusers(theirs, loop["steps"], eta=eta)
    assert torch.equal(ours.timesteps, theirs.timesteps[:loop["steps"]])  # see the trailing test above
    sample, fixed = _start()
    for t in ours.timesteps:
        out, noise = _model_output(sample, fixed), torch.randn_like(sample)
        want = theirs.step(out, t, sample, eta=eta, variance_noise=noise).prev_sample
        torch.testing.assert_close(ours.step(out, t, sample, noise=noise), want, **EXACT)
        sample = want


def test_ddim_draws_its_noise_like_diffusers():
    theirs = DDIMScheduler(num_train_timesteps=100)
    theirs.set_timesteps(10)
    ours = DDIMSampler.from_diffusers(theirs, 10, eta=1.0)
    sample, out = _start()
    want = theirs.step(out, 50, sample, eta=1.0, generator=torch.Generator().manual_seed(3)).prev_sample
    torch.testing.assert_close(ours.step(out, 50, sample, generator=torch.Generator().manual_seed(3)), want,
                               **EXACT)


def test_noise_is_used_as_given():
    ours = DDPMSampler(NoiseSchedule(), 10)
    sample, out = _start()
    noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(5))
    drawn = ours.step(out, 500, sample, generator=torch.Generator().manual_seed(5))
    assert torch.equal(ours.step(out, 500, sample, noise=noise), drawn)
    assert not torch.equal(ours.step(out, 500, sample, noise=torch.zeros_like(noise)), drawn)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("beta_schedule", SCHEDULES)
def test_add_noise_velocity_and_training_target_equal_diffusers(prediction, beta_schedule):
    theirs = DDPMScheduler(beta_schedule=beta_schedule, prediction_type=prediction)
    ours = NoiseSchedule.from_diffusers(theirs)
    x0, noise = _start()
    timesteps = torch.tensor([0, 999])
    torch.testing.assert_close(ours.add_noise(x0, noise, timesteps), theirs.add_noise(x0, noise, timesteps),
                               **EXACT)
    velocity = theirs.get_velocity(x0, noise, timesteps)
    torch.testing.assert_close(ours.velocity(x0, noise, timesteps), velocity, **EXACT)
    want = {"epsilon": noise, "sample": x0, "v_prediction": velocity}[prediction]
    torch.testing.assert_close(ours.training_target(x0, noise, timesteps), want, **EXACT)
    torch.testing.assert_close(ours.add_noise(x0, noise, 321), theirs.add_noise(x0, noise, torch.tensor(321)),
                               **EXACT)


def test_results_come_in_the_sample_dtype_from_float32_math():
    schedule = NoiseSchedule()
    sample, out = _start()
    half, half_out, timesteps = sample.bfloat16(), out.bfloat16(), torch.tensor([10, 900])
    noisy = schedule.add_noise(half, half_out, timesteps)
    assert noisy.dtype == torch.bfloat16
    want = schedule.add_noise(half.float(), half_out.float(), timesteps).bfloat16()
    torch.testing.assert_close(noisy, want, rtol=0, atol=0)
    ddim = DDIMSampler(schedule, 10)
    got = ddim.step(half_out, 900, half)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, ddim.step(half_out.float(), 900, half.float()).bfloat16(), rtol=0, atol=0)


@pytest.mark.parametrize("scheduler, match", [
    (DDPMScheduler(thresholding=True), "thresholding = True is not implemented"),
    (DDIMScheduler(thresholding=True), "thresholding = True is not implemented"),
    (DDPMScheduler(trained_betas=[0.1] * 1000), "trained_betas = .* is not implemented"),
    (DDIMScheduler(rescale_betas_zero_snr=True), "rescale_betas_zero_snr = True is not implemented"),
    (DDPMScheduler(variance_type="fixed_large"), "variance_type = 'fixed_large' is not implemented"),
    (DDPMScheduler(variance_type="learned_range"), "variance_type = 'learned_range' is not implemented"),
    (DDPMScheduler(beta_schedule="sigmoid"), "beta_schedule = 'sigmoid' is not implemented"),
    (DDIMScheduler(timestep_spacing="karras"), "timestep_spacing = 'karras' is not implemented"),
    (DDIMScheduler(prediction_type="flow"), "prediction_type = 'flow' is not implemented"),
    (PNDMScheduler(), "expected a diffusers DDPMScheduler or DDIMScheduler, got PNDMScheduler"),
])
def test_from_diffusers_refuses_what_fastseq_does_not_implement(scheduler, match):
    with pytest.raises(ValueError, match=match):
        NoiseSchedule.from_diffusers(scheduler)


def test_from_diffusers_reads_the_options_and_ignores_what_diffusers_ignores():
    scheduler = DDIMScheduler.from_config(dict(
        num_train_timesteps=500, beta_start=0.001, beta_end=0.01, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction",
        timestep_spacing="trailing", clip_sample_range=2.0, sample_max_value=3.0, skip_prk_steps=True))
    assert NoiseSchedule.from_diffusers(scheduler) == NoiseSchedule(
        num_train_timesteps=500, beta_start=0.001, beta_end=0.01, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction",
        timestep_spacing="trailing", clip_sample_range=2.0)
    with pytest.raises(ValueError, match="expected a diffusers DDPMScheduler, got DDIMScheduler"):
        DDPMSampler.from_diffusers(scheduler, 10)
    with pytest.raises(ValueError, match="expected a diffusers DDIMScheduler, got DDPMScheduler"):
        DDIMSampler.from_diffusers(DDPMScheduler(), 10)


@pytest.mark.parametrize("options, match", [
    (dict(beta_schedule="foo"), r"beta_schedule must be one of \('linear', .*\), got 'foo'"),
    (dict(prediction_type="eps"), r"prediction_type must be one of \('epsilon', .*\), got 'eps'"),
    (dict(timestep_spacing="karras"), r"timestep_spacing must be one of \('leading', .*\), got 'karras'"),
    (dict(num_train_timesteps=0), "num_train_timesteps must be a positive int, got 0"),
    (dict(beta_start=0.02, beta_end=0.01),
     "beta_start and beta_end must satisfy 0 < beta_start <= beta_end < 1, got 0.02 and 0.01"),
    (dict(steps_offset=-1), "steps_offset must be an int >= 0, got -1"),
    (dict(clip_sample_range=0.0), "clip_sample_range must be a number > 0, got 0.0"),
    (dict(clip_sample="yes"), "clip_sample must be a bool, got 'yes'"),
])
def test_noise_schedule_refuses_bad_options_by_name(options, match):
    with pytest.raises(ValueError, match=f"NoiseSchedule: {match}"):
        NoiseSchedule(**options)


def _bad_calls():
    schedule, (sample, out) = NoiseSchedule(num_train_timesteps=100), _start()
    ddim = DDIMSampler(schedule, 10, eta=1.0)
    steps = r"num_inference_steps must be an int in \[1, 100\] \(num_train_timesteps\), got "
    return {
        "zero steps": (lambda: DDPMSampler(schedule, 0), steps + "0"),
        "too many steps": (lambda: DDIMSampler(schedule, 101), steps + "101"),
        "float steps": (lambda: DDPMSampler(schedule, 2.5), steps + "2.5"),
        "bool steps": (lambda: DDPMSampler(schedule, True), steps + "True"),
        "offset past the end": (lambda: NoiseSchedule(num_train_timesteps=100, steps_offset=1)
                                .inference_timesteps(100),
                                "steps_offset = 1 puts timestep 100 past num_train_timesteps = 100"),
        "negative eta": (lambda: DDIMSampler(schedule, 10, eta=-0.5),
                         "DDIMSampler: eta must be a finite number >= 0, got -0.5"),
        "not a schedule": (lambda: DDIMSampler(DDIMScheduler(), 10),
                           "schedule must be a NoiseSchedule, got DDIMScheduler"),
        "timestep not in .timesteps": (lambda: ddim.step(out, 95, sample),
                                       r"DDIMSampler.step: timestep must be one of .timesteps \(90, \.\.\., "
                                       r"0\), got 95"),
        "float timestep": (lambda: ddim.step(out, 90.0, sample), "timestep must be one of .timesteps"),
        "shapes differ": (lambda: ddim.step(out[..., 0], 90, sample),
                          r"model_output must be a tensor of the sample's shape, got torch.float32 "
                          r"\(2, 3, 4\) for a torch.float32 \(2, 3, 4, 4\) sample"),
        "noise and generator": (lambda: ddim.step(out, 90, sample, noise=out, generator=torch.Generator()),
                                "pass noise or generator, not both"),
        "noise shape": (lambda: ddim.step(out, 90, sample, noise=out[:1]),
                        r"noise must be a tensor of the sample's shape, got torch.float32 \(1, 3, 4, 4\)"),
        "noise not a tensor": (lambda: ddim.step(out, 90, sample, noise=0.0),
                               "noise must be a tensor of the sample's shape, got float"),
        "timestep out of range": (lambda: schedule.add_noise(sample, out, torch.tensor([0, 100])),
                                  r"timesteps must lie in \[0, 100\), got 0..100"),
        "float timesteps": (lambda: schedule.add_noise(sample, out, torch.tensor([0.5, 1.0])),
                            r"timesteps must be an int or a \(2,\) integer tensor, got torch.float32"),
        "timesteps per sample": (lambda: schedule.add_noise(sample, out, torch.tensor([1, 2, 3])),
                                 r"timesteps must be an int or a \(2,\) integer tensor"),
        "x0 and noise differ": (lambda: schedule.velocity(sample, out[:1], 3),
                                "x0 and noise must be .* tensors of one shape"),
    }


@pytest.mark.parametrize("case", _bad_calls())
def test_bad_arguments_are_refused_by_name(case):
    call, match = _bad_calls()[case]
    with pytest.raises(ValueError, match=match):
        call()
