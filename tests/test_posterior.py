"""Tests for ddpm_course.posterior against brute-force Gaussian conditioning and Monte Carlo."""
import math

import pytest
import torch

from ddpm_course.forward import q_sample, q_step
from ddpm_course.posterior import (alphas_cumprod_prev, mean_from_eps, posterior_log_variance_clipped,
                                   posterior_mean, posterior_mean_coefs, posterior_variance,
                                   predict_eps_from_x0, predict_x0_from_eps)

T = 1000
BETAS = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
AC = torch.cumprod(1 - BETAS, 0)


def _conditional_by_recursion(betas):
    """Coefficients of E[x_{t-1} | x_t, x0] and Var[x_{t-1} | x_t, x0] from step-by-step moments (no closed form)."""
    coef_x0, coef_xt, var = [], [], []
    m_prev, v_prev = 1.0, 0.0                     # x_{t-1} = m_prev * x0 + noise of variance v_prev
    for beta in betas.tolist():
        alpha = 1 - beta
        m_t, v_t = math.sqrt(alpha) * m_prev, alpha * v_prev + beta
        cov = math.sqrt(alpha) * v_prev
        k = cov / v_t                              # Sigma_12 / Sigma_22
        coef_xt.append(k)
        coef_x0.append(m_prev - k * m_t)
        var.append(v_prev - k * cov)
        m_prev, v_prev = m_t, v_t
    return [torch.tensor(v, dtype=torch.float64) for v in (coef_x0, coef_xt, var)]


@pytest.mark.parametrize("betas", [BETAS, torch.linspace(0.05, 0.4, 12, dtype=torch.float64),
                                   torch.tensor([0.3], dtype=torch.float64)])
