"""Tests for ddpm_course.schedules, with diffusers' DDPMScheduler as the independent reference."""
import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from ddpm_course.schedules import (BETA_SCHEDULES, NoiseSchedule, cosine_beta_schedule, linear_beta_schedule,
                                   make_beta_schedule, quadratic_beta_schedule, sigmoid_beta_schedule)

T = 1000
DIFFUSERS_NAME = {"linear": "linear", "cosine": "squaredcos_cap_v2", "quadratic": "scaled_linear", "sigmoid": "sigmoid"}
BUFFERS = ["betas", "alphas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
           "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
           "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
           "log_snr"]


@pytest.fixture(scope="module", params=list(DIFFUSERS_NAME))
def pair(request):
    """(our NoiseSchedule, diffusers' DDPMScheduler) for one schedule name."""
    name = request.param
    return NoiseSchedule(make_beta_schedule(name, T)), DDPMScheduler(T, beta_schedule=DIFFUSERS_NAME[name], clip_sample=False)


def test_betas_and_alphas_cumprod_match_diffusers(pair):
    ours, ref = pair
    torch.testing.assert_close(ours.betas, ref.betas, rtol=1e-6, atol=1e-9)
    # diffusers accumulates the product in float32, so allow its rounding drift over 1000 steps
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod, rtol=5e-5, atol=1e-9)


def test_q_sample_matches_add_noise(pair):
    ours, ref = pair
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(8, 3, 8, 8, generator=g) * 2 - 1, torch.randn(8, 3, 8, 8, generator=g)
    t = torch.tensor([0, 1, 10, 100, 400, 700, 998, 999])
    torch.testing.assert_close(ours.q_sample(x0, t, eps), ref.add_noise(x0, eps, t), rtol=1e-4, atol=1e-5)


def test_posterior_variance_matches_diffusers(pair):
    ours, ref = pair
    ref_var = torch.stack([ref._get_variance(t) for t in range(T)])      # "fixed_small", clamped at 1e-20
    # diffusers recovers beta_t as 1 - abar_t / abar_{t-1} in float32, which cancels to ~5e-4 relative error
    torch.testing.assert_close(ours.posterior_variance[1:], ref_var[1:], rtol=2e-3, atol=1e-10)
    assert ours.posterior_variance[0] == 0 and ref_var[0] <= 1e-20
    b = ref.betas.double()                                                # the same formula, in float64
    ac = torch.cumprod(1 - b, 0)
    exact = (1 - ac[:-1]) / (1 - ac[1:]) * b[1:]
    torch.testing.assert_close(ours.posterior_variance[1:].double(), exact, rtol=1e-5, atol=0)


def test_one_reverse_step_matches_diffusers_step(pair):
    """predict_x0 + q_posterior + the posterior's standard deviation reproduce DDPMScheduler.step."""
    ours, ref = pair
    ref.set_timesteps(T)
    g = torch.Generator().manual_seed(1)
    xt, eps = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    for t in (0, 1, 500, 999):
        tt = torch.full((2,), t)
        mean, var = ours.q_posterior(ours.predict_x0(xt, tt, eps), xt, tt)
        got = ref.step(eps, t, xt, generator=torch.Generator().manual_seed(7)).prev_sample
        z = torch.randn(xt.shape, generator=torch.Generator().manual_seed(7))
        want = mean + (var.sqrt() * z if t > 0 else 0)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_buffers_are_float32_and_consistent_in_float64():
    betas = linear_beta_schedule(T)
    s = NoiseSchedule(betas)
    assert len(s) == s.num_timesteps == T and "num_timesteps=1000" in repr(s)
    assert sorted(name for name, _ in s.named_buffers()) == sorted(BUFFERS)
    for name in BUFFERS:
        v = getattr(s, name)
        assert v.dtype == torch.float32 and v.shape == (T,), name
    b = betas.numpy()
    ac = np.cumprod(1 - b)
    acp = np.append(1.0, ac[:-1])
    post = b * (1 - acp) / (1 - ac)
    want = dict(betas=b, alphas=1 - b, alphas_cumprod=ac, alphas_cumprod_prev=acp, sqrt_alphas_cumprod=np.sqrt(ac),
                sqrt_one_minus_alphas_cumprod=np.sqrt(1 - ac), sqrt_recip_alphas_cumprod=np.sqrt(1 / ac),
                sqrt_recipm1_alphas_cumprod=np.sqrt(1 / ac - 1), posterior_variance=post,
                posterior_log_variance_clipped=np.log(np.append(post[1], post[1:])),    # Ho et al.'s formula
                posterior_mean_coef1=b * np.sqrt(acp) / (1 - ac),
                posterior_mean_coef2=(1 - acp) * np.sqrt(1 - b) / (1 - ac), log_snr=np.log(ac / (1 - ac)))
    for name, value in want.items():
        np.testing.assert_allclose(getattr(s, name).numpy(), value.astype(np.float32), rtol=2e-6, atol=1e-12, err_msg=name)


def test_to_moves_every_buffer():
    s = NoiseSchedule(linear_beta_schedule(10)).to("meta")
    assert all(v.device.type == "meta" for v in s.buffers())
    assert NoiseSchedule(linear_beta_schedule(10)).to(torch.float64).betas.dtype == torch.float64


