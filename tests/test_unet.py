"""Tests of ddpm_course.unet: shapes, input checks, gradients, config round trip, presets, SimpleUNet."""
import json

import pytest
import torch
from torch import nn

from ddpm_course.blocks import Attention, LinearAttention, WeightStandardizedConv2d
from ddpm_course.unet import UNET_PRESETS, SimpleUNet, UNet, unet_preset

n_params = lambda m: sum(p.numel() for p in m.parameters())


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def digits_net():
    torch.manual_seed(0)
    return unet_preset("digits")


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("hw", [(8, 8), (16, 16), (8, 24), (32, 32)])
def test_shapes_across_sizes_and_batches(digits_net, batch, hw):
    x = torch.randn(batch, 1, *hw)
    assert digits_net(x, torch.randint(0, 1000, (batch,))).shape == (batch, 1, *hw)


def test_channels_in_and_out_and_levels():
    net = UNet(dim=8, dim_mults=(1, 2, 3, 4), channels=3, out_channels=6, groups=4, heads=2, dim_head=4)
    assert net.downsample_factor == 8
    assert net(torch.randn(2, 3, 16, 8), torch.tensor([1, 2])).shape == (2, 6, 16, 8)
    one = UNet(dim=8, dim_mults=(2,), channels=2, groups=4)
    assert one.downsample_factor == 1 and one(torch.randn(1, 2, 5, 7), torch.tensor([3])).shape == (1, 2, 5, 7)


def test_input_checks(digits_net):
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="expected 1 input channels, got 3"):
        digits_net(torch.randn(2, 3, 8, 8), t)
    with pytest.raises(ValueError, match="divisible by 4"):
        digits_net(torch.randn(2, 1, 8, 6), t)
    with pytest.raises(ValueError, match=r"shape \[2\]"):
        digits_net(x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"shape \[2\]"):
        digits_net(x, torch.ones(2, 1))
    with pytest.raises(ValueError, match="4-D|3-D"):
        digits_net(torch.randn(1, 8, 8), torch.tensor([1]))
    with pytest.raises(ValueError, match="attn needs one entry per level"):
        UNet(dim_mults=(1, 2), attn=("full",))
    with pytest.raises(ValueError, match="attention kinds"):
        UNet(attn="window")
    with pytest.raises(ValueError, match="unknown U-Net preset"):
        unet_preset("imagen")


def test_timesteps_int_float_scalar(digits_net):
    net = digits_net.eval()
    x = torch.randn(3, 1, 8, 8)
    ti = torch.tensor([5, 5, 5])
    out = net(x, ti)
    assert torch.equal(out, net(x, ti.float()))
    assert torch.equal(out, net(x, 5))
    assert not torch.allclose(out, net(x, torch.tensor([6, 5, 5])))
    assert torch.allclose(out[1:], net(x, torch.tensor([6, 5, 5]))[1:], atol=1e-6)


def test_samples_are_independent_unlike_batchnorm(digits_net):
    # GroupNorm: an image's output does not depend on the rest of the batch (BatchNorm in training mode does)
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 500, 999])
    net = digits_net.train()
    torch.testing.assert_close(net(x, t)[:1], net(x[:1], t[:1]), atol=1e-5, rtol=1e-5)
    simple = SimpleUNet(channels=1, down_channels=(8, 16, 32)).train()
    assert not torch.allclose(simple(x, t)[:1], simple(x[:2], t[:2])[:1], atol=1e-3)


GRAD_CONFIGS = [
    dict(UNET_PRESETS["digits"]),
    dict(dim=8, dim_mults=(1, 2), channels=3, attn=("linear", "full"), mid_attn="linear", weight_standardize=True,
         time_cond="add", embedding="transformer", time_act="gelu", groups=4, downsample="space_to_depth", init_kernel=1, heads=2, dim_head=4),
    dict(dim=8, dim_mults=(1, 2, 2), channels=2, num_res_blocks=1, attn="none", mid_attn="none", dropout=0.1, groups=2, dim_head=None, heads=2),
]


