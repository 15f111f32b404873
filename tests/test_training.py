"""Tests of ddpm_course.training: the loop's outputs, exact resume, the run folder's lock, a full disk, a NaN loss."""

import csv
import dataclasses
import json
from pathlib import Path

import pytest
import torch

import ddpm_course.training as training
from ddpm_course.checkpoint import CheckpointError, load_checkpoint
from ddpm_course.ddpm import DDPM
from ddpm_course.training import NonFiniteLossError, TrainConfig, ema_update, lr_at, train

TINY = dict(dim=8, dim_mults=[1, 2], attn=["none", "none"], mid_attn="none", groups=4)


def tiny_cfg(**kw):
    "A tiny run; a constant learning rate after warm-up, so that a run raised from 6 to 12 steps equals a straight one."
    base = dict(steps=12, batch_size=16, unet_overrides=TINY, timesteps=40, log_every=3, sample_every=6,
                checkpoint_every=6, n_samples=4, warmup=4, seed=1, lr_decay="constant")
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    "One complete tiny run of 12 steps, shared by several tests."
    out = tmp_path_factory.mktemp("straight")
    return train(tiny_cfg(), out, progress=False)


def log_rows(out):
    with open(Path(out) / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_a_run_writes_its_files_and_the_loss_falls(straight_run, tmp_path):
    out = straight_run.out_dir
    for name in ("model.safetensors", "config.json", "log.csv", "loss.png", "samples.png"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.tmp"))
    rows = log_rows(out)
    assert [int(r["step"]) for r in rows] == [3, 6, 9, 12]
    assert json.loads((out / "config.json").read_text())["step"] == 12
    assert straight_run.step == 12 and straight_run.resumed_from is None
    res = train(tiny_cfg(steps=60, lr=3e-3, log_every=10, sample_every=60, checkpoint_every=60), tmp_path, progress=False)
    losses = [float(r["loss"]) for r in log_rows(tmp_path)]
    assert losses[-1] < 0.75 * losses[0]
    assert res.ddpm.sample(2, seed=0).shape == (2, 1, 8, 8)


def test_resume_gives_the_same_weights_as_a_straight_run(straight_run, tmp_path):
    first = train(tiny_cfg(steps=6), tmp_path, progress=False)
    assert first.step == 6 and first.resumed_from is None
    second = train(tiny_cfg(), tmp_path, progress=False)
    assert second.resumed_from == 6 and second.step == 12
    a, b = load_checkpoint(straight_run.out_dir), load_checkpoint(tmp_path)
    for group in ("model", "ema"):
        assert a.tensors[group].keys() == b.tensors[group].keys()
        for k in a.tensors[group]:
            torch.testing.assert_close(a.tensors[group][k], b.tensors[group][k], rtol=1e-6, atol=1e-7)
    for i, state in a.optimizer["state"].items():
        for k, v in state.items():
            torch.testing.assert_close(v, b.optimizer["state"][i][k], rtol=1e-6, atol=1e-7)
    assert a.optimizer["param_groups"] == b.optimizer["param_groups"]  # same learning rate after warm-up
    drop = lambda rows: [{k: v for k, v in r.items() if k != "img_per_s"} for r in rows]
    assert drop(log_rows(tmp_path)) == drop(log_rows(straight_run.out_dir))


def test_rerunning_a_finished_run_does_nothing(straight_run, tmp_path):
    before = load_checkpoint(straight_run.out_dir).tensors["ema"]
    res = train(tiny_cfg(), straight_run.out_dir, progress=False)
    assert res.resumed_from == 12 and res.step == 12
    for k, v in res.ddpm.model.state_dict().items():
        assert torch.equal(v, before[k])


def test_resuming_with_other_settings_is_refused(straight_run):
    with pytest.raises(CheckpointError, match="lr"):
        train(tiny_cfg(lr=5e-4), straight_run.out_dir, progress=False)
    with pytest.raises(CheckpointError, match="unet_overrides"):
        train(tiny_cfg(unet_overrides={**TINY, "dim": 16}), straight_run.out_dir, progress=False)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_loss = DDPM.loss

    def loss_goes_nan(self, x0, *args, **kwargs):
        calls["n"] += 1
        loss = real_loss(self, x0, *args, **kwargs)
        return loss * float("nan") if calls["n"] == 9 else loss

    monkeypatch.setattr(DDPM, "loss", loss_goes_nan)
    with pytest.raises(NonFiniteLossError, match=r"nan at step 9.*last good checkpoint \(step 6\)"):
        train(tiny_cfg(), tmp_path, progress=False)
    assert load_checkpoint(tmp_path).step == 6


def test_train_config_rejects_bad_values():
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="unet"):
        TrainConfig(unet="huge")
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="exponential")
    with pytest.raises(ValueError, match="loss"):
        TrainConfig(loss="l3")
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="amp"):
        TrainConfig(amp="fp8")
    with pytest.raises(ValueError, match=r"lr_decay must be one of \('constant', 'cosine'\), got 'linear'"):
        TrainConfig(lr_decay="linear")