def test_methods_invert_each_other_and_posterior_at_t0():
    s = NoiseSchedule(cosine_beta_schedule(T))
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(5, 2, 4, 4, generator=g) * 2 - 1, torch.randn(5, 2, 4, 4, generator=g)
    t = torch.tensor([0, 3, 300, 900, 998])                   # t = 999 has alpha-bar ~ 2e-9: x0 unrecoverable in float32
    xt = s.q_sample(x0, t, eps)
    torch.testing.assert_close(s.predict_x0(xt, t, eps), x0, atol=5e-3, rtol=0)
    torch.testing.assert_close(s.predict_eps(xt, t, x0), eps, atol=5e-3, rtol=0)
    mean, var = s.q_posterior(x0, xt, t)
    assert mean.shape == x0.shape and var.shape == (5, 1, 1, 1)
    torch.testing.assert_close(mean[0], x0[0], atol=1e-6, rtol=0)
    assert s.q_sample(x0, t).shape == x0.shape                 # fresh noise when none is given


def test_single_timestep_schedule():
    s = NoiseSchedule(torch.tensor([0.5], dtype=torch.float64))
    assert len(s) == 1 and s.posterior_variance.item() == 0
    assert s.posterior_log_variance_clipped.item() == pytest.approx(math.log(0.5))
    assert linear_beta_schedule(1).tolist() == [1e-4]


def test_schedule_shapes_and_defaults():
    for name, fn in BETA_SCHEDULES.items():
        b = fn(T)
        assert b.dtype == torch.float64 and b.shape == (T,) and ((b > 0) & (b < 1)).all(), name
        assert torch.equal(make_beta_schedule(name, T), b)
        assert (b.diff() >= 0).all(), name                      # all four schedules increase
    assert linear_beta_schedule(T)[0] == 1e-4 and abs(linear_beta_schedule(T)[-1] - 0.02) < 1e-15
    q = quadratic_beta_schedule(T)
    torch.testing.assert_close(q.sqrt().diff(), torch.full((T - 1,), (0.02 ** 0.5 - 1e-2) / (T - 1), dtype=torch.float64))
    assert sigmoid_beta_schedule(T, 0.001, 0.1).max() < 0.1


def test_cosine_alpha_bar_follows_the_formula():
    b = cosine_beta_schedule(T)
    f = np.cos((np.arange(T + 1) / T + 0.008) / 1.008 * np.pi / 2) ** 2
    np.testing.assert_allclose(np.cumprod(1 - b.numpy())[:-1], (f[1:] / f[0])[:-1], rtol=1e-9)
    assert b[-1] == 0.999 and (b[:-1] < 0.999).all()
    assert cosine_beta_schedule(10, max_beta=0.5).max() == 0.5


@pytest.mark.parametrize("call, match", [
    (lambda: make_beta_schedule("cosin", 10), "unknown beta schedule 'cosin'; choose one of 'linear', 'cosine', 'quadratic', 'sigmoid'"),
    (lambda: linear_beta_schedule(0), "T must be an int >= 1, got 0"),
    (lambda: cosine_beta_schedule(2.0), "T must be an int >= 1, got 2.0"),
    (lambda: quadratic_beta_schedule(True), "T must be an int >= 1, got True"),
    (lambda: sigmoid_beta_schedule(-5), "T must be an int >= 1"),
    (lambda: linear_beta_schedule(10, 0.0, 0.02), "0 < beta_start <= beta_end < 1"),
    (lambda: linear_beta_schedule(10, 0.1, 0.01), "beta_start=0.1, beta_end=0.01"),
    (lambda: quadratic_beta_schedule(10, 1e-4, 1.0), "beta_end < 1"),
    (lambda: cosine_beta_schedule(10, s=-0.1), "s must be >= 0"),
    (lambda: cosine_beta_schedule(10, max_beta=1.0), r"max_beta must lie in \(0, 1\)"),
    (lambda: NoiseSchedule(torch.tensor([0.1, 1.0])), r"open interval \(0, 1\)"),
    (lambda: NoiseSchedule(torch.tensor([0.1, float("nan")])), "finite"),
    (lambda: NoiseSchedule(torch.full((2, 2), 0.1)), "1-D"),
    (lambda: NoiseSchedule(torch.zeros(0)), "T >= 1"),
])
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_bad_timesteps_and_shapes():
    s = NoiseSchedule(linear_beta_schedule(100))
    x = torch.zeros(3, 2, 4, 4)
    with pytest.raises(ValueError, match=r"0\.\.99 .*got values from 0 to 100"):
        s.q_sample(x, torch.tensor([0, 1, 100]))
    with pytest.raises(ValueError, match=r"from -1"):
        s.predict_x0(x, torch.tensor([-1, 0, 1]), x)
    with pytest.raises(ValueError, match=r"shape \[3\]"):
        s.q_posterior(x, x, torch.tensor([[0, 1, 2]]))
    with pytest.raises(ValueError, match="integer tensor"):
        s.predict_eps(x, torch.tensor([0.0, 1.0, 2.0]), x)
    with pytest.raises(ValueError, match="broadcast"):
        s.q_posterior(x, torch.zeros(3, 3, 4, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="noise must have the shape"):
        s.q_sample(x, torch.tensor([0, 1, 2]), torch.zeros(3, 2, 4))
