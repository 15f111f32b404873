"""Tests of ddpm_course.solvers: Karras sigmas, Euler, Heun and DPM-Solver++ (2M) against diffusers' schedulers, step by step."""

import math

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler
from torch import nn

from ddpm_course.ddpm import DDPM
from ddpm_course.sampling import sample_ddim
from ddpm_course.schedules import NoiseSchedule, cosine_beta_schedule, linear_beta_schedule
from ddpm_course.score import schedule_sigmas
from ddpm_course.solvers import (SAMPLERS, SIGMA_SPACINGS, KarrasDenoiser, karras_sigmas, network_calls,
                                 sample_solver, sample_with, sigma_to_t, solve, solver_sigmas)

T = 1000
BETAS = {"linear": linear_beta_schedule(T), "cosine": cosine_beta_schedule(T)}
REFERENCES = {"dpm++": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler, "heun": HeunDiscreteScheduler}
DIFFUSERS_PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def spacing_options(solver, spacing):
    "diffusers' options for each of our spacings: its timestep spacing, Karras sigmas, or even log sigma (two names)."
    if spacing == "trailing":
        return dict(timestep_spacing="trailing")
    if spacing == "karras":
        return dict(use_karras_sigmas=True)
    return dict(use_lu_lambdas=True) if solver == "dpm++" else dict(use_exponential_sigmas=True)


def reference(solver, name, prediction="eps", spacing="karras"):
    "The diffusers scheduler of `solver` on the levels of `spacing`, computing its alpha-bar in float64 (its own is float32)."
    kw = dict(num_train_timesteps=T, trained_betas=BETAS[name].numpy(), prediction_type=DIFFUSERS_PREDICTION[prediction],
              **spacing_options(solver, spacing))
    if solver == "dpm++":
        kw.update(algorithm_type="dpmsolver++", solver_order=2)
    ref = REFERENCES[solver](**kw)
    ref.alphas_cumprod = torch.cumprod(1 - BETAS[name], 0)
    return ref


class RecordingNet(nn.Module):
    "A fixed smooth function of (x, t) standing in for a trained network, which records every input it is given."

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.3))
        self.inputs = []

    def forward(self, x, t):
        self.inputs.append((x.detach().double().clone(), t.detach().clone()))
        tt = t.to(x.dtype).reshape(-1, *[1] * (x.ndim - 1))
        return self.w.detach().to(x.dtype) * torch.tanh(x) + 0.2 * torch.sin(tt / 100) + 0.1 * x


def diffusers_run(ref, net, x_karras, sigma0):
    "diffusers' sampling loop from the Karras-variable state x_karras; the network is given the nearest integer timestep."
    sample = x_karras.double() if not isinstance(ref, DPMSolverMultistepScheduler) else x_karras.double() / math.sqrt(1 + sigma0**2)
    for t in ref.timesteps:
        inp = ref.scale_model_input(sample, t)
        out = net(inp, t.round().long().repeat(sample.shape[0]))
        sample = ref.step(out, t, sample).prev_sample
    return sample


@pytest.mark.parametrize("steps", [2, 7, 30])  # at 1 step diffusers' Euler starts from sigma_min (its one timestep is 0)
@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_karras_sigmas_and_timesteps_match_diffusers(steps, name):
    s = NoiseSchedule(BETAS[name])
    sched = schedule_sigmas(s)
    ours = karras_sigmas(float(sched[0]), float(sched[-1]), steps)
    for solver in ("euler", "dpm++"):
        ref = reference(solver, name)
        ref.set_timesteps(steps)
        torch.testing.assert_close(ours.float(), ref.sigmas.float(), rtol=1e-5, atol=0)
    euler = reference("euler", name)
    euler.set_timesteps(steps)
    torch.testing.assert_close(sigma_to_t(ours[:-1], s).float(), euler.timesteps.float(), rtol=0, atol=2e-3)
    if name == "linear":  # diffusers' DPM-Solver keeps fractional timesteps for the cosine schedule
        dpm = reference("dpm++", name)
        dpm.set_timesteps(steps)
        assert sigma_to_t(ours[:-1], s).round().long().tolist() == dpm.timesteps.tolist()


@pytest.mark.parametrize("spacing", SIGMA_SPACINGS)
@pytest.mark.parametrize("steps", [2, 7, 30])  # at 1 step diffusers' Karras and even-log-sigma ramps have one point: sigma_min
@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_solver_sigmas_match_diffusers(spacing, steps, name):
    s = NoiseSchedule(BETAS[name])
    ours = solver_sigmas(s, steps, spacing)
    assert ours.dtype == torch.float64 and ours.shape == (steps + 1,) and ours[-1] == 0
    for solver in ("dpm++", "euler", "heun"):
        ref = reference(solver, name, spacing=spacing)
        ref.set_timesteps(steps)
        want = ref.sigmas if solver != "heun" else torch.cat([ref.sigmas[:1], ref.sigmas[1:-1:2], ref.sigmas[-1:]])
        torch.testing.assert_close(ours.float(), want.float(), rtol=1e-5, atol=0)


