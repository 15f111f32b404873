"""Tests of ddpm_course.distributed and of data-parallel training: two gloo processes under torchrun reach the weights
of one process on the same global batches, only rank 0 writes, a killed rank is restarted and the run ends as if
uninterrupted, and a run may resume on another number of processes unless its network has dropout."""

import csv
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ddpm_course.distributed import DistContext, data_parallel, has_dropout, resolve_device
from ddpm_course.training import CheckpointError, StepBatchSampler, TrainConfig, load_checkpoint, train
from ddpm_course.unet import unet_preset

TINY = dict(dim=8, dim_mults=[1, 2], attn=["none", "none"], mid_attn="none", groups=4)
CLI_ARGS = ["--steps", "8", "--batch-size", "16", "--timesteps", "50", "--log-every", "2", "--sample-every", "8",
            "--checkpoint-every", "4", "--n-samples", "4", "--warmup", "4", "--lr", "1e-3", "--seed", "3", "--device", "cpu", "--no-progress"]

# Run under torchrun: train the TrainConfig in argv[2] (JSON) into argv[1]; record every checkpoint write as "rank step"
# in argv[1]/writes.txt; with argv[3] = K, rank 1 kills itself at step K on torchrun's first attempt.
SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    import torch
    import ddpm_course.training as training

    torch.set_num_threads(1)
    out, cfg, kill_at = sys.argv[1], training.TrainConfig(**json.loads(sys.argv[2])), int(sys.argv[3])
    rank, first_attempt = os.environ["RANK"], os.environ["TORCHELASTIC_RESTART_COUNT"] == "0"
    save, lr_at = training.save_checkpoint, training.lr_at

    def recorded_save(out_dir, ddpm, step, **kw):
        with open(os.path.join(out, "writes.txt"), "a") as f:
            f.write(f"{rank} {step}\\n")
        return save(out_dir, ddpm, step, **kw)

    def lr_or_die(cfg, step):
        if step == kill_at and rank == "1" and first_attempt:
            with open(os.path.join(out, "killed.txt"), "w") as f:
                f.write(f"rank 1 killed at step {step}")
            os.kill(os.getpid(), signal.SIGKILL)
        return lr_at(cfg, step)

    training.save_checkpoint, training.lr_at = recorded_save, lr_or_die
    training.train(cfg, out, progress=False)
