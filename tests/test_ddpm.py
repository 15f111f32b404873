"""Tests of ddpm_course.ddpm: the loss, the reverse step and the sampling loop of the DDPM model."""

import math

import pytest
import torch
from torch import nn

from ddpm_course.ddpm import (DDPM, GaussianEps, ddpm_step, gaussian_reverse_moments, p_mean_variance_from_eps,
                              sliced_wasserstein, train_toy)
from ddpm_course.schedules import NoiseSchedule, cosine_beta_schedule, linear_beta_schedule
from ddpm_course.unet import ToyMLP


class Recorder(nn.Module):
    "Returns zeros and remembers what it was called with."

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.calls = []

    def forward(self, x, t):
        self.calls.append((x.detach().clone(), t.detach().clone()))
        return torch.zeros_like(x) + self.w


class OracleEps(nn.Module):
    "The exact E[eps | x_t] when the data is one known point x*: eps = (x_t - sqrt(ab) x*) / sqrt(1 - ab)."

    def __init__(self, schedule, x_star):
        super().__init__()
        self.s, self.x_star = schedule, x_star

    def forward(self, x, t):
        return self.s.predict_eps(x, t, self.x_star.expand_as(x))


def schedule(T=1000, kind="linear"):
    return NoiseSchedule(linear_beta_schedule(T) if kind == "linear" else cosine_beta_schedule(T))


def test_loss_is_zero_for_the_exact_denoiser_of_one_point():
    "If x_t were formed wrongly (other coefficients, or x_0 fed to the network) the oracle would miss."
    s = schedule()
    x_star = torch.tensor([[0.3, -0.7]])
    ddpm = DDPM(OracleEps(s, x_star), s)
    torch.manual_seed(0)
    assert ddpm.loss(x_star.expand(512, 2)).item() < 1e-6


def test_loss_feeds_x_t_at_the_sampled_t_and_targets_the_noise():
    s, rec = schedule(), Recorder()
    ddpm = DDPM(rec, s)
    x0, t, noise = torch.randn(8, 1, 4, 4), torch.randint(0, 1000, (8,)), torch.randn(8, 1, 4, 4)
    loss = ddpm.loss(x0, t, noise)
    xt, tt = rec.calls[-1]
    assert torch.equal(tt, t)
    ab = s.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(xt, ab.sqrt() * x0 + (1 - ab).sqrt() * noise)
    torch.testing.assert_close(loss, noise.pow(2).mean())  # the network said 0: the loss is |eps|^2


def test_loss_draws_t_uniformly_over_all_timesteps():
    s, rec = schedule(T=10), Recorder()
    ddpm = DDPM(rec, s)
    torch.manual_seed(0)
    for _ in range(100):
        ddpm.loss(torch.zeros(100, 2))
    counts = torch.bincount(torch.cat([t for _, t in rec.calls]), minlength=10).float()
    assert counts.shape == (10,)
    chi2 = ((counts - 1000) ** 2 / 1000).sum().item()  # 9 degrees of freedom: P(chi2 > 27.9) = 0.001
    assert chi2 < 27.9


@pytest.mark.parametrize("kind,fn", [("mse", lambda e: e.pow(2).mean()), ("l1", lambda e: e.abs().mean()),
                                     ("huber", lambda e: torch.where(e.abs() < 1, 0.5 * e**2, e.abs() - 0.5).mean())])
def test_loss_kinds(kind, fn):
    ddpm = DDPM(Recorder(), schedule(), loss_kind=kind)
    noise = 2 * torch.randn(64, 3)
    torch.testing.assert_close(ddpm.loss(torch.zeros(64, 3), torch.zeros(64, dtype=torch.long), noise), fn(noise))


