"""Tests of ddpm_course.sampling: DDPM and DDIM steps and loops against diffusers' schedulers, interpolation, memory."""

import gc
import weakref

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn

import ddpm_course.ddpm
from ddpm_course.ddpm import DDPM, GaussianEps, gaussian_reverse_moments
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


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("steps,t", [(10, 0), (50, 0), (10, 99), (1000, 0)])
def test_ddim_final_step_to_alpha_bar_0_matches_diffusers(name, eta, clip, steps, t):
    "diffusers' set_alpha_to_one=False: the step below the last timestep goes to alpha-bar_0, also from t = 0."
    ref = float64_reference(DDIMScheduler(num_train_timesteps=T, trained_betas=SCHEDULES[name].numpy(),
                                          clip_sample=clip, set_alpha_to_one=False, prediction_type="epsilon"), name)
    ref.final_alpha_cumprod = ref.alphas_cumprod[0]  # in float64 too (in float32, 1 - ab_t / ab_prev < 0 gives NaN)
    ref.set_timesteps(steps)
    assert t - T // steps < 0  # diffusers takes its final alpha-bar here
    xt, eps, noise = batch(1, scale=1.5), batch(2), batch(3)
    want = ref.step(eps.double(), t, xt.double(), eta=eta, use_clipped_model_output=True,
                    variance_noise=noise.double()).prev_sample
    got = ddim_step(schedule(name), eps, t, -1, xt, eta=eta, noise=noise, clip_x0=clip, set_alpha_to_one=False)
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-5)
    if t == 0:  # from the level alpha-bar_0 to the same level: x is returned as it came
        torch.testing.assert_close(got, xt, rtol=1e-4, atol=1e-5)


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


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_sample_ddim_ending_at_alpha_bar_0_matches_diffusers(spacing, eta):
    "The whole loop with set_alpha_to_one=False, step by step the same random draws as diffusers."
    ddpm = fake_ddpm()
    ref = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing, clip_sample=True, set_alpha_to_one=False)
    ref.set_timesteps(20)
    g = torch.Generator().manual_seed(4)
    xT = torch.randn((3, 1, 8, 8), generator=g)
    want = diffusers_loop(ddpm, ref, xT.clone(), dict(eta=eta, use_clipped_model_output=True, generator=g))
    got = sample_ddim(ddpm, 3, steps=20, eta=eta, spacing=spacing, seed=4, set_alpha_to_one=False)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, sample_ddim(ddpm, 3, steps=20, eta=eta, spacing=spacing, seed=4))


def diffusers_dummy_sample_deter():
    "diffusers' scheduler tests' deterministic sample: arange laid out [C, H, W, B], then permuted to [B, C, H, W]."
    b, c, h, w = 4, 3, 8, 8
    return (torch.arange(b * c * h * w).reshape(c, h, w, b) / (b * c * h * w)).permute(3, 0, 1, 2)


def test_ddpm_full_loop_of_diffusers_tests_replays_through_ddpm_step():
    "diffusers' test_full_loop_no_noise (DDPMScheduler): torch.manual_seed(0), model(x, t) = x t / (t + 1); sum 258.9606."
    s = schedule()
    ref = DDPMScheduler(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                        variance_type="fixed_small", clip_sample=True)
    want = diffusers_dummy_sample_deter()
    assert not want.is_contiguous()  # the case where randn_like would lay the random stream out in another order
    generator = torch.manual_seed(0)
    for t in reversed(range(T)):
        want = ref.step(want * t / (t + 1), t, want, generator=generator).prev_sample
    got = diffusers_dummy_sample_deter()
    torch.manual_seed(0)  # ddpm_step draws from torch's global generator, as the diffusers test does
    for t in reversed(range(T)):
        got = ddpm_step(s, got * t / (t + 1), t, got)
    assert abs(want.abs().sum().item() - 258.9606) < 1e-2  # the number diffusers' own test asserts
    assert abs(got.abs().sum().item() - 258.9606) < 1e-2 and abs(got.abs().mean().item() - 0.3372) < 1e-3
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_noise_does_not_depend_on_the_memory_layout_of_xt():
    s, eps = schedule(), batch(2, (2, 3, 4, 4))
    x = batch(1, (2, 3, 4, 4))
    x_perm = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # the same values, channels-last in memory
    for step in (lambda xt: ddpm_step(s, eps, 500, xt), lambda xt: ddim_step(s, eps, 500, 400, xt, eta=1.0)):
        torch.manual_seed(0)
        a = step(x)
        torch.manual_seed(0)
        assert torch.equal(a, step(x_perm))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    torch.testing.assert_close(ddpm_step(s, eps, 500, x, generator=g1), ddpm_step(s, eps, 500, x_perm, generator=g2))


def test_sample_ddpm_loop_matches_diffusers():
    ddpm = fake_ddpm()
    ref = DDPMScheduler(num_train_timesteps=T, clip_sample=True)
    ref.set_timesteps(T)
    g = torch.Generator().manual_seed(11)
    xT = torch.randn((3, 1, 8, 8), generator=g)
    want = diffusers_loop(ddpm, ref, xT, dict(generator=g))
    got = sample_ddpm(ddpm, 3, seed=11)  # the same generator draws x_T first, then one z per step
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_ddim_with_the_exact_denoiser_of_a_gaussian():
    "All T steps with the true E[eps | x_t] for N(mu, sd^2): eta 1 is the fixed-small chain, whose exact end is known."
    s, mu, sd, n = schedule(), torch.tensor([0.5, -1.0]), 0.3, 20000
    ddpm = DDPM(GaussianEps(s, mu, sd), s, sample_shape=(2,))
    m, v = gaussian_reverse_moments(s, mu, sd, "fixed_small")
    x = sample_ddim(ddpm, n, steps=T, eta=1.0, seed=0, clip_x0=False)
    assert ((x.double().mean(0) - m[-1]).abs() / (v[-1] / n).sqrt()).max() < 5
    assert ((x.double().var(0) - v[-1]).abs() / (v[-1] * (2 / n) ** 0.5)).max() < 5
    x = sample_ddim(ddpm, n, steps=T, eta=0.0, seed=0, clip_x0=False)  # deterministic: its own small discretisation error
    assert (x.mean(0) - mu).abs().max() < 5 * sd / n**0.5 and (x.std(0) / sd - 1).abs().max() < 0.01


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
    with pytest.raises(ValueError, match=r"t must be an int in 0\.\.999 \(0-based timesteps\), got 1000"):
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


def test_the_hot_paths_never_read_tensor_values():
    "A 'meta' tensor has a shape but no values, so reading one (what makes a GPU wait for the host) raises here."
    from ddpm_course.forward import extract

    with pytest.raises(Exception, match="meta"):
        torch.zeros(3, device="meta").max().item()  # the probe works: a value read fails
    s = NoiseSchedule(linear_beta_schedule(1000)).to("meta")
    x, t = torch.empty(2, 1, 4, 4, device="meta"), torch.zeros(2, dtype=torch.long, device="meta")
    assert extract(s.betas, t, x.shape).shape == (2, 1, 1, 1)
    assert s.q_sample(x, t, x).shape == x.shape
    assert ddim_step(s, x, 500, 400, x, eta=0.5, noise=x).shape == x.shape
    assert ddim_step(s, x, 500, -1, x).shape == x.shape
    assert ddpm_step(s, x, 500, x, noise=x).shape == x.shape
