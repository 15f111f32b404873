"""Tests of ddpm_course.checkpoint: the one format (round trip, version, fields), atomic writes, the registry,
pretrained names, the run folder's lock."""

import copy
import errno
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
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ddpm_course.checkpoint import (FORMAT_VERSION, CheckpointError, DiskFullError, RunLockedError, atomic_write,
                                    checkpoint_step, load_checkpoint, load_model, load_network, network_name,
                                    register_network, resolve_checkpoint, run_lock, save_checkpoint, save_network)
from ddpm_course.ddpm import DDPM
from ddpm_course.schedules import NoiseSchedule, linear_beta_schedule
from ddpm_course.training import TrainConfig, build_ddpm, ema_update
from ddpm_course.unet import SimpleUNet, UNet

TINY = dict(dim=8, dim_mults=[1, 2], attn=["none", "none"], mid_attn="none", groups=4)


def tiny_cfg(**kw):
    return TrainConfig(**{**dict(unet_overrides=TINY, timesteps=40, seed=1), **kw})


def small_ddpm(seed=0, dim=8):
    torch.manual_seed(seed)
    return build_ddpm(tiny_cfg(unet_overrides={**TINY, "dim": dim}), (1, 8, 8))


def trained_parts(steps=3):
    "A tiny DDPM, its EMA and an AdamW with state after a few real steps."
    ddpm = small_ddpm()
    ema = copy.deepcopy(ddpm.model)
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

    def dies_halfway(self, data):
        real_write_bytes(self, data[: len(data) // 2])
        raise KeyboardInterrupt

    real_write_bytes = Path.write_bytes
    monkeypatch.setattr(Path, "write_bytes", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(saved, ddpm, 8, ema=ema, optimizer=opt, train_config=tiny_cfg())
    assert not list(saved.glob("*.tmp"))
    assert load_checkpoint(saved).step == 7


@pytest.mark.filterwarnings("ignore:config.json says step")  # killed between the two renames: expected, and harmless
def test_a_process_killed_while_checkpointing_leaves_a_loadable_checkpoint(tmp_path):
    "SIGKILL a process that rewrites its checkpoint in a loop; whatever is on disk must load."
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_checkpoint import trained_parts, tiny_cfg
        from ddpm_course.checkpoint import save_checkpoint
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


def rewrite_metadata(folder: Path, change) -> None:
    "Edit the metadata inside model.safetensors, as another program might, and drop config.json."
    f = folder / "model.safetensors"
    tensors = load_file(str(f))
    with safe_open(str(f), "pt") as h:
        meta = h.metadata()
    change(meta)
    save_file(tensors, str(f), meta)
    (folder / "config.json").unlink(missing_ok=True)


def edit_config(change):
    def edit(meta):
        cfg = json.loads(meta["config"])
        change(cfg)
        meta["config"] = json.dumps(cfg)
    return edit


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, 0, "1", None])
def test_an_unknown_or_newer_format_version_is_refused(saved, version):
    rewrite_metadata(saved, edit_config(lambda c: c.update(version=version)))
    with pytest.raises(CheckpointError, match=r"format version .*and older"):
        load_model(saved)


@pytest.mark.parametrize("field", ["version", "net", "step", "loss_kind", "sample_shape"])
def test_a_missing_config_field_is_named(saved, field):
    rewrite_metadata(saved, edit_config(lambda c: c.pop(field)))
    with pytest.raises(CheckpointError, match=f"lacks the field 'config.{field}'"):
        load_model(saved)


@pytest.mark.parametrize("field", ["config", "step"])
def test_missing_metadata_is_named(saved, field):
    rewrite_metadata(saved, lambda meta: meta.pop(field))
    with pytest.raises(CheckpointError, match=f"lacks the field '{field}'"):
        load_checkpoint(saved)


def test_the_cli_reports_a_missing_config_in_one_line(saved, capsys):
    from ddpm_course.cli import main

    rewrite_metadata(saved, lambda meta: meta.pop("config"))
    assert main(["sample", "--checkpoint", str(saved), "--out", str(saved / "s"), "--n", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ddpm-course: error:") and "lacks the field 'config'" in err and "\n" not in err


class MyUNet(UNet):
    "A user's subclass: saved as a UNet."


@pytest.mark.parametrize("make", [lambda: MyUNet(channels=1, **TINY), lambda: SimpleUNet(channels=1, down_channels=(8, 16), time_emb_dim=8)])
def test_subclasses_and_the_simple_unet_round_trip(tmp_path, make):
    torch.manual_seed(0)
    net = make()
    ddpm = DDPM(net, NoiseSchedule(linear_beta_schedule(20)), "mse", (1, 8, 8))
    save_checkpoint(tmp_path, ddpm, 1)
    back = load_model(tmp_path)
    assert isinstance(back.model, UNet if isinstance(net, UNet) else SimpleUNet)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 7])
    with torch.no_grad():
        torch.testing.assert_close(back.model(x, t), net.eval()(x, t))


def test_networks_are_found_by_registry_not_by_name(tmp_path):
    class UNet2(torch.nn.Module):  # a look-alike name, not registered
        config = {}
    with pytest.raises(CheckpointError, match="not a registered network"):
        network_name(UNet2())

    class Tiny(torch.nn.Module):
        def __init__(self, n=3):
            super().__init__()
            self.config, self.lin = dict(n=n), torch.nn.Linear(n, n)

    with pytest.raises(CheckpointError, match="not a registered network"):
        save_network(Tiny(), tmp_path)
    register_network(Tiny, "test_tiny")
    net = Tiny(4)
    save_network(net, tmp_path, info={"why": "a test"})
    back = load_network(tmp_path)
    assert isinstance(back, Tiny) and torch.equal(back.lin.weight, net.lin.weight)
    with pytest.raises(CheckpointError, match="class Tiny; expected UNet"):
        load_network(tmp_path, UNet)


@pytest.mark.parametrize("name", ["../pretrained/digits", "../../somewhere", "/etc", "digits/../digits", ""])
def test_pretrained_takes_a_name_not_a_path(name):
    with pytest.raises(CheckpointError, match="takes the name of a shipped model"):
        resolve_checkpoint("pretrained:" + name)
    with pytest.raises(CheckpointError, match="no pretrained model 'cifar10'"):
        resolve_checkpoint("pretrained:cifar10")
    assert resolve_checkpoint("pretrained:digits").name == "digits"


def test_a_full_disk_keeps_the_previous_file(saved, monkeypatch):
    ddpm, ema, opt = trained_parts(2)

    def disk_full(self, data):
        real_write_bytes(self, data[:100])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    real_write_bytes = Path.write_bytes
    monkeypatch.setattr(Path, "write_bytes", disk_full)
    with pytest.raises(DiskFullError, match="disk is full.*model.safetensors.*intact"):
        save_checkpoint(saved, ddpm, 8, ema=ema, optimizer=opt)
    monkeypatch.undo()
    assert not list(saved.glob("*.tmp"))
    assert load_checkpoint(saved).step == checkpoint_step(saved) == 7
    with pytest.raises(OSError, match="Permission"):  # other OS errors stay what they are
        atomic_write(saved / "x", lambda p: (_ for _ in ()).throw(PermissionError(errno.EACCES, "Permission denied")))


HOLD_LOCK = """
import sys, time
from ddpm_course.checkpoint import run_lock
with run_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_run_folder_has_one_writer(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"in use by another training process \\(pid {proc.pid}\\)"):
            with run_lock(tmp_path):
                pass
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    with run_lock(tmp_path) as lock:  # the killed holder's lock is taken over
        assert lock.read_text().strip() == str(os.getpid())
    assert not lock.exists()


def test_a_stale_lock_file_is_taken_over(tmp_path):
    (tmp_path / "train.lock").write_text("999999999\n")  # left behind by a process that no longer exists
    with run_lock(tmp_path) as lock:
        assert lock.read_text().strip() == str(os.getpid())