@pytest.mark.parametrize("config", GRAD_CONFIGS)
def test_gradient_reaches_every_parameter(config):
    net = UNet(**config)
    c = net.channels
    x = torch.randn(4, c, 8, 8)
    loss = (net(x, torch.randint(0, 1000, (4,))) - x).pow(2).mean()
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient reaches {missing}"


def test_config_round_trip():
    net = UNet(**GRAD_CONFIGS[1]).eval()
    cfg = json.loads(json.dumps(net.config))
    assert cfg == net.config
    rebuilt = UNet(**cfg).eval()
    rebuilt.load_state_dict(net.state_dict())
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([7, 700])
    assert torch.equal(net(x, t), rebuilt(x, t))
    s = SimpleUNet(channels=1, down_channels=(8, 16)).eval()
    assert SimpleUNet(**json.loads(json.dumps(s.config))).config == s.config


def test_attention_per_level():
    net = UNet(dim=8, dim_mults=(1, 2, 2), attn=("linear", "none", "full"), mid_attn="none", groups=4, channels=1)
    n_lin = sum(isinstance(m, LinearAttention) for m in net.modules())
    n_full = sum(isinstance(m, Attention) for m in net.modules())
    assert (n_lin, n_full) == (2 + 3, 2 + 3) and net.mid_attn is None  # num_res_blocks down, +1 up
    default = UNet(dim=8, dim_mults=(1, 2), groups=4)
    assert default.config["attn"] == ["none", "full"]
    assert not any(isinstance(m, WeightStandardizedConv2d) for m in default.modules())
    assert any(isinstance(m, WeightStandardizedConv2d) for m in UNet(dim=8, dim_mults=(1,), groups=4, weight_standardize=True).modules())


def test_presets():
    assert set(UNET_PRESETS) >= {"digits", "digits_small", "blog", "ddpm_cifar10"}
    assert unet_preset("digits_small").config == unet_preset("digits", dim=16).config  # the same layout at half the width
    digits = unet_preset("digits")
    assert digits.channels == 1 and digits.downsample_factor <= 8
    assert 0.8e6 < n_params(digits) < 2e6
    assert unet_preset("digits", dim=16).config["dim"] == 16
    assert unet_preset("blog").config["weight_standardize"] is True
    json.dumps(UNET_PRESETS)  # plain data


def _diffusers_ddpm_cifar10():
    from diffusers import UNet2DModel

    # the configuration of google/ddpm-cifar10-32
    return UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None, norm_num_groups=32, flip_sin_to_cos=False, freq_shift=1, downsample_padding=0,
    )


def test_ddpm_cifar10_parameter_count():
    net = unet_preset("ddpm_cifar10")
    n = n_params(net)
    assert abs(n / 35.7e6 - 1) < 0.01  # the paper: 35.7M
    assert abs(n / n_params(_diffusers_ddpm_cifar10()) - 1) < 0.001  # diffusers' port of the same model: 35,746,307
    cfg = net.config
    assert (cfg["dim"], cfg["dim_mults"], cfg["num_res_blocks"], cfg["dropout"]) == (128, [1, 2, 2, 2], 2, 0.1)
    # attention at 16 x 16 for 32 x 32 inputs: level 1 of four
    assert cfg["attn"] == ["none", "full", "none", "none"]
    with torch.no_grad():
        assert net.eval()(torch.randn(1, 3, 32, 32), torch.tensor([999])).shape == (1, 3, 32, 32)


def test_simple_unet():
    net = SimpleUNet()
    assert n_params(net) == 62_438_883
    assert net.downsample_factor == 16
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in net.modules()) == 4
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 16
    small = SimpleUNet(channels=1, out_channels=2, down_channels=(8, 16, 32))
    x = torch.randn(3, 1, 8, 8)
    out = small(x, torch.tensor([1, 2, 3]))
    assert out.shape == (3, 2, 8, 8)
    out.pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in small.parameters())
    with pytest.raises(ValueError, match="divisible by 16"):
        net(torch.randn(1, 3, 8, 8), torch.tensor([0]))
    with pytest.raises(ValueError, match="input channels"):
        small(torch.randn(1, 3, 8, 8), torch.tensor([0]))