def test_p_mean_variance_is_the_posterior_at_the_predicted_x0():
    s = schedule()
    xt, eps, t = torch.randn(5, 3), torch.randn(5, 3), torch.tensor([999, 500, 20, 1, 0])
    mean, var, x0 = p_mean_variance_from_eps(s, eps, t, xt, clip_x0=False)
    ab, b = s.alphas_cumprod[t][:, None], s.betas[t][:, None]
    ab_prev = torch.where(t[:, None] > 0, s.alphas_cumprod[(t - 1).clamp(min=0)][:, None], torch.ones(5, 1))
    torch.testing.assert_close(x0, (xt - (1 - ab).sqrt() * eps) / ab.sqrt())
    # Ho et al. eq. 11: mu = (x_t - beta_t / sqrt(1 - ab_t) eps) / sqrt(alpha_t)
    torch.testing.assert_close(mean, (xt - b / (1 - ab).sqrt() * eps) / (1 - b).sqrt(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(var, (1 - ab_prev) / (1 - ab) * b)
    _, var_large, _ = p_mean_variance_from_eps(s, eps, t, xt, variance="fixed_large")
    torch.testing.assert_close(var_large, b)


def test_p_sample_matches_ddpm_step_element_by_element():
    s = schedule()
    ddpm = DDPM(OracleEps(s, torch.tensor([[0.5, -0.5]])), s)
    xt, t = torch.randn(4, 2), torch.tensor([700, 30, 1, 0])
    got = ddpm.p_sample(xt, t, clip_x0=False, generator=torch.Generator().manual_seed(3))
    z = torch.randn(4, 2, generator=torch.Generator().manual_seed(3))
    for i in range(4):
        eps = ddpm.predict_noise(xt[i:i + 1], int(t[i]))
        want = ddpm_step(s, eps, int(t[i]), xt[i:i + 1], noise=z[i:i + 1], clip_x0=False)
        torch.testing.assert_close(got[i:i + 1], want)


def test_gaussian_eps_is_the_regression_of_the_noise_on_x_t():
    "Monte Carlo: the least-squares line of eps on x_t at one t is E[eps | x_t] (a Gaussian's is linear)."
    s, mu, sd = schedule(), torch.tensor([0.5, -1.0]), 0.3
    g = torch.Generator().manual_seed(0)
    x0, eps = mu + sd * torch.randn(400_000, 2, generator=g), torch.randn(400_000, 2, generator=g)
    t = torch.full((400_000,), 250)
    xt = s.q_sample(x0, t, eps)
    A = torch.stack([xt, torch.ones_like(xt)], -1)  # per coordinate: eps ~ slope * x_t + intercept
    fit = torch.linalg.lstsq(A.transpose(0, 1).double(), eps.T.double()[..., None]).solution[..., 0]
    oracle = GaussianEps(s, mu, sd)
    at0, at1 = oracle(torch.zeros(1, 2), t[:1])[0], oracle(torch.ones(1, 2), t[:1])[0]
    torch.testing.assert_close(fit[:, 0].float(), at1 - at0, rtol=0.01, atol=0)
    torch.testing.assert_close(fit[:, 1].float(), at0, rtol=0, atol=0.01)


def test_gaussian_reverse_moments_at_the_two_extremes_of_ho_et_al():
    "beta-tilde is exact for one data point, beta for unit-variance data: then every state has q's marginal."
    s, mu = schedule(), torch.tensor([0.5, -1.0])
    ab = s.alphas_cumprod.double().flip(0)  # alpha-bar at the input of reverse step k = 0..T-1
    start = (ab[0].sqrt() * mu.abs().max()).item()  # x_T ~ N(0, I) misses q(x_{T-1})'s mean by this much, no more
    m, v = gaussian_reverse_moments(s, mu, 0.0, "fixed_small")
    torch.testing.assert_close(m[:-1], ab.sqrt()[:, None] * mu.double(), rtol=0, atol=start)
    torch.testing.assert_close(v[:-1], 1 - ab, rtol=0, atol=1e-4)
    assert v[-1] < 1e-8 and (m[-1] - mu).abs().max() < 1e-4
    m, v = gaussian_reverse_moments(s, mu, 1.0, "fixed_large")
    torch.testing.assert_close(m[:-1], ab.sqrt()[:, None] * mu.double(), rtol=0, atol=start)
    torch.testing.assert_close(v[:-1], torch.ones_like(v[:-1]), rtol=0, atol=1e-8)
    # in between, fixed small undershoots and fixed large overshoots
    small, large = (gaussian_reverse_moments(s, mu, 0.3, k)[1][-1].sqrt() / 0.3 for k in ("fixed_small", "fixed_large"))
    assert 0.98 < small < 0.995 and 1.0 < large < 1.01


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_sampled_chain_matches_the_exact_moments_at_every_step(variance):
    "Ancestral sampling with the perfect denoiser of N(mu, sd^2): mean and variance of every state within 5 standard errors."
    s, mu, sd, n = schedule(), torch.tensor([0.5, -1.0]), 0.1, 10_000
    ddpm = DDPM(GaussianEps(s, mu, sd), s, sample_shape=(2,))
    _, states = ddpm.sample(n, seed=0, clip_x0=False, variance=variance, return_intermediates=True)
    m, v = gaussian_reverse_moments(s, mu, sd, variance)
    z_mean = (states.double().mean(1) - m) / (v[:, None] / n).sqrt()
    z_var = (states.double().var(1) - v[:, None]) / (v[:, None] * (2 / (n - 1)) ** 0.5)
    assert z_mean.abs().max() < 5 and z_var.abs().max() < 5
    other = gaussian_reverse_moments(s, mu, sd, "fixed_large" if variance == "fixed_small" else "fixed_small")[1]
    assert ((states.double().var(1) - other[:, None]) / (other[:, None] * (2 / (n - 1)) ** 0.5)).abs().max() > 5


def test_sample_is_seeded_batched_and_can_return_the_trajectory():
    s = schedule(T=50)
    ddpm = DDPM(ToyMLP(hidden=16, depth=1), s, sample_shape=(2,))
    a, states = ddpm.sample(7, seed=1, return_intermediates=True)
    assert a.shape == (7, 2) and states.shape == (51, 7, 2) and torch.equal(states[-1], a)
    assert torch.equal(a, ddpm.sample(7, seed=1))
    assert not torch.equal(a, ddpm.sample(7, seed=2))
    assert ddpm.sample((3, 2), seed=0).shape == (3, 2)
    assert not a.requires_grad


def test_sample_restores_training_mode_and_can_start_midway():
    s = schedule(T=50)
    ddpm = DDPM(nn.Sequential(), s)
    ddpm.model = ToyMLP(hidden=16, depth=1)
    ddpm.train()
    x = torch.randn(3, 2)
    out, states = ddpm.sample(xt=x, t_start=9, seed=0, return_intermediates=True)
    assert ddpm.training and ddpm.model.training
    assert states.shape == (11, 3, 2) and torch.equal(states[0], x)


def test_toy_mlp_learns_a_point_mass_quickly():
    torch.manual_seed(0)
    s = schedule(T=100)
    ddpm = DDPM(ToyMLP(hidden=64, depth=2), s, sample_shape=(2,))
    opt = torch.optim.Adam(ddpm.parameters(), lr=3e-3)
    data = torch.tensor([[0.5, -0.5]]).expand(256, 2)
    first = None
    for _ in range(300):
        loss = ddpm.loss(data)
        first = first or loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first
    x = ddpm.sample(500, seed=0, clip_x0=False)
    assert (x.mean(0) - data[0]).abs().max() < 0.1


def test_sliced_wasserstein_of_a_shift_and_a_permutation():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2000, 2, generator=g)
    c = torch.tensor([0.3, -0.4])
    assert abs(sliced_wasserstein(a, a + c) - c.norm().item() / math.sqrt(2)) < 0.02 * c.norm().item()
    assert sliced_wasserstein(a, a[torch.randperm(2000, generator=g)]) < 1e-6
    b = torch.randn(2000, 3, generator=g)
    assert abs(sliced_wasserstein(b, 2 * b, n_proj=2000) - b.pow(2).sum(1).mean().sqrt().item() / math.sqrt(3)) < 0.05
    with pytest.raises(ValueError, match="same shape"):
        sliced_wasserstein(a, a[:10])


def test_train_toy_learns_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    data = torch.tensor([0.5, -0.5]) + 0.1 * torch.randn(2000, 2, generator=g)
    s = schedule(T=100)
    ddpm, losses = train_toy(data, 150, s, batch_size=128)
    assert len(losses) == 150 and sum(losses[-20:]) < 0.5 * sum(losses[:20])
    _, again = train_toy(data, 150, s, batch_size=128)
    assert again == losses
    calls = []
    train_toy(data, 3, s, loss_fn=lambda d, x0: calls.append(x0.shape) or d.loss(x0))
    assert calls == [(256, 2)] * 3
    with pytest.raises(ValueError, match="points"):
        train_toy(data[None], 3, s)


def test_bad_arguments_fail_clearly():
    s = schedule(T=10)
    with pytest.raises(ValueError, match="loss_kind"):
        DDPM(Recorder(), s, loss_kind="l2")
    ddpm = DDPM(Recorder(), s)
    with pytest.raises(ValueError, match="sample_shape"):
        ddpm.sample(4)
    with pytest.raises(ValueError, match="0..9"):
        ddpm.p_sample(torch.zeros(2, 3), 10)
    with pytest.raises(ValueError, match="t_start"):
        ddpm.sample((2, 3), t_start=10)
    with pytest.raises(ValueError, match="variance"):
        ddpm.p_mean_variance(torch.zeros(2, 3), 3, variance="learned")
    with pytest.raises(ValueError, match="not both"):
        ddpm.sample((2, 3), xt=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="sd"):
        GaussianEps(s, torch.zeros(2), -1.0)
    with pytest.raises(ValueError, match="variance"):
        gaussian_reverse_moments(s, torch.zeros(2), 0.3, "learned")