def test_posterior_matches_gaussian_conditioning(betas):
    want_c1, want_c2, want_var = _conditional_by_recursion(betas)
    c1, c2 = posterior_mean_coefs(betas)
    torch.testing.assert_close(c1, want_c1, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(c2, want_c2, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(posterior_variance(betas), want_var, rtol=1e-9, atol=1e-12)


def test_posterior_matches_block_matrix_conditioning_in_several_dimensions():
    """Condition the joint 2d-dimensional Gaussian of (x_{t-1}, x_t) given x0 with full matrices."""
    betas = torch.linspace(0.01, 0.3, 6, dtype=torch.float64)
    ac = torch.cumprod(1 - betas, 0)
    acp = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    d, x0 = 3, torch.tensor([0.5, -0.25, 1.0], dtype=torch.float64)
    xt = torch.tensor([0.1, 0.7, -0.4], dtype=torch.float64)
    eye = torch.eye(d, dtype=torch.float64)
    c1, c2 = posterior_mean_coefs(betas)
    var = posterior_variance(betas)
    for t in range(len(betas)):
        mean = torch.cat([acp[t].sqrt() * x0, ac[t].sqrt() * x0])
        s11, s22 = (1 - acp[t]) * eye, (1 - ac[t]) * eye
        s12 = (1 - betas[t]).sqrt() * (1 - acp[t]) * eye
        cov = torch.cat([torch.cat([s11, s12], 1), torch.cat([s12.T, s22], 1)])
        gain = cov[:d, d:] @ torch.linalg.inv(cov[d:, d:])
        cond_mean = mean[:d] + gain @ (xt - mean[d:])
        cond_cov = cov[:d, :d] - gain @ cov[d:, :d]
        got = posterior_mean(x0[None], xt[None], torch.tensor([t]), c1, c2)[0]
        torch.testing.assert_close(got, cond_mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(cond_cov, var[t] * eye, rtol=1e-10, atol=1e-12)


def test_posterior_by_monte_carlo_regression():
    torch.manual_seed(0)
    N, x0 = 8000, torch.tensor([1.0, -0.5, 0.0, -1.0], dtype=torch.float64)
    c1, c2 = posterior_mean_coefs(BETAS)
    var = posterior_variance(BETAS)
    for t in (1, 50, 600):
        x_prev = q_sample(x0.expand(N, -1), torch.full((N,), t - 1), AC.sqrt(), (1 - AC).sqrt())
        x_t = q_step(x_prev, torch.full((N,), t), BETAS)
        xc, yc = x_t - x_t.mean(0), x_prev - x_prev.mean(0)
        slope = (xc * yc).sum(0) / (xc ** 2).sum(0)
        resid = ((yc - slope * xc) ** 2).sum(0) / (N - 2)
        assert ((slope - c2[t]).abs() < 5 * (resid / (xc ** 2).sum(0)).sqrt()).all()
        assert ((resid - var[t]).abs() < 5 * var[t] * (2 / N) ** 0.5).all()
        intercept = x_prev.mean(0) - slope * x_t.mean(0)
        assert ((intercept - c1[t] * x0).abs() < 5 * (resid * (1 / N + x_t.mean(0) ** 2 / (xc ** 2).sum(0))).sqrt()).all()


def test_alphas_cumprod_prev_and_first_step():
    acp = alphas_cumprod_prev(AC)
    assert acp[0] == 1 and torch.equal(acp[1:], AC[:-1])
    c1, c2 = posterior_mean_coefs(BETAS)
    assert posterior_variance(BETAS)[0] == 0 and abs(c1[0] - 1) < 1e-9 and c2[0] == 0   # x_{t-1} = x0 is known at t=0


def test_posterior_log_variance_clipped():
    lv, var = posterior_log_variance_clipped(BETAS), posterior_variance(BETAS)
    assert lv[0] == lv[1] and torch.isfinite(lv).all()
    torch.testing.assert_close(lv[1:], var[1:].log())
    one = torch.tensor([0.2], dtype=torch.float64)
    torch.testing.assert_close(posterior_log_variance_clipped(one), one.log())


def test_predict_roundtrip_and_mean_from_eps():
    torch.manual_seed(1)
    t = torch.arange(0, T, 37)
    x0 = torch.rand(len(t), 3, 4, 4, dtype=torch.float64) * 2 - 1
    eps = torch.randn_like(x0)
    xt = q_sample(x0, t, AC.sqrt(), (1 - AC).sqrt(), noise=eps)
    r, rm1 = AC.rsqrt(), (1 / AC - 1).sqrt()
    torch.testing.assert_close(predict_x0_from_eps(xt, t, eps, r, rm1), x0)
    torch.testing.assert_close(predict_eps_from_x0(xt, t, x0, r, rm1), eps)
    c1, c2 = posterior_mean_coefs(BETAS)
    torch.testing.assert_close(mean_from_eps(xt, t, eps, BETAS), posterior_mean(x0, xt, t, c1, c2))
    # the paper's formula, written out independently
    for i, ti in enumerate(t.tolist()):
        b, a, ac = BETAS[ti], 1 - BETAS[ti], AC[ti]
        torch.testing.assert_close(mean_from_eps(xt[i:i + 1], t[i:i + 1], eps[i:i + 1], BETAS)[0],
                                   (xt[i] - b / (1 - ac).sqrt() * eps[i]) / a.sqrt())


def test_mean_from_eps_keeps_dtype():
    xt, eps = torch.randn(2, 3), torch.randn(2, 3)
    assert mean_from_eps(xt, torch.tensor([0, 1]), eps, BETAS).dtype == torch.float32


def test_bad_input():
    c1, c2 = posterior_mean_coefs(BETAS)
    with pytest.raises(ValueError, match="broadcast"):
        posterior_mean(torch.zeros(2, 3), torch.zeros(2, 4), torch.tensor([0, 1]), c1, c2)
    with pytest.raises(ValueError, match=r"0\.\.999"):
        posterior_mean(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 1000]), c1, c2)
    with pytest.raises(ValueError, match="broadcast"):
        mean_from_eps(torch.zeros(2, 3), torch.tensor([0, 1]), torch.zeros(3, 3), BETAS)
    with pytest.raises(ValueError, match="open interval"):
        posterior_variance(torch.tensor([0.1, 1.5]))
