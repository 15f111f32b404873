"""Tests of ddpm_course.score: closed-form scores against autograd and chapter 09's exact noise predictor, Langevin, sigmas."""

import pytest
import torch

from ddpm_course.ddpm import GaussianEps
from ddpm_course.schedules import NoiseSchedule, cosine_beta_schedule, linear_beta_schedule
from ddpm_course.score import GaussianMixture, langevin, schedule_sigmas

MIX = GaussianMixture(torch.tensor([[-1.0, 0.0], [1.0, 0.5], [0.0, -1.0]]), torch.tensor([0.15, 0.25, 0.1]),
                      torch.tensor([0.2, 0.5, 0.3]))


@pytest.mark.parametrize("a,b", [(1.0, 0.0), (0.9, 0.43589), (0.1, 0.99499)])
def test_score_is_the_gradient_of_the_log_density(a, b):
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64).requires_grad_(True)
    MIX.log_prob(x, a, b).sum().backward()
    torch.testing.assert_close(MIX.score(x.detach(), a, b), x.grad)


def test_log_density_integrates_to_one():
    g = torch.linspace(-4, 4, 801, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    for a, b in [(1.0, 0.0), (0.6, 0.8)]:
        total = MIX.log_prob(grid, a, b).exp().sum() * (g[1] - g[0]) ** 2
        assert abs(float(total) - 1) < 1e-3


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_scaled_score_is_the_exact_noise_predictor(name):
    s = NoiseSchedule(linear_beta_schedule(1000) if name == "linear" else cosine_beta_schedule(1000))
    mu, sd = torch.tensor([0.5, -0.25]), 0.3
    t = torch.tensor([999, 700, 300, 20, 1, 0])
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a, b = s.sqrt_alphas_cumprod[t].double(), s.sqrt_one_minus_alphas_cumprod[t].double()
    eps = -b[:, None] * GaussianMixture(mu[None], torch.tensor([sd])).score(x, a, b)
    torch.testing.assert_close(eps.float(), GaussianEps(s, mu, sd)(x.float(), t), rtol=1e-4, atol=1e-4)


def test_langevin_samples_a_gaussian():
    "Langevin with the score of N(1, 0.5^2) from N(0, 1): the mean and spread of the result match (Monte Carlo)."
    target = GaussianMixture(torch.tensor([[1.0]]), torch.tensor([0.5]))
    x = langevin(target.score, torch.randn(20_000, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64),
                 step_size=0.01, n_steps=500, generator=torch.Generator().manual_seed(3))
    assert abs(float(x.mean()) - 1) < 0.02
    assert abs(float(x.std()) - 0.5 / (1 - 0.01 / (4 * 0.25)) ** 0.5) < 0.008  # the step's own bias: var sd^2 / (1 - delta / (4 sd^2))


def test_schedule_sigmas_are_sqrt_of_noise_over_signal():
    s = NoiseSchedule(linear_beta_schedule(1000))
    ab = torch.cumprod(1 - linear_beta_schedule(1000), 0)
    torch.testing.assert_close(schedule_sigmas(s), ((1 - ab) / ab).sqrt(), rtol=1e-6, atol=0)


def test_bad_input():
    with pytest.raises(ValueError, match="weights >= 0 summing to 1"):
        GaussianMixture(torch.zeros(2, 2), torch.ones(2), torch.tensor([0.5, 0.6]))
    with pytest.raises(ValueError, match="sds > 0"):
        GaussianMixture(torch.zeros(2, 2), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="need step_size > 0"):
        langevin(MIX.score, torch.zeros(3, 2, dtype=torch.float64), 0.0, 10)
