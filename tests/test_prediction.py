"""Tests of ddpm_course.prediction and DDPM(prediction=, min_snr_gamma=): eps / x0 / v against diffusers, weights, bad input."""

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr
from torch import nn

from ddpm_course.ddpm import DDPM, ddpm_step
from ddpm_course.prediction import (PREDICTIONS, implied_eps_weight, min_snr_weight, prediction_from, snr, x0_eps_from,
                                    x0_eps_from_ab)
from ddpm_course.schedules import NoiseSchedule, cosine_beta_schedule, linear_beta_schedule
from ddpm_course.training import TrainConfig

T = 1000
BETAS = {"linear": linear_beta_schedule(T), "cosine": cosine_beta_schedule(T)}
DIFFUSERS_PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
TS = torch.tensor([0, 1, 37, 500, 998, 999])


def batch(seed, shape=(6, 1, 4, 4)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def scheduler(name, prediction="eps"):
    ref = DDPMScheduler(num_train_timesteps=T, trained_betas=BETAS[name].numpy(), clip_sample=False,
                        prediction_type=DIFFUSERS_PREDICTION[prediction])
    ref.alphas_cumprod = torch.cumprod(1 - BETAS[name], 0)  # float64, as our schedule computes it
    return ref


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_v_target_is_diffusers_velocity(name):
    s, x0, eps = NoiseSchedule(BETAS[name]), batch(0), batch(1)
    want = scheduler(name).get_velocity(x0.double(), eps.double(), TS)
    torch.testing.assert_close(prediction_from("v", x0, eps, TS, s).double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("t", [999, 500, 10, 1])
def test_ddpm_step_on_any_target_matches_diffusers(name, prediction, t):
    "A network output of each kind, converted to the noise by DDPM.predict_noise, steps as diffusers' scheduler of that kind."
    s = NoiseSchedule(BETAS[name])
    xt, out = batch(2), 0.5 * batch(3)

    class Fixed(nn.Module):
        def forward(self, x, tt):
            return out

    eps = DDPM(Fixed(), s, prediction=prediction).predict_noise(xt, t)
    z = torch.randn(xt.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)  # diffusers' draw
    got = ddpm_step(s, eps, t, xt, noise=z.float(), clip_x0=False)
    want = scheduler(name, prediction).step(out.double(), t, xt.double(), generator=torch.Generator().manual_seed(7)).prev_sample
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_conversions_round_trip_at_every_timestep():
    s = NoiseSchedule(BETAS["linear"])
    t = torch.arange(0, T, 37)
    x0, eps = batch(5, (len(t), 3)), batch(6, (len(t), 3))
    xt = s.q_sample(x0, t, eps)
    for kind in PREDICTIONS:
        back = x0_eps_from(kind, prediction_from(kind, x0, eps, t, s), xt, t, s)
        torch.testing.assert_close(back[0], x0, rtol=0, atol=3e-3)
        torch.testing.assert_close(back[1], eps, rtol=0, atol=3e-3)


def test_implied_weights_by_brute_force():
    s = NoiseSchedule(BETAS["cosine"])
    x0, eps = batch(7), batch(8)
    xt = s.q_sample(x0, TS, eps)
    eps_hat = eps + 0.1 * batch(9)
    x0_hat = s.predict_x0(xt, TS, eps_hat)
    base = ((eps_hat - eps) ** 2).flatten(1).sum(1).double()
    for kind in PREDICTIONS:
        err = ((prediction_from(kind, x0_hat, eps_hat, TS, s) - prediction_from(kind, x0, eps, TS, s)) ** 2).flatten(1).sum(1)
        torch.testing.assert_close(err.double() / base, implied_eps_weight(kind, snr(s, TS)).double(), rtol=2e-3, atol=0)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_min_snr_weights_match_diffusers_training_scripts(prediction):
    "diffusers' train_text_to_image: min(snr, gamma) / snr for epsilon, / (snr + 1) for v_prediction."
    ref = scheduler("linear")
    t = torch.arange(T)
    snr_ref = compute_snr(ref, t)
    want = torch.stack([snr_ref, 5.0 * torch.ones_like(snr_ref)], dim=1).min(dim=1)[0]
    want = want / snr_ref if prediction == "eps" else want / (snr_ref + 1)
    torch.testing.assert_close(min_snr_weight(prediction, snr(NoiseSchedule(BETAS["linear"]), t), 5.0).float(), want.float(),
                               rtol=1e-4, atol=1e-6)


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.7))

    def forward(self, x, t):
        return self.a * x + t.float().reshape(-1, 1, 1, 1) / 1000


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("gamma", [None, 5.0])
def test_ddpm_loss_is_the_weighted_distance_to_the_target(prediction, gamma):
    s, net = NoiseSchedule(BETAS["linear"]), Linear()
    x0, eps = batch(10), batch(11)
    ddpm = DDPM(net, s, prediction=prediction, min_snr_gamma=gamma)
    xt = s.q_sample(x0, TS, eps)
    target = {"eps": eps, "x0": x0, "v": s.sqrt_alphas_cumprod[TS, None, None, None] * eps
              - s.sqrt_one_minus_alphas_cumprod[TS, None, None, None] * x0}[prediction]
    per_example = ((net(xt, TS) - target) ** 2).flatten(1).mean(1)
    ab = torch.cumprod(1 - BETAS["linear"], 0)[TS]
    r = ab / (1 - ab)
    w = torch.ones(len(TS)) if gamma is None else (r.clamp(max=gamma) / {"eps": r, "x0": torch.ones_like(r), "v": r + 1}[prediction])
    torch.testing.assert_close(ddpm.loss(x0, TS, eps), (w * per_example).mean().float(), rtol=1e-4, atol=1e-6)


def test_x0_eps_from_ab_is_x0_eps_from_at_a_timestep():
    s, xt, out = NoiseSchedule(BETAS["cosine"]), batch(12), batch(13)
    a, b = s.sqrt_alphas_cumprod[TS, None, None, None], s.sqrt_one_minus_alphas_cumprod[TS, None, None, None]
    for kind in PREDICTIONS:
        for got, want in zip(x0_eps_from_ab(kind, out, xt, a, b), x0_eps_from(kind, out, xt, TS, s)):
            torch.testing.assert_close(got, want)


def test_bad_input():
    s = NoiseSchedule(BETAS["linear"])
    with pytest.raises(ValueError, match=r"prediction must be one of \('eps', 'x0', 'v'\), got 'score'"):
        DDPM(Linear(), s, prediction="score")
    with pytest.raises(ValueError, match="min_snr_gamma must be > 0 or None, got 0"):
        DDPM(Linear(), s, min_snr_gamma=0)
    with pytest.raises(ValueError, match="prediction must be one of"):
        TrainConfig(prediction="velocity")
    with pytest.raises(ValueError, match="min_snr_gamma must be a positive number or None"):
        TrainConfig(min_snr_gamma=-1.0)
    with pytest.raises(ValueError, match="must have the shape of xt"):
        x0_eps_from("v", batch(0, (2, 3)), batch(1, (2, 4)), torch.tensor([1, 2]), s)
    with pytest.raises(ValueError, match="gamma must be > 0"):
        min_snr_weight("eps", torch.ones(3), 0.0)
