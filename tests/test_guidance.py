"""Tests of class conditioning and classifier-free guidance: the U-Net's label, label dropout in training, the guided
network and sampler (identities at s = 0 and s = 1, one batched forward), old checkpoints, and bad input."""

import numpy as np
import pytest
import torch
from torch import nn

from ddpm_course.checkpoint import load_checkpoint, load_model
from ddpm_course.ddpm import DDPM
from ddpm_course.guidance import GuidedNetwork, class_rows, guide, guided, sample_guided, within_class_spread
from ddpm_course.prediction import x0_eps_from
from ddpm_course.schedules import NoiseSchedule, linear_beta_schedule
from ddpm_course.solvers import sample_with
from ddpm_course.training import TrainConfig, train
from ddpm_course.unet import ToyMLP, UNet, drop_labels

TINY = dict(dim=8, dim_mults=(1, 2), channels=1, num_res_blocks=1, attn=("none", "none"), mid_attn="none", groups=4)


def tiny_model(num_classes=10, prediction="eps", seed=0):
    torch.manual_seed(seed)
    net = UNet(**TINY, num_classes=num_classes).eval()
    return DDPM(net, NoiseSchedule(linear_beta_schedule(100)), sample_shape=(1, 8, 8), prediction=prediction)


class WithLabels(nn.Module):
    "The conditional network with fixed labels (None: the null label), called as (x, t): the reference samplers use it."

    def __init__(self, net, y):
        super().__init__()
        self.net, self.y = net, y

    def forward(self, x, t):
        return self.net(x, t) if self.y is None else self.net(x, t, self.y)


@pytest.mark.parametrize("sampler, steps", [("ddpm", None), ("ddim", 5), ("dpm++", 5), ("heun", 3)])
def test_scale_one_is_conditional_and_scale_zero_unconditional_sampling_exactly(sampler, steps):
    ddpm, y = tiny_model(), torch.tensor([1, 4, 4, 9, 0])
    for scale, labels in [(1.0, y), (0.0, None)]:
        reference = DDPM(WithLabels(ddpm.model, labels), ddpm.schedule, sample_shape=(1, 8, 8))
        assert torch.equal(sample_guided(ddpm, y, scale, sampler, steps, seed=3), sample_with(sampler, reference, 5, steps, seed=3))


def test_other_scales_combine_two_predictions_in_one_batched_call():
    ddpm, y = tiny_model(), torch.tensor([2, 7, 7])
    calls = []
    ddpm.model.register_forward_hook(lambda m, inp, out: calls.append(len(inp[0])))
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([10, 50, 99])
    with torch.no_grad():
        out = GuidedNetwork(ddpm.model, y, 2.5)(x, t)
        assert calls == [6]  # one forward over the doubled batch
        cond, uncond = ddpm.model(x, t, y), ddpm.model(x, t)
    torch.testing.assert_close(out, uncond + 2.5 * (cond - uncond), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(guide(cond, uncond, 2.5), 2.5 * cond - 1.5 * uncond)  # the paper's (1 + w) e_c - w e_u, w = 1.5


def test_guiding_v_or_x0_outputs_guides_the_noise():
    "Guidance combines outputs; for a v- or x0-predicting network that equals combining the implied noise."
    for prediction in ("v", "x0"):
        ddpm, y = tiny_model(prediction=prediction), torch.tensor([3, 5])
        x, t = torch.randn(2, 1, 8, 8), torch.tensor([20, 80])
        with torch.no_grad():
            eps = guided(ddpm, y, 3.0).predict_noise(x, t)
            e_c = x0_eps_from(prediction, ddpm.model(x, t, y), x, t, ddpm.schedule)[1]
            e_u = x0_eps_from(prediction, ddpm.model(x, t), x, t, ddpm.schedule)[1]
        torch.testing.assert_close(eps, guide(e_c, e_u, 3.0), rtol=1e-4, atol=1e-4)


def test_the_class_embedding_is_added_to_the_time_embedding():
    cond = tiny_model().model
    plain = UNet(**TINY).eval()
    plain.load_state_dict({k: v for k, v in cond.state_dict().items() if not k.startswith("class_emb")})
    y = torch.tensor([0, 9, 10])
    plain.time_mlp.register_forward_hook(lambda m, inp, out: out + cond.class_emb.table.weight[y])
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3])
    with torch.no_grad():
        torch.testing.assert_close(cond(x, t, y), plain(x, t))


def test_drop_labels_replaces_the_expected_share():
    torch.manual_seed(0)
    y = torch.randint(0, 10, (100_000,))
    out = drop_labels(y, 0.25, 10)
    share = (out == 10).float().mean().item()
    assert abs(share - 0.25) < 4 * (0.25 * 0.75 / len(y)) ** 0.5
    assert torch.equal(out[out != 10], y[out != 10])
    u = torch.tensor([0.05, 0.5, 0.09, 0.11])
    assert drop_labels(torch.tensor([1, 2, 3, 4]), 0.1, 10, u).tolist() == [10, 2, 10, 4]


