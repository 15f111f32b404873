"""Tests of ddpm_course.sampling: DDPM and DDIM steps and loops against diffusers' schedulers, interpolation, memory."""

import gc
import weakref

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn

import ddpm_course.ddpm
from ddpm_course.ddpm import DDPM
from ddpm_course.sampling import (ddim_step, ddim_timesteps, ddpm_step, interpolate_diffusion, sample_ddim,
                                  sample_ddpm, slerp)
from ddpm_course.schedules import NoiseSchedule, cosine_beta_schedule, linear_beta_schedule

T = 1000
SCHEDULES = {"linear": linear_beta_schedule(T), "cosine": cosine_beta_schedule(T)}


def schedule(name="linear"):
    return NoiseSchedule(SCHEDULES[name])


def float64_reference(scheduler, name):
    "Make a diffusers scheduler compute in float64 (its own alpha-bar is float32), so it is the more exact of the two."
    scheduler.alphas_cumprod = torch.cumprod(1 - SCHEDULES[name], 0)
    return scheduler


def batch(seed, shape=(4, 1, 8, 8), scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(shape, generator=g)


class FakeEps(nn.Module):
    "A fixed smooth function of (x, t) standing in for a trained network; it has a parameter, as a network has."

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.3))

    def forward(self, x, t):
        return self.w * torch.tanh(x) + 0.2 * torch.sin(t.float() / 100).reshape(-1, *[1] * (x.ndim - 1))


def fake_ddpm(name="linear"):
    return DDPM(FakeEps(), schedule(name), sample_shape=(1, 8, 8))


def test_ddpm_step_is_reexported_not_redefined():
    import ddpm_course.sampling as sampling
    assert sampling.ddpm_step is ddpm_course.ddpm.ddpm_step
    assert "ddpm_step" in sampling.__all__


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("t", [999, 600, 37, 1, 0])
def test_ddpm_step_matches_diffusers(name, variance, clip, t):
    s = schedule(name)
    ref = float64_reference(DDPMScheduler(num_train_timesteps=T, trained_betas=SCHEDULES[name].numpy(),
                                          variance_type=variance, clip_sample=clip, prediction_type="epsilon"), name)
    xt, eps = batch(1, scale=1.5), batch(2)  # scale 1.5: the predicted x0 leaves [-1, 1], so clipping matters
    noise = torch.randn(xt.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).float()
    want = ref.step(eps.double(), t, xt.double(), generator=torch.Generator().manual_seed(7)).prev_sample
    got = ddpm_step(s, eps, t, xt, noise=noise, variance=variance, clip_x0=clip)
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-5)


def test_ddpm_step_adds_no_noise_at_t0_and_noise_otherwise():
    s, xt, eps = schedule(), batch(1), batch(2)
    assert torch.equal(ddpm_step(s, eps, 0, xt), ddpm_step(s, eps, 0, xt, noise=batch(3)))
    assert not torch.equal(ddpm_step(s, eps, 1, xt, noise=batch(3)), ddpm_step(s, eps, 1, xt, noise=batch(4)))


def test_clipping_only_matters_when_x0_leaves_the_data_range():
    s, eps = schedule(), batch(2, scale=0.01)
    xt = s.q_sample(batch(1).clamp(-0.9, 0.9), torch.full((4,), 10), eps)  # x0_hat inside [-1, 1]
    torch.testing.assert_close(ddpm_step(s, eps, 10, xt, noise=eps, clip_x0=True),
                               ddpm_step(s, eps, 10, xt, noise=eps, clip_x0=False))


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 50, 1000])
def test_ddim_timesteps_match_diffusers(spacing, steps):
    ref = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
    ref.set_timesteps(steps)
    assert ddim_timesteps(T, steps, spacing) == ref.timesteps.tolist()


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("steps,t", [(1000, 500), (50, 980), (50, 500), (10, 900), (10, 0), (50, 0)])
def test_ddim_step_matches_diffusers(name, eta, clip, steps, t):
    ref = float64_reference(DDIMScheduler(num_train_timesteps=T, trained_betas=SCHEDULES[name].numpy(),
                                          clip_sample=clip, set_alpha_to_one=True, prediction_type="epsilon"), name)
    ref.set_timesteps(steps)  # leading spacing: t - T // steps is the step before t; below 0 it is x_0 (alpha-bar 1)
    t_prev = max(t - T // steps, -1)
    xt, eps, noise = batch(1, scale=1.5), batch(2), batch(3)
    want = ref.step(eps.double(), t, xt.double(), eta=eta, use_clipped_model_output=True,
                    variance_noise=noise.double()).prev_sample
    got = ddim_step(schedule(name), eps, t, t_prev, xt, eta=eta, noise=noise, clip_x0=clip)
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-5)


