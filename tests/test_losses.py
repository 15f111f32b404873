"""Tests for ddpm_course.losses against torch.distributions, scipy and Monte Carlo."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import norm
from torch.distributions import Normal, kl_divergence

from ddpm_course.forward import q_sample
from ddpm_course.losses import discretized_gaussian_log_likelihood, eps_loss_weight, loss_simple, normal_kl
from ddpm_course.posterior import mean_from_eps, posterior_mean, posterior_mean_coefs, posterior_variance

T = 1000
BETAS = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
AC = torch.cumprod(1 - BETAS, 0)


def test_normal_kl_matches_torch_distributions():
    torch.manual_seed(0)
    m1, lv1, m2, lv2 = torch.randn(4, 50, dtype=torch.float64)
    want = kl_divergence(Normal(m1, (lv1 / 2).exp()), Normal(m2, (lv2 / 2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), want, rtol=1e-10, atol=1e-12)


def test_normal_kl_by_monte_carlo():
    torch.manual_seed(0)
    p, q = Normal(0.4, 0.6), Normal(-0.3, 1.3)
    x = p.sample((400_000,)).double()
    log_ratio = p.log_prob(x) - q.log_prob(x)
    exact = normal_kl(torch.tensor(0.4), 2 * math.log(0.6), -0.3, 2 * math.log(1.3))
    assert abs(exact - log_ratio.mean()) < 5 * log_ratio.std() / math.sqrt(len(x))


def test_normal_kl_broadcasts_numbers_and_is_zero_on_equal():
    m = torch.randn(3, 1)
    out = normal_kl(m, 0.0, torch.randn(1, 4), 0.5)
    assert out.shape == (3, 4) and (out >= 0).all()
    assert normal_kl(m, torch.zeros(3, 1), m, 0.0).abs().max() == 0
    with pytest.raises(ValueError, match="broadcast"):
        normal_kl(torch.zeros(3), 0.0, torch.zeros(4), 0.0)
    with pytest.raises(ValueError, match="at least one tensor"):
        normal_kl(0.0, 0.0, 1.0, 0.0)


LEVELS = torch.linspace(-1, 1, 256, dtype=torch.float64)
EDGES = np.concatenate([[-np.inf], ((LEVELS[:-1] + LEVELS[1:]) / 2).numpy(), [np.inf]])


@pytest.mark.parametrize("mean, scale", [(0.0, 0.5), (0.9, 0.01), (-0.999, 0.003), (0.3, 2.0), (1.7, 0.2), (-0.2, 1e-3)])
def test_discretized_log_likelihood_against_scipy(mean, scale):
    logp = discretized_gaussian_log_likelihood(LEVELS, torch.tensor(mean, dtype=torch.float64),
                                               torch.tensor(math.log(scale), dtype=torch.float64))
    assert abs(logp.exp().sum().item() - 1) < 1e-9
    # bin masses from scipy, each taken in the tail where it is accurate
    lo, hi = (EDGES[:-1] - mean) / scale, (EDGES[1:] - mean) / scale
    brute = np.where(lo > 0, norm.sf(lo) - norm.sf(hi), norm.cdf(hi) - norm.cdf(lo))
    ok = brute > 1e-300                                         # far tails underflow even in scipy
    np.testing.assert_allclose(logp.numpy()[ok], np.log(brute[ok]), rtol=1e-7, atol=1e-9)
    assert torch.isfinite(logp).all() and (logp.numpy()[~ok] < np.log(1e-300)).all()


def test_discretized_log_likelihood_far_tail_is_exact_and_has_gradient():
    """A level 40 standard deviations from the mean: log-mass ~ log(width * pdf), with a nonzero gradient."""
    means = torch.tensor([0.4], dtype=torch.float64, requires_grad=True)
    scale = 0.01
    logp = discretized_gaussian_log_likelihood(torch.tensor([0.0], dtype=torch.float64), means,
                                               torch.tensor([math.log(scale)], dtype=torch.float64))
    z_lo, z_hi = (0.4 - 1 / 255) / scale, (0.4 + 1 / 255) / scale
    want = norm.logsf(z_lo) + np.log(-np.expm1(norm.logsf(z_hi) - norm.logsf(z_lo)))
    np.testing.assert_allclose(logp.item(), want, rtol=1e-10)
    logp.sum().backward()
    assert means.grad.item() < -1000                            # pulls the mean towards the data


def test_discretized_log_likelihood_edges_and_shapes():
    x = torch.tensor([[-1.0, 1.0, 0.0]])
    means = torch.tensor([[5.0], [-5.0]])                        # broadcasts to [2, 3]
    logp = discretized_gaussian_log_likelihood(x, means, torch.zeros(()))
    assert logp.shape == (2, 3) and torch.isfinite(logp).all()
    torch.testing.assert_close(logp[0, 0], torch.tensor(norm.logcdf(-6 + 1 / 255), dtype=torch.float32))
    torch.testing.assert_close(logp[0, 1], torch.tensor(norm.logsf(-4 - 1 / 255), dtype=torch.float32))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        discretized_gaussian_log_likelihood(torch.tensor([1.5]), torch.zeros(1), torch.zeros(1))
    with pytest.raises(ValueError, match="broadcast"):
        discretized_gaussian_log_likelihood(torch.zeros(3), torch.zeros(4), torch.zeros(1))


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_eps_weight_turns_eps_error_into_the_kl_term(variance):
    torch.manual_seed(0)
    var = posterior_variance(BETAS) if variance == "fixed_small" else BETAS
    t = torch.arange(1, T, 7)
    x0 = torch.rand(len(t), 2, 3, 3, dtype=torch.float64) * 2 - 1
    eps = torch.randn_like(x0)
    eps_theta = eps + 0.5 * torch.randn_like(x0)
    xt = q_sample(x0, t, AC.sqrt(), (1 - AC).sqrt(), noise=eps)
    c1, c2 = posterior_mean_coefs(BETAS)
    logvar = var[t].log()[:, None, None, None]
    kl = normal_kl(posterior_mean(x0, xt, t, c1, c2), logvar, mean_from_eps(xt, t, eps_theta, BETAS), logvar)
    w = eps_loss_weight(BETAS, var)[t]
    torch.testing.assert_close(kl.sum((1, 2, 3)), w * ((eps - eps_theta) ** 2).sum((1, 2, 3)), rtol=1e-9, atol=1e-12)


def test_eps_weight_values_and_validation():
    w = eps_loss_weight(BETAS, BETAS)
    torch.testing.assert_close(w, BETAS / (2 * (1 - BETAS) * (1 - AC)))
    assert torch.isinf(eps_loss_weight(BETAS, posterior_variance(BETAS))[0])
    with pytest.raises(ValueError, match="one per timestep"):
        eps_loss_weight(BETAS, BETAS[:-1])
    with pytest.raises(ValueError, match=">= 0"):
        eps_loss_weight(BETAS, -BETAS)


def test_loss_simple_kinds_and_reductions():
    torch.manual_seed(0)
    pred, target = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    r = pred - target
    huber = torch.where(r.abs() <= 1, 0.5 * r ** 2, r.abs() - 0.5)
    huber2 = torch.where(r.abs() <= 0.3, 0.5 * r ** 2, 0.3 * (r.abs() - 0.15))
    torch.testing.assert_close(loss_simple(pred, target), (r ** 2).mean())
    torch.testing.assert_close(loss_simple(pred, target, "l1", "sum"), r.abs().sum())
    torch.testing.assert_close(loss_simple(pred, target, "huber", "none"), huber)
    torch.testing.assert_close(loss_simple(pred, target, "huber", "none", delta=0.3), huber2)
    assert loss_simple(pred, target, "mse", "none").shape == pred.shape


def test_loss_simple_gradient_flows():
    pred = torch.randn(2, 3, requires_grad=True)
    loss_simple(pred, torch.zeros(2, 3)).backward()
    torch.testing.assert_close(pred.grad, 2 * pred.detach() / 6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="mae"), "unknown loss kind 'mae'; choose one of 'mse', 'l1', 'huber'"),
    (dict(reduction="avg"), "unknown reduction 'avg'"),
    (dict(kind="huber", delta=0.0), "delta must be > 0"),
])
def test_loss_simple_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        loss_simple(torch.zeros(2), torch.zeros(2), **kwargs)


def test_loss_simple_rejects_shape_mismatch():
    with pytest.raises(ValueError, match=r"same shape, got \[2, 3\] and \[2, 1\]"):
        loss_simple(torch.zeros(2, 3), torch.zeros(2, 1))