def test_solver_sigmas_spacings_by_hand():
    s = NoiseSchedule(BETAS["linear"])
    sched = schedule_sigmas(s)
    assert solver_sigmas(s, 4, "trailing")[:-1].tolist() == sched[[999, 749, 499, 249]].tolist()  # every T/steps from T-1
    torch.testing.assert_close(solver_sigmas(s, 9, "karras", rho=3.0), karras_sigmas(float(sched[0]), float(sched[-1]), 9, 3.0))
    log_levels = solver_sigmas(s, 6, "lambda")[:-1].log()
    torch.testing.assert_close(log_levels.diff(), torch.full((5,), float(sched[0].log() - sched[-1].log()) / 5, dtype=torch.float64))


# diffusers' EulerDiscreteScheduler has no x0 prediction
SOLVER_PREDICTIONS = [(sv, p) for sv in ("dpm++", "euler", "heun") for p in ("eps", "x0", "v") if (sv, p) != ("euler", "x0")]


@pytest.mark.parametrize("solver,prediction", SOLVER_PREDICTIONS)
@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [2, 10, 25])
def test_solvers_match_diffusers_step_by_step(solver, prediction, name, steps):
    "The state at every network call and the result equal diffusers' (clipping off, as diffusers' default)."
    s = NoiseSchedule(BETAS[name])
    sched = schedule_sigmas(s)
    sigmas = karras_sigmas(float(sched[0]), float(sched[-1]), steps)
    x_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    x = x_T.double() * math.sqrt(1 + float(sigmas[0]) ** 2)  # the solvers keep their state in float64

    ours_net, theirs_net = RecordingNet(), RecordingNet()
    got = solve(KarrasDenoiser(DDPM(ours_net, s, prediction=prediction)), x, sigmas, solver)
    ref = reference(solver, name, prediction)
    ref.set_timesteps(steps)
    ref.set_begin_index(0)  # count steps rather than look timesteps up: rounded ones repeat at low noise (cosine)
    # diffusers rounds its sigmas to float32 (their equality with ours is tested above); at the cosine schedule's
    # sigma_max of 10^4 that rounding alone moves a 2-step result by 1e-3, so it gets the same levels in float64
    ref.sigmas = sigmas if solver != "heun" else torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])
    want = diffusers_run(ref, theirs_net, x, float(sigmas[0]))

    assert len(ours_net.inputs) == len(theirs_net.inputs) == network_calls(solver, steps)
    for (xa, ta), (xb, tb) in zip(ours_net.inputs, theirs_net.inputs):
        assert torch.equal(ta, tb)
        torch.testing.assert_close(xa, xb, rtol=1e-4, atol=1e-5 * float(xb.abs().max()))  # float32 against float64
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("solver", ["dpm++", "euler", "heun"])
@pytest.mark.parametrize("spacing", ["trailing", "lambda"])
@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_solvers_match_diffusers_on_the_other_spacings(solver, spacing, name):
    "The same step-by-step equality on diffusers' own levels of each spacing (set by its options, not copied from ours)."
    s = NoiseSchedule(BETAS[name])
    steps = 10
    sigmas = solver_sigmas(s, steps, spacing)
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1)).double() * math.sqrt(1 + float(sigmas[0]) ** 2)
    ours_net, theirs_net = RecordingNet(), RecordingNet()
    got = solve(KarrasDenoiser(DDPM(ours_net, s)), x, sigmas, solver)
    ref = reference(solver, name, spacing=spacing)
    ref.set_timesteps(steps)
    ref.set_begin_index(0)
    want = diffusers_run(ref, theirs_net, x, float(sigmas[0]))
    assert len(ours_net.inputs) == len(theirs_net.inputs) == network_calls(solver, steps)
    for (xa, ta), (xb, tb) in zip(ours_net.inputs, theirs_net.inputs):
        assert torch.equal(ta, tb)
        torch.testing.assert_close(xa, xb, rtol=1e-4, atol=1e-4 * float(xb.abs().max()))  # diffusers' levels are float32
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def gaussian_denoiser(mu, sd):
    "The exact D(x, sigma) = E[x_0 | x] for data N(mu, sd^2), in Karras variables x = x_0 + sigma * eps."
    return lambda x, sigma: mu + sd**2 / (sd**2 + sigma**2) * (x - mu)