""")
# torch 2.14's torchrun keeps its rendezvous store across restarts, and a restarted process group may then read the
# addresses of the processes that died and hang (pytorch/pytorch#135712); with this setting every attempt gets a new store.
RESTARTABLE = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def torchrun(*args: str, max_restarts: int = 0) -> str:
    "Run `args` on two gloo processes under torchrun; their stdout."
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           f"--max-restarts={max_restarts}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **RESTARTABLE}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def weights(out: Path) -> dict[str, torch.Tensor]:
    ck = load_checkpoint(out)
    return {f"{g}.{k}": v for g in ("model", "ema") for k, v in ck.tensors[g].items()}


def assert_same_weights(a: Path, b: Path, tol: float) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst <= tol, f"weights differ by up to {worst:.2e}"


def log_rows(out: Path) -> list[dict]:
    with open(out / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    "8 steps of `ddpm-course train` on two processes, the same run on one, and on two with rank 1 killed at step 6."
    tmp = tmp_path_factory.mktemp("ddp")
    one, two, killed = tmp / "one", tmp / "two", tmp / "killed"
    stdout = torchrun("-m", "ddpm_course.cli", "train", "--out", str(two), *CLI_ARGS)
    cfg = TrainConfig(**load_checkpoint(two).config["train"])  # what the command line made of its options
    train(cfg, one, progress=False)
    (tmp / "run.py").write_text(SCRIPT)
    torchrun(str(tmp / "run.py"), str(killed), json.dumps(dataclasses.asdict(cfg)), "6", max_restarts=1)
    return one, two, killed, stdout, cfg


# Two processes sum each gradient in another order than one: rounding differences of ~1e-7, which AdamW's division by
# the root of the second moment can raise towards a fraction of the learning rate (1e-3) where gradients are tiny.
ROUNDING = 1e-4


def test_two_processes_reach_the_weights_of_one(runs):
    one, two, *_ = runs
    assert_same_weights(one, two, tol=ROUNDING)
    assert load_checkpoint(two).config["world_size"] == 2 and load_checkpoint(one).config["world_size"] == 1
    a, b = log_rows(one), log_rows(two)  # the logged loss is the whole global batch's
    assert [r["step"] for r in a] == [r["step"] for r in b] == ["2", "4", "6", "8"]
    for ra, rb in zip(a, b):
        assert float(ra["loss"]) == pytest.approx(float(rb["loss"]), rel=1e-4)


def test_only_rank_0_writes_and_prints(runs):
    _, two, killed, stdout, _ = runs
    assert (killed / "writes.txt").read_text().split("\n")[-2:] == ["0 8", ""]  # rank 1 never writes a checkpoint
    assert sorted(p.name for p in two.iterdir()) == ["config.json", "log.csv", "loss.png", "model.safetensors",
                                                    "samples", "samples.png"]
    assert [p.name for p in (two / "samples").iterdir()] == ["step_000008.png"]
    assert stdout.count("trained to step 8 (new run") == 1 and stdout.count("next: ddpm-course sample") == 1


def test_a_killed_rank_is_restarted_and_the_run_ends_as_if_uninterrupted(runs):
    _, two, killed, *_ = runs
    assert (killed / "killed.txt").read_text() == "rank 1 killed at step 6"
    # the first attempt wrote the step-4 checkpoint; the restart resumed from it and wrote step 8
    assert (killed / "writes.txt").read_text().split("\n") == ["0 4", "0 8", ""]
    assert_same_weights(two, killed, tol=0)
    assert [r["step"] for r in log_rows(killed)] == ["2", "4", "6", "8"]


def test_a_two_process_run_resumes_on_one_process(runs, tmp_path):
    one, two, _, _, cfg = runs
    a, b = tmp_path / "one", tmp_path / "two"
    shutil.copytree(one, a)
    shutil.copytree(two, b)
    longer = dataclasses.replace(cfg, steps=12)
    train(longer, a, progress=False)
    assert train(longer, b, progress=False).resumed_from == 8
    assert_same_weights(a, b, tol=ROUNDING)


def test_with_dropout_the_number_of_processes_cannot_change(tmp_path):
    cfg = TrainConfig(steps=2, batch_size=16, unet_overrides={**TINY, "dropout": 0.1}, timesteps=40, log_every=2,
                      sample_every=2, checkpoint_every=2, n_samples=4, warmup=4, device="cpu")
    as_rank0_of_2 = DistContext(rank=0, world_size=2)  # what rank 0 of two processes writes, without the other rank
    train(cfg, tmp_path, progress=False, dist=as_rank0_of_2)
    assert load_checkpoint(tmp_path).config["world_size"] == 2
    longer = dataclasses.replace(cfg, steps=4)
    with pytest.raises(CheckpointError, match="trained on 2 processes and this one has 1; with dropout"):
        train(longer, tmp_path, progress=False)
    assert train(longer, tmp_path, progress=False, dist=as_rank0_of_2).step == 4


def test_without_torchrun_it_is_one_process_and_nothing_is_started(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    ctx = DistContext.from_env("cpu")
    assert ctx == DistContext() and ctx.is_main and ctx.backend is None and not dist.is_initialized()
    net = torch.nn.Linear(2, 2)
    assert data_parallel(net, ctx) is net
    x = torch.ones(3)
    assert ctx.mean(x) is x
    ctx.barrier()


def test_an_incomplete_environment_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="WORLD_SIZE is set but RANK"):
        DistContext.from_env("cpu")


def test_a_process_group_already_up_is_used(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        ctx = DistContext.from_env("cpu")
        assert (ctx.rank, ctx.world_size, ctx.backend) == (0, 1, "gloo")
        assert isinstance(data_parallel(torch.nn.Linear(2, 2), ctx), torch.nn.parallel.DistributedDataParallel)
        assert ctx.mean(torch.tensor([2.0, 4.0])).tolist() == [2.0, 4.0]
        ctx.barrier()
    finally:
        ctx.close()
    assert not dist.is_initialized()


def test_shards_cut_the_global_batch_in_equal_contiguous_slices():
    assert [DistContext(rank=r, world_size=4).shard(32) for r in range(4)] == [slice(0, 8), slice(8, 16),
                                                                               slice(16, 24), slice(24, 32)]
    with pytest.raises(ValueError, match="multiple of the number of processes \\(3\\), got 32"):
        DistContext(rank=1, world_size=3).shard(32)
    whole = iter(StepBatchSampler(50, 12, seed=5, start=7))
    parts = [iter(StepBatchSampler(50, 12, seed=5, start=7, shard=DistContext(rank=r, world_size=3).shard(12)))
             for r in range(3)]
    for _ in range(10):  # across an epoch boundary (4 batches per epoch)
        assert sum((next(p) for p in parts), []) == next(whole)


def test_device_choice(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")


def test_dropout_is_detected():
    assert not has_dropout(unet_preset("digits", **TINY))
    assert has_dropout(unet_preset("digits", **TINY, dropout=0.1))
    assert not has_dropout(torch.nn.Sequential(torch.nn.Dropout(0.0)))