def test_mixed_precision_is_refused_on_the_cpu(tmp_path):
    with pytest.raises(ValueError, match="needs a CUDA device"):
        train(tiny_cfg(amp="bf16", device="cpu"), tmp_path, progress=False)
    assert training._amp_dtype(tiny_cfg(device="cpu"), torch.device("cpu")) is None


@pytest.mark.parametrize("amp,bf16_ok,want", [("auto", True, torch.bfloat16), ("auto", False, torch.float16),
                                              ("bf16", False, torch.bfloat16), ("fp16", True, torch.float16),
                                              ("none", True, None)])
def test_mixed_precision_choice_on_cuda(monkeypatch, amp, bf16_ok, want):
    "Which autocast dtype a CUDA run gets (decided without touching a GPU)."
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_ok)
    assert training._amp_dtype(tiny_cfg(amp=amp), torch.device("cuda")) == want


def test_config_is_plain_data_that_round_trips_through_json():
    cfg = tiny_cfg()
    assert TrainConfig(**json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg


def test_warmup_and_ema():
    cfg = TrainConfig(lr=1e-3, warmup=100, steps=5000, lr_decay="constant")
    assert lr_at(cfg, 1) == pytest.approx(1e-5) and lr_at(cfg, 50) == pytest.approx(5e-4)
    assert lr_at(cfg, 100) == lr_at(cfg, 5000) == 1e-3
    assert lr_at(TrainConfig(warmup=0, lr_decay="constant"), 1) == TrainConfig().lr
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    want = [0.9 * pa + 0.1 * pb for pa, pb in zip(a.parameters(), b.parameters())]
    ema_update(a, b, 0.9)
    for got, w in zip(a.parameters(), want):
        torch.testing.assert_close(got, w)


@pytest.mark.parametrize("every_s,want_steps", [(0.0, [1, 2, 3, 4, 5, 6]), (3600.0, [6])])
def test_progress_without_a_terminal_is_short_lines(tmp_path, capsys, monkeypatch, every_s, want_steps):
    "stderr is not a terminal here (captured): no tqdm redraws, a line at most every PROGRESS_EVERY_S and at the end."
    monkeypatch.setattr(training, "PROGRESS_EVERY_S", every_s)
    train(tiny_cfg(steps=6, sample_every=100, checkpoint_every=100), tmp_path)
    err = capsys.readouterr().err
    assert "\r" not in err and "|" not in err
    lines = err.strip().splitlines()
    assert [line.split(",")[0] for line in lines] == [f"training: step {k}/6" for k in want_steps]
    last_logged = float(log_rows(tmp_path)[-1]["loss"])
    assert f", loss {last_logged:.4f}," in lines[-1] and lines[-1].endswith("steps/s")  # the final line has the final loss


@pytest.mark.parametrize("warmup, steps", [(100, 1000), (0, 37), (200, 1750)])
def test_cosine_decay_follows_pytorchs_cosine_annealing_after_the_warmup(warmup, steps):
    cfg = TrainConfig(lr=3e-3, warmup=warmup, steps=steps, lr_decay="cosine")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps - warmup)
    want = []
    for _ in range(warmup, steps + 1):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    got = [lr_at(cfg, k) for k in range(max(warmup, 1), steps + 1)]
    assert got == pytest.approx(want[len(want) - len(got):], abs=1e-12)
    assert lr_at(cfg, steps) == pytest.approx(0, abs=1e-15) and all(lr_at(cfg, k) == cfg.lr * k / warmup for k in range(1, warmup))


