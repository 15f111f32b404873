"""Tests for ddpm_course.forward: argument checks, extract, q_step, q_sample; the sample photo (from data)."""
import subprocess
import sys

import pytest
import torch

from ddpm_course.data import load_sample_photo
from ddpm_course.forward import check_betas, check_broadcast, check_timesteps, extract, q_sample, q_step

T = 1000
BETAS = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
AC = torch.cumprod(1 - BETAS, 0)


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(0), "1-D tensor of length T >= 1"),
    (torch.full((2, 3), 0.1), r"got shape \[2, 3\]"),
    (torch.tensor(0.1), r"got shape \[\]"),
    (torch.tensor([1, 0]), "floating-point"),
    (torch.tensor([0.1, float("nan")]), "finite"),
    (torch.tensor([0.1, float("inf")]), "finite"),
    (torch.tensor([0.1, 0.0]), r"open interval \(0, 1\), got betas\[1\] = 0.0"),
    (torch.tensor([0.1, 1.0]), r"betas\[1\] = 1.0"),
    (torch.tensor([-0.1, 0.5]), r"betas\[0\] = -0.1"),
])
def test_check_betas_rejects(bad, match):
    with pytest.raises(ValueError, match=match):
        check_betas(bad)


def test_check_betas_returns_float64():
    out = check_betas(BETAS.float())
    assert out.dtype == torch.float64 and torch.equal(out, BETAS.float().double())
    assert check_betas([0.5]).tolist() == [0.5]


@pytest.mark.parametrize("t, match", [
    (torch.tensor([0.0, 1.0]), "integer tensor"),
    (torch.tensor([True, False]), "integer tensor"),
    ([0, 1], "integer tensor"),
    (torch.tensor([[0, 1]]), r"1-D tensor of shape \[2\]"),
    (torch.tensor([0, 1, 2]), r"shape \[2\].*got shape \[3\]"),
    (torch.tensor([-1, 3]), r"0\.\.9 .*from -1 to 3"),
    (torch.tensor([0, 10]), r"0\.\.9 .*from 0 to 10"),
])
def test_check_timesteps_rejects(t, match):
    with pytest.raises(ValueError, match=match):
        check_timesteps(t, 10, batch_size=2)


def test_check_timesteps_accepts_all_integer_dtypes():
    for dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        check_timesteps(torch.tensor([0, 9], dtype=dtype), 10, 2)


def test_check_broadcast():
    assert check_broadcast(a=torch.zeros(3, 1), b=torch.zeros(1, 4)) == (3, 4)
    with pytest.raises(ValueError, match=r"a \[3\], b \[4\]"):
        check_broadcast(a=torch.zeros(3), b=torch.zeros(4))


def test_extract_matches_indexing():
    a = torch.randn(T)
    t = torch.randint(0, T, (7,))
    out = extract(a, t, (7, 3, 5, 5))
    assert out.shape == (7, 1, 1, 1)
    assert out.flatten().tolist() == [a[i].item() for i in t.tolist()]
    assert extract(a, t, (7,)).shape == (7,)


def test_extract_rejects_bad_shapes():
    with pytest.raises(ValueError, match="batch dimension"):
        extract(torch.randn(5), torch.tensor([0]), ())
    with pytest.raises(ValueError, match=r"shape \[4\]"):
        extract(torch.randn(5), torch.tensor([0, 1]), (4, 3))


def test_extract_follows_the_array_device():
    a = torch.randn(T).to("meta")
    assert extract(a, torch.tensor([1, 2]), (2, 3)).device.type == "meta"


def test_q_sample_formula_with_given_noise():
    x0, eps = torch.randn(4, 3, 2, 2, dtype=torch.float64), torch.randn(4, 3, 2, 2, dtype=torch.float64)
    t = torch.tensor([0, 5, 500, 999])
    out = q_sample(x0, t, AC.sqrt(), (1 - AC).sqrt(), noise=eps)
    for i, ti in enumerate(t.tolist()):
        torch.testing.assert_close(out[i], AC[ti].sqrt() * x0[i] + (1 - AC[ti]).sqrt() * eps[i])


def test_q_sample_rejects_bad_noise_and_t():
    x0 = torch.randn(2, 3)
    with pytest.raises(ValueError, match="noise must have the shape of x"):
        q_sample(x0, torch.tensor([0, 1]), AC.sqrt(), (1 - AC).sqrt(), noise=torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"0\.\.999"):
        q_sample(x0, torch.tensor([0, T]), AC.sqrt(), (1 - AC).sqrt())
    with pytest.raises(ValueError, match=r"shape \[2\]"):
        q_sample(x0, torch.tensor([0]), AC.sqrt(), (1 - AC).sqrt())


def _within_mc(samples, mean, var, n_se=5.0):
    n = samples.shape[0]
    ok_mean = (samples.mean(0) - mean).abs() <= n_se * (var / n).sqrt()
    ok_var = (samples.var(0) - var).abs() <= n_se * var * (2 / (n - 1)) ** 0.5
    return bool(ok_mean.all() and ok_var.all())


def test_chain_of_q_steps_matches_q_sample_moments():
    """Simulating q(x_t | x_{t-1}) step by step reproduces the closed form q(x_t | x_0)."""
    torch.manual_seed(0)
    Tsmall, N = 200, 8000
    betas = torch.linspace(1e-3, 0.05, Tsmall, dtype=torch.float64)
    ac = torch.cumprod(1 - betas, 0)
    x0 = torch.tensor([1.0, 0.2, -0.7, -1.0], dtype=torch.float64)
    x = x0.expand(N, -1).clone()
    for t in range(Tsmall):
        x = q_step(x, torch.full((N,), t), betas)
        if t in (0, 20, 80, 199):
            mean, var = ac[t].sqrt() * x0, (1 - ac[t]).expand(4)
            assert _within_mc(x, mean, var), t
            direct = q_sample(x0.expand(N, -1), torch.full((N,), t), ac.sqrt(), (1 - ac).sqrt())
            assert _within_mc(direct, mean, var), t
            assert not _within_mc(x, (1 - betas[t]).sqrt() * x0, var) or t == 0   # the one-step factor is wrong


def test_q_step_formula_and_dtype():
    x, eps = torch.randn(3, 2), torch.randn(3, 2)
    t = torch.tensor([0, 1, 999])
    out = q_step(x, t, BETAS, noise=eps)
    assert out.dtype == torch.float32
    want = (1 - BETAS[t]).sqrt()[:, None] * x.double() + BETAS[t].sqrt()[:, None] * eps.double()
    torch.testing.assert_close(out, want.float())


def test_load_sample_photo():
    for size in (16, 64):
        x = load_sample_photo(size)
        assert x.shape == (3, size, size) and x.dtype == torch.float32
        assert -1 <= x.min() < x.max() <= 1 and x.std() > 0.2
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match=f"size must be an int >= 1, got {bad!r}"):
            load_sample_photo(bad)


@pytest.mark.parametrize("module", ["ddpm_course", "ddpm_course.forward", "ddpm_course.schedules", "ddpm_course.unet",
                                    "ddpm_course.ddpm", "ddpm_course.checkpoint"])
def test_the_math_and_network_modules_do_not_import_matplotlib(module):
    "In a fresh interpreter (this one has matplotlib loaded by other tests)."
    probe = f"import sys, {module}; print('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip() == "False"
