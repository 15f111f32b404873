"""Tests of ddpm_course.training: the loop's outputs, exact resume, checkpoints (round trip, atomicity, bad files)."""

import csv
import dataclasses
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ddpm_course.training as training
from ddpm_course.ddpm import DDPM
from ddpm_course.training import (CheckpointError, NonFiniteLossError, TrainConfig, ema_update, load_checkpoint,
                                  load_model, lr_at, save_checkpoint, train)

TINY = dict(dim=8, dim_mults=[1, 2], attn=["none", "none"], mid_attn="none", groups=4)


def tiny_cfg(**kw):
    base = dict(steps=12, batch_size=16, unet_overrides=TINY, timesteps=40, log_every=3, sample_every=6,
                checkpoint_every=6, n_samples=4, warmup=4, seed=1)
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


def small_ddpm(seed=0, dim=8):
    torch.manual_seed(seed)
    return training.build_ddpm(tiny_cfg(unet_overrides={**TINY, "dim": dim}), (1, 8, 8))


def trained_parts(steps=3):
    "A tiny DDPM, its EMA and an AdamW with state after a few real steps."
    ddpm = small_ddpm()
    ema = training.copy.deepcopy(ddpm.model)
    opt = torch.optim.AdamW(ddpm.model.parameters(), lr=1e-3, weight_decay=0.01)
    for _ in range(steps):
        loss = ddpm.loss(torch.rand(4, 1, 8, 8) * 2 - 1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema_update(ema, ddpm.model, 0.9)
    return ddpm, ema, opt


def test_save_load_round_trip(tmp_path):
    ddpm, ema, opt = trained_parts()
    path = save_checkpoint(tmp_path, ddpm, 3, ema=ema, optimizer=opt, train_config=tiny_cfg())
    assert path == tmp_path / "model.safetensors"
    keys = load_file(path).keys()
    assert {k.split(".")[0] for k in keys} == {"model", "ema", "optim", "schedule", "rng"}
    ck = load_checkpoint(tmp_path)
    assert ck.step == 3 and ck.config["train"]["seed"] == 1 and ck.config["net"]["class"] == "UNet"
    for k, v in ddpm.model.state_dict().items():
        assert torch.equal(ck.tensors["model"][k], v)
    for k, v in ema.state_dict().items():
        assert torch.equal(ck.tensors["ema"][k], v)
    assert torch.equal(ck.tensors["rng"]["torch"], torch.get_rng_state())
    want = opt.state_dict()
    opt2 = torch.optim.AdamW(small_ddpm(seed=5).model.parameters(), lr=0.5)
    opt2.load_state_dict(ck.optimizer)
    got = opt2.state_dict()
    assert json.loads(json.dumps(want["param_groups"])) == got["param_groups"]
    for i, state in want["state"].items():
        for k, v in state.items():
            assert torch.equal(got["state"][i][k], v), (i, k)
    model = load_model(tmp_path)
    assert isinstance(model, DDPM) and not model.training and model.sample_shape == (1, 8, 8)
    for k, v in ema.state_dict().items():
        assert torch.equal(model.model.state_dict()[k], v)
    for k, v in ddpm.schedule.state_dict().items():
        assert torch.equal(model.schedule.state_dict()[k], v)
    raw = load_model(tmp_path / "model.safetensors", ema=False)
    for k, v in ddpm.model.state_dict().items():
        assert torch.equal(raw.model.state_dict()[k], v)


def test_nothing_is_unpickled(tmp_path, monkeypatch):
    ddpm, ema, opt = trained_parts(1)
    save_checkpoint(tmp_path, ddpm, 1, ema=ema, optimizer=opt, train_config=tiny_cfg())

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint must not be unpickled")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    load_model(tmp_path)
    load_checkpoint(tmp_path)


@pytest.fixture
def saved(tmp_path):
    ddpm, ema, opt = trained_parts(1)
    save_checkpoint(tmp_path, ddpm, 7, ema=ema, optimizer=opt, train_config=tiny_cfg())
    return tmp_path


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path)  # an empty folder


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.01])
def test_truncated_checkpoint(saved, keep):
    f = saved / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(saved)


def test_garbage_and_foreign_safetensors(saved, tmp_path_factory):
    other = tmp_path_factory.mktemp("foreign")
    save_file({"weight": torch.zeros(3)}, str(other / "model.safetensors"))
    with pytest.raises(CheckpointError, match="not a ddpm-course checkpoint"):
        load_model(other)
    (other / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(other)


def test_truncated_or_foreign_config_json(saved):
    cfg_file = saved / "config.json"
    text = cfg_file.read_text()
    cfg_file.write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(saved)
    cfg = json.loads(text)
    cfg["net"]["config"]["dim"] = 16
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="different runs"):
        load_model(saved)


def test_checkpoint_that_does_not_fit_its_network(saved):
    "Weights of one network under the config of another: a clear error naming the mismatch, not a crash."
    f = saved / "model.safetensors"
    tensors = load_file(str(f))
    from safetensors import safe_open
    with safe_open(str(f), "pt") as h:
        meta = h.metadata()
    cfg = json.loads(meta["config"])
    cfg["net"]["config"]["dim"] = 16
    meta["config"] = json.dumps(cfg)
    save_file(tensors, str(f), meta)
    (saved / "config.json").unlink()
    with pytest.raises(CheckpointError, match="do not fit the model"):
        load_model(saved)


def test_a_stale_config_json_step_warns_and_the_weights_win(saved):
    cfg_file = saved / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["step"] = 6  # as if the run died between renaming model.safetensors and config.json
    cfg_file.write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="step 6"):
        assert load_checkpoint(saved).step == 7


def test_a_write_interrupted_midway_leaves_the_previous_checkpoint(saved, monkeypatch):
    ddpm, ema, opt = trained_parts(2)

    def dies_halfway(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "save_file", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(saved, ddpm, 8, ema=ema, optimizer=opt, train_config=tiny_cfg())
    assert not list(saved.glob("*.tmp"))
    assert load_checkpoint(saved).step == 7


def test_a_process_killed_while_checkpointing_leaves_a_loadable_checkpoint(tmp_path):
    "SIGKILL a process that rewrites its checkpoint in a loop; whatever is on disk must load."
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_training import trained_parts, tiny_cfg
        from ddpm_course.training import save_checkpoint
        ddpm, ema, opt = trained_parts(1)
        step = 0
        while True:
            step += 1
            save_checkpoint({str(tmp_path)!r}, ddpm, step, ema=ema, optimizer=opt, train_config=tiny_cfg())
            print(step, flush=True)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        for _ in range(3):  # let it write a few checkpoints, then kill it at an arbitrary moment
            assert proc.stdout.readline(), "the checkpointing process died"
        time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert load_checkpoint(tmp_path).step >= 3
    load_model(tmp_path)


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
    cfg = TrainConfig(lr=1e-3, warmup=100)
    assert lr_at(cfg, 1) == pytest.approx(1e-5) and lr_at(cfg, 50) == pytest.approx(5e-4)
    assert lr_at(cfg, 100) == lr_at(cfg, 5000) == 1e-3
    assert lr_at(TrainConfig(warmup=0), 1) == TrainConfig().lr
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