def test_a_checkpoint_from_before_lr_decay_resumes_only_as_constant(tmp_path):
    "Runs saved before the setting existed trained at a constant rate; resuming them with the cosine would change the run."
    saved = json.loads(json.dumps(dataclasses.asdict(tiny_cfg())))
    del saved["lr_decay"]
    training._check_resumable(saved, tiny_cfg(lr_decay="constant"), tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="lr_decay: 'constant' -> 'cosine'"):
        training._check_resumable(saved, tiny_cfg(lr_decay="cosine"), tmp_path / "model.safetensors")


def test_train_on_your_own_tensors_and_network(tmp_path):
    "The README's example: a tensor of images in [-1, 1] and a network of your own, in a few lines."
    from ddpm_course import TrainConfig as TopTrainConfig, UNet, train as top_train

    torch.manual_seed(0)
    x = torch.rand(64, 1, 8, 8) * 2 - 1  # your images, N x C x H x W in [-1, 1]
    net = UNet(8, dim_mults=(1, 2), channels=1, attn=("none", "none"), mid_attn="none", groups=4)
    cfg = TopTrainConfig(steps=6, batch_size=16, timesteps=40, log_every=3, sample_every=6, checkpoint_every=3, n_samples=4)
    result = top_train(cfg, tmp_path, data=x, net=net, progress=False)
    assert result.step == 6 and result.ddpm.sample(2, seed=0).shape == (2, 1, 8, 8)
    saved = load_checkpoint(tmp_path).config["train"]
    assert saved["dataset"] is None and saved["unet"] is None and saved["steps"] == 6
    again = train(dataclasses.replace(cfg, steps=9), tmp_path, data=x, net=UNet(**net.config), progress=False)
    assert again.resumed_from == 6 and again.step == 9


def test_train_on_a_dataset_of_points_with_the_toy_mlp(tmp_path):
    from torch.utils.data import Dataset

    from ddpm_course.unet import ToyMLP

    class Ring(Dataset):
        def __len__(self):
            return 40

        def __getitem__(self, i):
            a = torch.tensor(2 * torch.pi * i / 40)
            return torch.stack([a.cos(), a.sin()]), 0  # (item, label): the label is ignored

    result = train(tiny_cfg(steps=4, checkpoint_every=4), tmp_path, data=Ring(), net=ToyMLP(hidden=16, depth=1), progress=False)
    assert result.ddpm.sample_shape == (2,) and not (tmp_path / "samples.png").exists()