@pytest.mark.parametrize("solver,order", [("euler", 1), ("heun", 2), ("dpm++", 2)])
def test_solvers_converge_at_their_order_to_the_exact_ode_solution(solver, order):
    "For Gaussian data the probability-flow ODE is solved in closed form: x_0 = mu + (x_T - mu) sd / sqrt(sd^2 + sigma_max^2)."
    mu, sd, sigma_max = 0.3, 0.5, 80.0
    x = torch.linspace(-3, 3, 7, dtype=torch.float64) * sigma_max
    exact = mu + (x - mu) * sd / math.sqrt(sd**2 + sigma_max**2)
    errors = [float((solve(gaussian_denoiser(mu, sd), x, karras_sigmas(0.01, sigma_max, n), solver) - exact).abs().max())
              for n in (20, 40, 80)]
    for coarse, fine in zip(errors, errors[1:]):
        assert 2**order * 0.85 < coarse / fine < 2**order * 1.25, errors


def fake_ddpm(prediction="eps"):
    return DDPM(RecordingNet(), NoiseSchedule(BETAS["linear"]), sample_shape=(1, 4, 4), prediction=prediction)


@pytest.mark.parametrize("solver,steps", [("dpm++", 2), ("euler", 1), ("heun", 1), ("heun", 6)])
def test_sample_solver_makes_the_promised_calls_and_is_seed_stable_in_batches(solver, steps):
    ddpm = fake_ddpm()
    a = sample_solver(ddpm, 5, steps, solver, seed=3)
    assert len(ddpm.model.inputs) == network_calls(solver, steps)
    b = sample_solver(ddpm, 5, steps, solver, seed=3, batch_size=2)
    assert a.dtype == torch.float32 and a.shape == (5, 1, 4, 4)
    torch.testing.assert_close(a, b)
    assert a.abs().max() <= 1  # clipped x0 at the last step


def test_sample_with_dispatches_to_each_sampler():
    ddpm = fake_ddpm()
    torch.testing.assert_close(sample_with("ddim", ddpm, 3, 7, seed=1), sample_ddim(ddpm, 3, steps=7, seed=1))
    torch.testing.assert_close(sample_with("heun", ddpm, 3, 4, seed=1), sample_solver(ddpm, 3, 4, "heun", seed=1))
    start = torch.randn((3, 1, 4, 4), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(sample_with("euler", ddpm, 3, 4, seed=1), sample_solver(ddpm, steps=4, solver="euler", xt=start))
    assert set(SAMPLERS) == {"ddpm", "ddim", "dpm++", "euler", "heun"}
    torch.testing.assert_close(sample_with("ddim", ddpm, 3, 7, eta=0.5, seed=1), sample_ddim(ddpm, 3, steps=7, eta=0.5, seed=1))
    torch.testing.assert_close(sample_with("dpm++", ddpm, 3, 5, spacing="karras", seed=1),
                               sample_solver(ddpm, 3, 5, "dpm++", spacing="karras", seed=1))


def test_euler_on_the_trailing_spacing_is_ddim():
    "DDIM (eta 0) is Euler's method for the probability-flow ODE: on the same levels the two give the same samples."
    ddpm = fake_ddpm()
    torch.testing.assert_close(sample_solver(ddpm, 4, 6, "euler", spacing="trailing", seed=2, clip_x0=False),
                               sample_ddim(ddpm, 4, steps=6, seed=2, clip_x0=False), rtol=1e-4, atol=1e-5)


def test_bad_input_fails_with_what_was_expected():
    ddpm = fake_ddpm()
    with pytest.raises(ValueError, match=r"sampler must be one of \('ddpm', 'ddim', 'dpm\+\+', 'euler', 'heun'\), got 'lms'"):
        sample_with("lms", ddpm, 2)
    with pytest.raises(ValueError, match=r"dpm\+\+ needs steps >= 2 \(a multistep solver needs a previous step\), got 1"):
        sample_solver(ddpm, 2, 1, "dpm++")
    with pytest.raises(ValueError, match="euler needs steps >= 1, got 0"):
        sample_solver(ddpm, 2, 0, "euler")
    with pytest.raises(ValueError, match="the ddpm sampler takes all T = 1000 steps, got steps=50"):
        sample_with("ddpm", ddpm, 2, 50)
    with pytest.raises(ValueError, match="need 0 < sigma_min <= sigma_max"):
        karras_sigmas(2.0, 1.0, 10)
    with pytest.raises(ValueError, match=r"spacing must be one of \('trailing', 'karras', 'lambda'\), got 'linspace'"):
        sample_solver(ddpm, 2, 4, spacing="linspace")
    with pytest.raises(ValueError, match=r"eta is for the ddim sampler, got eta=0.5 with 'dpm\+\+'"):
        sample_with("dpm++", ddpm, 2, 4, eta=0.5)
    with pytest.raises(ValueError, match="give either n_or_shape"):
        sample_solver(ddpm, 2, 4, xt=torch.zeros(2, 1, 4, 4))