def test_training_shows_the_null_label_with_probability_p_uncond(tmp_path):
    "A conditional run passes the data's labels to the network, dropped to the null label at rate p_uncond."
    seen = []
    net = ToyMLP(dim=2, hidden=16, depth=1, num_classes=3)
    net.register_forward_hook(lambda m, inp, out: seen.append(inp[2].clone()))
    points, labels = torch.randn(600, 2), torch.randint(0, 3, (600,))
    cfg = TrainConfig(dataset=None, unet=None, conditional=True, p_uncond=0.3, steps=8, batch_size=500, warmup=1,
                      log_every=8, sample_every=8, checkpoint_every=8, timesteps=50)
    train(cfg, tmp_path, progress=False, data=torch.utils.data.TensorDataset(points, labels), net=net)
    y = torch.cat(seen)
    assert len(y) == 8 * 500 and set(y.unique().tolist()) == {0, 1, 2, 3}
    assert abs((y == 3).float().mean().item() - 0.3) < 4 * (0.3 * 0.7 / len(y)) ** 0.5
    recorded = load_checkpoint(tmp_path).config
    assert recorded["train"]["conditional"] and recorded["train"]["p_uncond"] == 0.3
    assert recorded["net"]["config"]["num_classes"] == 3


def test_a_conditional_run_resumes_exactly(tmp_path):
    # a constant rate after warm-up: a cosine would be stretched when the second run raises steps
    cfg = lambda steps: TrainConfig(conditional=True, steps=steps, batch_size=16, timesteps=40, warmup=2, log_every=2, lr_decay="constant",
                                    sample_every=100, checkpoint_every=4, n_samples=2, seed=2,
                                    unet_overrides=dict(dim=8, dim_mults=[1, 2], attn=["none", "none"], mid_attn="none", groups=4))
    straight = train(cfg(8), tmp_path / "a", progress=False)
    train(cfg(4), tmp_path / "b", progress=False)
    resumed = train(cfg(8), tmp_path / "b", progress=False)
    assert resumed.resumed_from == 4 and resumed.ddpm.model.num_classes == 10
    for k, v in straight.ddpm.model.state_dict().items():
        torch.testing.assert_close(v, resumed.ddpm.model.state_dict()[k], rtol=1e-6, atol=1e-7)


def test_an_unconditional_checkpoint_loads_unchanged():
    ddpm = load_model("pretrained:digits")
    assert ddpm.model.num_classes is None and ddpm.model.class_emb is None
    assert not any(k.startswith("class_emb") for k in ddpm.model.state_dict())
    with torch.no_grad():
        assert ddpm.predict_noise(torch.randn(2, 1, 8, 8), 500).shape == (2, 1, 8, 8)


def test_bad_input_is_refused_with_a_clear_message(tmp_path):
    ddpm = tiny_model()
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.9"):
        sample_guided(ddpm, [3, 10], 2.0)
    with pytest.raises(ValueError, match="class-conditional model"):
        sample_guided(tiny_model(num_classes=None), [3], 2.0)
    with pytest.raises(ValueError, match="guidance scale"):
        sample_guided(ddpm, [3], float("nan"))
    with pytest.raises(ValueError, match="integer tensor"):
        sample_guided(ddpm, torch.tensor([1.0]), 2.0)
    with pytest.raises(ValueError, match="4 items for 2 labels"):
        GuidedNetwork(ddpm.model, [1, 2], 2.0)(torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="unconditional"):
        tiny_model(num_classes=None).model(torch.randn(1, 1, 8, 8), torch.zeros(1, dtype=torch.long), torch.tensor([1]))
    with pytest.raises(ValueError, match="without labels"):  # labels missing
        train(TrainConfig(conditional=True, steps=1, dataset=None), tmp_path / "a", progress=False, data=torch.randn(50, 1, 8, 8))
    with pytest.raises(ValueError, match="num_classes=10, got num_classes=None"):  # a network that cannot take the labels
        train(TrainConfig(conditional=True, steps=1), tmp_path / "b", progress=False, net=UNet(**TINY))
    with pytest.raises(ValueError, match="p_uncond"):
        TrainConfig(p_uncond=1.0)


def test_class_rows_and_spread():
    assert class_rows(3, 7).tolist() == [0, 0, 0, 1, 1, 2, 2] and class_rows(10, 80).bincount().tolist() == [8] * 10
    f = np.array([[0.0, 0], [3, 4], [0, 0], [1, 0], [9, 9]])
    spread = within_class_spread(f, np.array([0, 0, 1, 1, 2]), 4)
    assert spread[:2].tolist() == [5.0, 1.0] and np.isnan(spread[2:]).all()  # one item or none: no pairs