def test_bad_own_data_and_unsaveable_networks_fail_at_once(tmp_path):
    with pytest.raises(ValueError, match=r"expected a float tensor \[N, C, H, W\]"):
        train(tiny_cfg(), tmp_path, data=torch.zeros(10, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="data must be a torch Dataset or a tensor"):
        train(tiny_cfg(), tmp_path, data=[1, 2, 3], progress=False)
    with pytest.raises(CheckpointError, match="not a registered network"):
        train(tiny_cfg(), tmp_path, data=torch.zeros(32, 1, 8, 8), net=torch.nn.Conv2d(1, 1, 1), progress=False)
    with pytest.raises(ValueError, match="no data was passed"):
        train(tiny_cfg(dataset=None), tmp_path, progress=False)
    assert not (tmp_path / "model.safetensors").exists()


def test_ema_decay_warms_up_to_its_cap():
    cfg = TrainConfig(ema_decay=0.999)
    assert training.ema_decay_at(cfg, 0) == pytest.approx(0.1)  # (1 + 0) / (10 + 0): the first update keeps 90% of the model
    assert training.ema_decay_at(cfg, 90) == pytest.approx(91 / 100)
    k = 8991  # (1 + k) / (10 + k) first reaches 0.999 at k = 8990
    assert training.ema_decay_at(cfg, k - 2) < 0.999 and training.ema_decay_at(cfg, k) == 0.999
    assert training.ema_decay_at(cfg, 10**6) == 0.999
    assert training.ema_decay_at(TrainConfig(ema_decay=0.0), 5) == 0.0
    decays = [training.ema_decay_at(cfg, s) for s in range(0, 20000, 7)]
    assert decays == sorted(decays)  # never decreases


def test_step_batches_cross_epochs_the_same_when_resumed():
    sampler = training.StepBatchSampler(40, 16, seed=3)  # 2 batches per epoch: steps 1-2, 3-4, ...
    straight = [next(it) for it in [iter(sampler)] for _ in range(9)]
    assert all(sorted(straight[2 * e] + straight[2 * e + 1]) == sorted(set(straight[2 * e] + straight[2 * e + 1]))
               for e in range(4))  # no item twice within an epoch
    assert straight[0] != straight[2]  # each epoch has its own order
    for start in (1, 2, 5):
        resumed = iter(training.StepBatchSampler(40, 16, seed=3, start=start))
        assert [next(resumed) for _ in range(9 - start)] == straight[start:]


def test_resume_across_epoch_boundaries_matches_a_straight_run(tmp_path):
    "40 items, batch 16: an epoch is 2 steps, so stopping at step 3 and resuming to 7 crosses three epoch starts."
    torch.manual_seed(0)
    x = torch.rand(40, 1, 8, 8) * 2 - 1
    cfg = tiny_cfg(steps=7, checkpoint_every=3, log_every=1, sample_every=100)
    train(cfg, tmp_path / "straight", data=x, progress=False)
    train(dataclasses.replace(cfg, steps=3), tmp_path / "resumed", data=x, progress=False)
    assert train(cfg, tmp_path / "resumed", data=x, progress=False).resumed_from == 3
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "resumed")
    for group in ("model", "ema"):
        for k in a.tensors[group]:
            torch.testing.assert_close(a.tensors[group][k], b.tensors[group][k], rtol=1e-6, atol=1e-7)
    drop = lambda rows: [{k: v for k, v in r.items() if k != "img_per_s"} for r in rows]
    assert drop(log_rows(tmp_path / "resumed")) == drop(log_rows(tmp_path / "straight"))


def test_the_device_can_be_passed_explicitly(tmp_path):
    "Every path that picks a device, given one: training, loading, sampling (on this machine's CPU)."
    from ddpm_course.checkpoint import load_model
    from ddpm_course.sampling import sample_ddim

    cpu = torch.device("cpu")
    assert training._amp_dtype(tiny_cfg(device="cpu", amp="none"), cpu) is None
    result = train(tiny_cfg(device="cpu", amp="none", steps=3, checkpoint_every=3, sample_every=3), tmp_path, progress=False)
    assert result.ddpm.device == cpu
    model = load_model(tmp_path, device=cpu)
    assert next(model.parameters()).device == cpu and sample_ddim(model, 2, steps=3, seed=0).device == cpu


def test_the_optimiser_is_fused_adamw_and_its_checkpoint_says_so(straight_run):
    "On a CPU the loop steps PyTorch's fused AdamW (one kernel for all parameters); the checkpoint says so."
    groups = load_checkpoint(straight_run.out_dir).optimizer["param_groups"]
    assert [g["fused"] for g in groups] == [True]
    assert groups[0]["lr"] == pytest.approx(tiny_cfg().lr)