def test_ddim_final_step_returns_the_predicted_x0():
    s, xt, eps = schedule(), batch(1), batch(2)
    t = torch.full((4,), 20)
    torch.testing.assert_close(ddim_step(s, eps, 20, -1, xt, eta=1.0, clip_x0=False), s.predict_x0(xt, t, eps))


def test_ddim_with_eta_1_on_adjacent_steps_is_the_ddpm_posterior():
    s, xt, eps, z = schedule(), batch(1), batch(2), batch(3)
    torch.testing.assert_close(ddim_step(s, eps, 400, 399, xt, eta=1.0, noise=z),
                               ddpm_step(s, eps, 400, xt, noise=z), rtol=1e-4, atol=1e-5)


def diffusers_loop(ddpm, scheduler, x, step_kwargs):
    for t in scheduler.timesteps:
        x = scheduler.step(ddpm.model(x, t.repeat(x.shape[0])), t, x, **step_kwargs).prev_sample
    return x


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("steps", [10, 50])
def test_sample_ddim_loop_matches_diffusers(spacing, steps):
    ddpm = fake_ddpm()
    ref = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing, clip_sample=True)
    ref.set_timesteps(steps)
    xT = batch(5)
    want = diffusers_loop(ddpm, ref, xT.clone(), dict(eta=0.0, use_clipped_model_output=True))
    got = sample_ddim(ddpm, steps=steps, spacing=spacing, xt=xT)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_sample_ddpm_loop_matches_diffusers():
    ddpm = fake_ddpm()
    ref = DDPMScheduler(num_train_timesteps=T, clip_sample=True)
    ref.set_timesteps(T)
    g = torch.Generator().manual_seed(11)
    xT = torch.randn((3, 1, 8, 8), generator=g)
    want = diffusers_loop(ddpm, ref, xT, dict(generator=g))
    got = sample_ddpm(ddpm, 3, seed=11)  # the same generator draws x_T first, then one z per step
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_ddim_with_the_exact_denoiser_recovers_a_gaussian():
    "With the true E[eps | x_t] for N(mu, sigma^2), DDIM with all T steps (eta 0 or 1) returns N(mu, sigma^2)."
    s, mu, sigma, n = schedule(), torch.tensor([0.5, -1.0]), 0.3, 20000

    class GaussianEps(nn.Module):
        def forward(self, x, t):
            ab = s.alphas_cumprod[t][:, None]
            return (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * sigma**2 + 1 - ab)

    ddpm = DDPM(GaussianEps(), s, sample_shape=(2,))
    for eta in (0.0, 1.0):
        x = sample_ddim(ddpm, n, steps=T, eta=eta, seed=0, clip_x0=False)
        assert (x.mean(0) - mu).abs().max() < 5 * sigma / n**0.5
        assert (x.std(0) / sigma - 1).abs().max() < 0.03


def test_seed_makes_sampling_repeatable_and_batches_concatenate():
    ddpm = fake_ddpm()
    a = sample_ddim(ddpm, 6, steps=20, eta=1.0, seed=3)
    b = sample_ddim(ddpm, 6, steps=20, eta=1.0, seed=3)
    assert torch.equal(a, b)
    assert not torch.equal(a, sample_ddim(ddpm, 6, steps=20, eta=1.0, seed=4))
    xT = batch(9, (6, 1, 8, 8))
    torch.testing.assert_close(sample_ddim(ddpm, xt=xT, steps=20, batch_size=4), sample_ddim(ddpm, xt=xT, steps=20))


