"""Tests of ddpm_course.embeddings against diffusers' get_timestep_embedding and the written-out formulas."""
import math

import pytest
import torch
from diffusers.models.embeddings import get_timestep_embedding

from ddpm_course.embeddings import EMBEDDING_VARIANTS, SinusoidalEmbedding, TimeMLP, timestep_embedding

T_INT = torch.tensor([0, 1, 2, 17, 250, 999])
T_FLOAT = torch.tensor([0.0, 0.5, 3.25, 998.75])


@pytest.mark.parametrize("dim", [4, 7, 32, 33, 128])
@pytest.mark.parametrize("t", [T_INT, T_FLOAT])
def test_ddpm_variant_is_diffusers_default(dim, t):
    # diffusers' default (flip_sin_to_cos=False, downscale_freq_shift=1): [sin | cos], log(P)/(half-1), zero pad if odd
    ref = get_timestep_embedding(t, dim, flip_sin_to_cos=False, downscale_freq_shift=1)
    torch.testing.assert_close(timestep_embedding(t, dim, "ddpm"), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dim", [4, 32, 128])
def test_flip_sin_to_cos_swaps_the_halves(dim):
    ref = get_timestep_embedding(T_INT, dim, flip_sin_to_cos=True, downscale_freq_shift=1)
    ours = timestep_embedding(T_INT, dim, "ddpm")
    torch.testing.assert_close(torch.cat([ours[:, dim // 2 :], ours[:, : dim // 2]], 1), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dim", [4, 32, 128])
@pytest.mark.parametrize("t", [T_INT, T_FLOAT])
def test_transformer_variant_is_diffusers_shift_zero_interleaved(dim, t):
    # downscale_freq_shift=0 gives the P^(-2i/d) ladder; ours interleaves sin/cos where diffusers keeps halves
    ref = get_timestep_embedding(t, dim, flip_sin_to_cos=False, downscale_freq_shift=0)
    ours = timestep_embedding(t, dim, "transformer")
    torch.testing.assert_close(ours[:, 0::2], ref[:, : dim // 2], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours[:, 1::2], ref[:, dim // 2 :], atol=1e-5, rtol=0)


@pytest.mark.parametrize("dim", [2, 3, 5, 9])
def test_transformer_odd_and_tiny_dims_brute_force(dim):
    t = torch.tensor([0.0, 1.0, 42.0, 999.0], dtype=torch.float64)
    ref = torch.tensor(
        [[(math.sin if j % 2 == 0 else math.cos)(s * 10000.0 ** (-2 * (j // 2) / dim)) for j in range(dim)] for s in t.tolist()],
        dtype=torch.float64,
    )
    torch.testing.assert_close(timestep_embedding(t, dim, "transformer"), ref)


def test_variants_differ_only_by_period_and_order():
    d, h = 64, 32
    t = torch.arange(1000, dtype=torch.float64)
    ddpm = timestep_embedding(t, d, "ddpm")
    tr = timestep_embedding(t, d, "transformer", max_period=10000.0 ** (h / (h - 1)))
    torch.testing.assert_close(ddpm, torch.cat([tr[:, 0::2], tr[:, 1::2]], 1))
    same_p = timestep_embedding(t, d, "transformer")
    assert (ddpm - torch.cat([same_p[:, 0::2], same_p[:, 1::2]], 1)).abs().max() > 0.5


def test_dtypes_devices_and_scalars():
    assert timestep_embedding(torch.tensor([3]), 8).dtype == torch.float32
    assert timestep_embedding(torch.tensor([3.0], dtype=torch.float64), 8).dtype == torch.float64
    half = timestep_embedding(torch.tensor([999.0], dtype=torch.float16), 16, dtype=torch.float16)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), timestep_embedding(torch.tensor([999]), 16), atol=1e-3, rtol=0)
    assert torch.equal(timestep_embedding(torch.arange(5), 10), timestep_embedding(torch.arange(5.0), 10))
    assert torch.equal(timestep_embedding(7, 10), timestep_embedding(torch.tensor([7]), 10))
    for v in EMBEDDING_VARIANTS:  # everything is created on t's device (meta: no data, only device and shape)
        e = timestep_embedding(torch.arange(4, device="meta"), 9, v)
        assert e.device.type == "meta" and e.shape == (4, 9)


def test_distinct_and_bounded():
    for v in EMBEDDING_VARIANTS:
        e = timestep_embedding(torch.arange(1000), 32, v)
        assert e.abs().max() <= 1
        d = torch.cdist(e, e) + torch.eye(1000) * 10
        assert d.min() > 0.01


def test_bad_arguments():
    with pytest.raises(ValueError, match="variant"):
        timestep_embedding(T_INT, 8, "rope")
    with pytest.raises(ValueError, match="dim"):
        timestep_embedding(T_INT, 1)
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        timestep_embedding(torch.zeros(2, 3), 8)
    with pytest.raises(ValueError, match="act"):
        TimeMLP(8, act="relu")
    with pytest.raises(ValueError, match="variant"):
        SinusoidalEmbedding(8, "bad")


def test_time_mlp():
    torch.manual_seed(0)
    mlp = TimeMLP(16, variant="transformer", act="gelu")
    out = mlp(torch.randint(0, 1000, (5,)))
    assert out.shape == (5, 64)
    assert sum(p.numel() for p in mlp.parameters()) == 16 * 64 + 64 + 64 * 64 + 64
    torch.testing.assert_close(mlp(torch.tensor([10])), mlp.mlp(timestep_embedding(torch.tensor([10]), 16, "transformer")))
    assert TimeMLP(8, 24)(torch.tensor([1, 2])).shape == (2, 24)
    assert mlp.double()(torch.tensor([3])).dtype == torch.float64
