"""Tests for ddpm_course.losses against torch.distributions, scipy and Monte Carlo."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch.distributions import Normal, kl_divergence

from ddpm_course.forward import q_sample
from ddpm_course.losses import (discretized_gaussian_log_likelihood, eps_loss_weight, loss_simple, normal_kl,
                                variational_bound)
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


@pytest.mark.parametrize("K", [256, 17, 2])
@pytest.mark.parametrize("mean, scale", [(0.0, 0.5), (0.9, 0.01), (-0.999, 0.003), (0.3, 2.0), (1.7, 0.2), (-0.2, 1e-3)])
def test_discretized_log_likelihood_against_scipy(mean, scale, K):
    levels = torch.linspace(-1, 1, K, dtype=torch.float64)
    edges = np.concatenate([[-np.inf], ((levels[:-1] + levels[1:]) / 2).numpy(), [np.inf]])
    logp = discretized_gaussian_log_likelihood(levels, torch.tensor(mean, dtype=torch.float64),
                                               torch.tensor(math.log(scale), dtype=torch.float64),
                                               **({} if K == 256 else {"levels": K}))   # 256 is the default
    assert abs(logp.exp().sum().item() - 1) < 1e-9
    # bin masses from scipy, each taken in the tail where it is accurate
    lo, hi = (edges[:-1] - mean) / scale, (edges[1:] - mean) / scale
    brute = np.where(lo > 0, norm.sf(lo) - norm.sf(hi), norm.cdf(hi) - norm.cdf(lo))
    ok = brute > 1e-300                                         # far tails underflow even in scipy
    np.testing.assert_allclose(logp.numpy()[ok], np.log(brute[ok]), rtol=1e-7, atol=1e-9)
    assert torch.isfinite(logp).all() and (logp.numpy()[~ok] < np.log(1e-300)).all()


def test_discretized_log_likelihood_levels_set_the_bins():
    x, mean, log_scale = torch.tensor([0.0], dtype=torch.float64), torch.tensor([0.05], dtype=torch.float64), torch.tensor([math.log(0.1)])
    for K, half in [(17, 1 / 16), (256, 1 / 255)]:
        want = np.log(norm.cdf((half - 0.05) / 0.1) - norm.cdf((-half - 0.05) / 0.1))
        np.testing.assert_allclose(discretized_gaussian_log_likelihood(x, mean, log_scale, K).item(), want, rtol=1e-9)
    with pytest.raises(ValueError, match="levels must be an int >= 2, got 1"):
        discretized_gaussian_log_likelihood(x, mean, log_scale, 1)


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


# The variational bound, against references built only from the forward process and plain Normal densities.
BETAS6 = torch.tensor([0.02, 0.05, 0.1, 0.15, 0.3, 0.5], dtype=torch.float64)
AC6 = torch.cumprod(1 - BETAS6, 0)
SLOPE6 = torch.tensor([0.4, -0.3, 0.2, 0.6, 0.9, 1.1], dtype=torch.float64)


def linear_eps_model(xt, t):
    "A 'network' we can write down: eps_theta(x_t, t) = k_t x_t."
    return SLOPE6[t].reshape(-1, *([1] * (xt.ndim - 1))) * xt


def model_mean6(xt, t):
    "The reverse mean (x_t - beta_t / sqrt(1 - alpha-bar_t) eps_theta) / sqrt(alpha_t), without clipping."
    return (xt - BETAS6[t] / (1 - AC6[t]).sqrt() * linear_eps_model(xt, torch.full((len(xt),), t))) / (1 - BETAS6[t]).sqrt()


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_variational_bound_terms_against_monte_carlo(variance):
    """Each L_{t-1}: the mean over images of the returned KL against E[log q(x_{t-1}|x_t,x_0) - log p(x_{t-1}|x_t)]
    over forward trajectories, with q(x_{t-1}|x_t,x_0) from Bayes' rule on the forward Gaussians."""
    N, K = 200_000, 9
    g = torch.Generator().manual_seed(0)
    x0 = torch.linspace(-1, 1, K, dtype=torch.float64)[torch.randint(0, K, (N, 1), generator=g)]
    vb = variational_bound(linear_eps_model, BETAS6, x0, K, variance=variance, clip_x0=False, generator=g)
    assert vb.t.shape == (N, 5) and vb.weights.tolist() == [1.0] * 5 and vb.dims == 1
    model_var = posterior_variance(BETAS6) if variance == "fixed_small" else BETAS6
    for t in range(1, 6):
        x_prev = AC6[t - 1].sqrt() * x0 + (1 - AC6[t - 1]).sqrt() * torch.randn(N, 1, generator=g, dtype=torch.float64)
        xt = (1 - BETAS6[t]).sqrt() * x_prev + BETAS6[t].sqrt() * torch.randn(N, 1, generator=g, dtype=torch.float64)
        log_post = (Normal((1 - BETAS6[t]).sqrt() * x_prev, BETAS6[t].sqrt()).log_prob(xt)
                    + Normal(AC6[t - 1].sqrt() * x0, (1 - AC6[t - 1]).sqrt()).log_prob(x_prev)
                    - Normal(AC6[t].sqrt() * x0, (1 - AC6[t]).sqrt()).log_prob(xt))
        log_ratio = log_post - Normal(model_mean6(xt, t), model_var[t].sqrt()).log_prob(x_prev)
        se = (log_ratio.var() / N + vb.terms[:, t - 1].var() / N).sqrt()
        assert abs(log_ratio.mean() - vb.terms[:, t - 1].mean()) < 5 * se, t
    want_prior = kl_divergence(Normal(AC6[-1].sqrt() * x0, (1 - AC6[-1]).sqrt()), Normal(0.0, 1.0)).squeeze(1)
    torch.testing.assert_close(vb.prior, want_prior)