def test_intermediates_shapes_and_ends():
    ddpm = fake_ddpm()
    x, states = sample_ddim(ddpm, 5, steps=8, seed=0, batch_size=2, return_intermediates=True)
    assert states.shape == (9, 5, 1, 8, 8) and torch.equal(states[-1], x)
    x, states = sample_ddpm(ddpm, 2, seed=0, return_intermediates=True)
    assert states.shape == (T + 1, 2, 1, 8, 8) and torch.equal(states[-1], x)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sampling_keeps_no_graph_and_no_states_over_1000_steps(sampler):
    ddpm, seen = fake_ddpm(), []
    forward = ddpm.model.forward

    def spy(x, t):
        seen.append(weakref.ref(x))
        return forward(x, t)

    ddpm.model.forward = spy
    out = sample_ddpm(ddpm, 2, seed=0) if sampler == "ddpm" else sample_ddim(ddpm, 2, steps=T, eta=1.0, seed=0)
    gc.collect()
    assert len(seen) == T and not out.requires_grad and out.grad_fn is None
    assert sum(r() is not None for r in seen) <= 1  # every earlier x_t has been freed


def test_slerp_endpoints_norm_and_angle():
    a, b = batch(1, (3, 16)), batch(2, (3, 16))
    b = b / b.norm(dim=1, keepdim=True) * a.norm(dim=1, keepdim=True)  # equal norms
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)
    m = slerp(a, b, 0.3)
    torch.testing.assert_close(m.norm(dim=1), a.norm(dim=1))
    ang = lambda u, v: torch.acos((u * v).sum(1) / (u.norm(dim=1) * v.norm(dim=1)))
    torch.testing.assert_close(ang(a, m), 0.3 * ang(a, b), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(slerp(a, 2 * a, 0.5), 1.5 * a)  # parallel: a straight line


def test_interpolate_diffusion_endpoints_ignore_the_other_image():
    ddpm = fake_ddpm()
    a, b, c = batch(1, (2, 1, 8, 8)), batch(2, (2, 1, 8, 8)), batch(3, (2, 1, 8, 8))
    ab = interpolate_diffusion(ddpm, a, b, t=50, weights=[0.0, 0.5, 1.0], seed=0)
    ac = interpolate_diffusion(ddpm, a, c, t=50, weights=[0.0, 0.5, 1.0], seed=0)
    assert ab.shape == (3, 2, 1, 8, 8)
    torch.testing.assert_close(ab[0], ac[0])  # w = 0 is image a alone
    assert not torch.allclose(ab[1], ac[1])
    cb = interpolate_diffusion(ddpm, c, b, t=50, weights=[0.0, 0.5, 1.0], seed=0)
    torch.testing.assert_close(ab[2], cb[2])  # w = 1 is image b alone


def test_bad_arguments_fail_clearly():
    s, xt, eps = schedule(), batch(1), batch(2)
    with pytest.raises(ValueError, match="t_prev"):
        ddim_step(s, eps, 10, 10, xt)
    with pytest.raises(ValueError, match="t must lie"):
        ddim_step(s, eps, T, 10, xt)
    with pytest.raises(ValueError, match="variance"):
        ddpm_step(s, eps, 5, xt, variance="learned")
    with pytest.raises(ValueError, match="an int"):
        ddpm_step(s, eps, torch.tensor([5, 5, 5, 5]), xt)
    with pytest.raises(ValueError, match="shape"):
        ddpm_step(s, eps[:2], 5, xt)
    with pytest.raises(ValueError, match="steps"):
        ddim_timesteps(T, 0)
    with pytest.raises(ValueError, match="steps"):
        ddim_timesteps(T, T + 1)
    with pytest.raises(ValueError, match="spacing"):
        ddim_timesteps(T, 10, "uniform")