def test_variational_bound_decoder_against_scipy():
    N, K = 100_000, 17
    g = torch.Generator().manual_seed(1)
    x0 = torch.linspace(-1, 1, K, dtype=torch.float64)[torch.randint(0, K, (N, 1), generator=g)]
    vb = variational_bound(linear_eps_model, BETAS6, x0, K, variance="fixed_large", clip_x0=False, generator=g)
    x1 = (1 - BETAS6[0]).sqrt() * x0 + BETAS6[0].sqrt() * torch.randn(N, 1, generator=g, dtype=torch.float64)
    mean, sd, half = model_mean6(x1, 0).numpy(), BETAS6[0].sqrt().item(), 1 / (K - 1)
    lo = np.where(x0.numpy() > -1 + 1e-9, (x0.numpy() - half - mean) / sd, -np.inf)
    hi = np.where(x0.numpy() < 1 - 1e-9, (x0.numpy() + half - mean) / sd, np.inf)
    nll = -np.log(np.maximum(norm.cdf(hi) - norm.cdf(lo), 1e-300)).squeeze(1)
    se = math.sqrt(nll.var() / N + vb.decoder.var().item() / N)
    assert abs(nll.mean() - vb.decoder.mean().item()) < 5 * se + 1e-12


def test_variational_bound_total_matches_the_path_bound():
    """log q(x_{1:T}|x_0) - log p(x_{0:T}) along forward trajectories (clip on: the model mean uses clipped x_0)."""
    N, K = 200_000, 5
    g = torch.Generator().manual_seed(2)
    x0 = torch.linspace(-1, 1, K, dtype=torch.float64)[torch.randint(0, K, (N, 1), generator=g)]
    xs = [x0]
    for t in range(6):
        xs.append((1 - BETAS6[t]).sqrt() * xs[-1] + BETAS6[t].sqrt() * torch.randn(N, 1, generator=g, dtype=torch.float64))
    c1, c2 = posterior_mean_coefs(BETAS6)
    var = posterior_variance(BETAS6)
    var[0] = var[1]                                          # the clipped first entry, for the decoder

    def clipped_mean(t):
        xt = xs[t + 1]
        x0_hat = (xt - (1 - AC6[t]).sqrt() * linear_eps_model(xt, torch.full((N,), t))) / AC6[t].sqrt()
        return c1[t] * x0_hat.clamp(-1, 1) + c2[t] * xt

    log_q = sum(Normal((1 - BETAS6[t]).sqrt() * xs[t], BETAS6[t].sqrt()).log_prob(xs[t + 1]) for t in range(6))
    log_p = Normal(0.0, 1.0).log_prob(xs[6]) + sum(Normal(clipped_mean(t), var[t].sqrt()).log_prob(xs[t]) for t in range(1, 6))
    dec = Normal(clipped_mean(0), var[0].sqrt())
    lo = torch.where(x0 > -1 + 1e-9, dec.cdf(x0 - 1 / (K - 1)), torch.zeros(()))
    hi = torch.where(x0 < 1 - 1e-9, dec.cdf(x0 + 1 / (K - 1)), torch.ones(()))
    direct = (log_q - log_p - (hi - lo).clamp(min=1e-300).log()).squeeze(1)
    for strata in (None, 2, 1):
        vb = variational_bound(linear_eps_model, BETAS6, x0, K, num_strata=strata, generator=torch.Generator().manual_seed(3))
        assert vb.weights.sum() == 5
        se = (direct.var() / N + vb.total.var() / N).sqrt()
        assert abs(direct.mean() - vb.total.mean()) < 5 * se, strata


def test_variational_bound_strata_and_bits_per_dim():
    betas = torch.linspace(1e-4, 0.02, 100, dtype=torch.float64)
    x0 = torch.zeros(4, 1, 2, 2)
    vb = variational_bound(lambda xt, t: torch.zeros_like(xt), betas, x0, num_strata=7, generator=torch.Generator().manual_seed(0))
    edges = [1 + round(k * 99 / 7) for k in range(8)]
    assert vb.weights.tolist() == [b - a for a, b in zip(edges, edges[1:])] and vb.weights.sum() == 99
    assert ((vb.t >= torch.tensor(edges[:-1])) & (vb.t < torch.tensor(edges[1:]))).all()
    r = vb.bits_per_dim()
    assert vb.dims == 4 and math.isclose(r["total"], (vb.total / (4 * math.log(2))).mean().item(), rel_tol=1e-12)
    assert math.isclose(r["total"], r["L_T"] + r["sum L_t-1"] + r["L_0"], rel_tol=1e-12)


@pytest.mark.parametrize("kwargs, match", [
    (dict(variance="learned"), "variance must be one of"),
    (dict(num_strata=0), r"num_strata must be an int in 1\.\.5 \(or None\), got 0"),
    (dict(num_strata=6), "got 6"),
    (dict(levels=1), "levels must be an int >= 2"),
])
def test_variational_bound_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        variational_bound(linear_eps_model, BETAS6, torch.zeros(2, 1, dtype=torch.float64), **kwargs)
    with pytest.raises(ValueError, match="T >= 2"):
        variational_bound(linear_eps_model, BETAS6[:1], torch.zeros(2, 1))
