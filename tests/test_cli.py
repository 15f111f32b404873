"""Tests of ddpm_course.cli: the `ddpm-course` command, in-process through main() and once as the console script."""
import csv
import json
import errno
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ddpm_course.cli as cli
from ddpm_course.checkpoint import CheckpointError, load_checkpoint, load_model
from ddpm_course.cli import build_parser, main, read_samples
from ddpm_course.data import load_dataset, to_uint8
from ddpm_course.metrics import evaluate_samples
from ddpm_course.sampling import sample_ddim
from ddpm_course.solvers import sample_solver

QUICK = ["--sample-every", "10", "--checkpoint-every", "10", "--n-samples", "4", "--log-every", "5", "--no-progress"]


def error_line(capsys) -> str:
    "The single stderr line of a failed command (and check there is nothing else, no traceback)."
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ddpm-course: error: "), err
    return err[0]


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("samples")
    assert main(["sample", "--checkpoint", "pretrained:digits", "--n", "40", "--steps", "20", "--out", str(out), "--no-progress"]) == 0
    return out


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(c in out for c in ("train", "sample", "eval", "export"))
    sub = build_parser()._subparsers._group_actions[0].choices
    for name, parser in sub.items():
        text = parser.format_help()
        for action in parser._actions:
            for opt in action.option_strings:
                assert opt in text, (name, opt)
            if action.option_strings and action.dest != "help":
                assert action.help, (name, action.dest)  # every option is explained
    flat = " ".join(sub["train"].format_help().split())
    assert f"this number (default: {sub['train'].get_default('steps')})" in flat


@pytest.mark.parametrize("argv", [
    ["train", "--steps", "ten"],
    ["train", "--grad-clip", "off"],
    ["sample", "--out", "x"],  # --checkpoint missing
    ["sample", "--checkpoint", "pretrained:digits", "--out", "x", "--sampler", "lms"],
    ["train", "--prediction", "score"],
    ["eval"],
    ["frobnicate"],
])
def test_bad_arguments_exit_2_without_traceback(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


@pytest.mark.parametrize("argv,word", [(["--steps", "0"], "steps must be an int >= 1, got 0"),
                                       (["--lr", "-1"], "lr must be a positive number"),
                                       (["--weight-decay", "-0.1"], "weight_decay must be a number >= 0"),
                                       (["--grad-clip", "0"], "grad_clip must be > 0 or None")])
def test_train_values_are_checked_by_train_config(argv, word, capsys, tmp_path):
    assert main(["train", "--out", str(tmp_path), *argv]) == 2
    assert word in error_line(capsys)
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_train_options_are_the_train_config_fields():
    from dataclasses import fields

    from ddpm_course.training import TrainConfig

    p = build_parser()._subparsers._group_actions[0].choices["train"]
    opts = {a.dest: a for a in p._actions if a.option_strings}
    for f in fields(TrainConfig):
        if f.metadata.get("cli", True):
            assert opts[f.name].default == f.default and opts[f.name].help == f.metadata["help"], f.name  # help is required
    args = p.parse_args(["--grad-clip", "none", "--image-size", "16", "--weight-decay", "0.01"])
    assert args.grad_clip is None and args.image_size == 16 and args.weight_decay == 0.01
    # the command's defaults, tuned for time to quality (benchmarks/RESULTS.md)
    assert (TrainConfig().unet, TrainConfig().steps, TrainConfig().batch_size, TrainConfig().lr, TrainConfig().lr_decay) == (
        "digits_small", 1750, 128, 3e-3, "cosine") and TrainConfig().image_size is None


def test_train_writes_five_files_resumes_and_says_so(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--steps", "20", "--out", str(out), *QUICK]) == 0
    assert "new run" in capsys.readouterr().out
    assert {"model.safetensors", "config.json", "log.csv", "loss.png", "samples.png"} <= {p.name for p in out.iterdir()}
    assert main(["train", "--steps", "30", "--out", str(out), *QUICK]) == 0
    assert "resumed from step 20" in capsys.readouterr().out
    assert main(["train", "--steps", "30", "--out", str(out), *QUICK]) == 0
    assert "already finished" in capsys.readouterr().out
    with open(out / "log.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert steps == list(range(5, 31, 5))
    # a resumed run may not change what defines the model
    assert main(["train", "--steps", "40", "--out", str(out), "--lr", "0.01", *QUICK]) == 2
    assert "other settings" in error_line(capsys)


def test_resume_is_exact(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    main(["train", "--steps", "20", "--out", str(a), *QUICK])
    main(["train", "--steps", "10", "--out", str(b), *QUICK])
    main(["train", "--steps", "20", "--out", str(b), *QUICK])
    for p, q in zip(load_model(a).parameters(), load_model(b).parameters()):
        assert torch.equal(p, q)


def test_sample_writes_npz_and_grid(samples):
    images = read_samples(samples / "samples.npz")
    assert images.shape == (40, 8, 8, 1) and images.dtype == np.uint8
    assert 0 < images.mean() < 255
    assert (samples / "grid.png").is_file()


def test_sample_is_seeded_and_matches_the_library(tmp_path, samples):
    main(["sample", "--checkpoint", "pretrained:digits", "--n", "40", "--steps", "20", "--out", str(tmp_path), "--no-progress"])
    same = read_samples(tmp_path / "samples.npz")
    assert np.array_equal(same, read_samples(samples / "samples.npz"))
    lib = sample_ddim(load_model("pretrained:digits"), 40, steps=20, seed=0)
    assert np.array_equal(same, ((lib.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())


def test_sample_ddpm_and_sampler_options(tmp_path, capsys):
    assert main(["sample", "--checkpoint", "pretrained:digits", "--n", "2", "--sampler", "ddpm", "--out", str(tmp_path), "--no-progress"]) == 0
    assert "ddpm, 1000 steps" in capsys.readouterr().out
    assert read_samples(tmp_path / "samples.npz").shape == (2, 8, 8, 1)
    assert main(["sample", "--checkpoint", "pretrained:digits", "--sampler", "ddpm", "--steps", "10", "--out", str(tmp_path)]) == 2
    assert "--steps is for the other samplers" in error_line(capsys)


@pytest.mark.parametrize("sampler,steps,calls", [("dpm++", 4, 4), ("euler", 3, 3), ("heun", 3, 5)])
def test_sample_with_the_ode_solvers(tmp_path, capsys, sampler, steps, calls):
    argv = ["sample", "--checkpoint", "pretrained:digits", "--n", "6", "--sampler", sampler, "--steps", str(steps), "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert f"{sampler}, {steps} steps, {calls} network calls" in capsys.readouterr().out
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    assert np.array_equal(read_samples(tmp_path / "a" / "samples.npz"), read_samples(tmp_path / "b" / "samples.npz"))


def test_sample_refuses_options_that_do_not_fit_the_solver(tmp_path, capsys):
    base = ["sample", "--checkpoint", "pretrained:digits", "--out", str(tmp_path)]
    assert main([*base, "--sampler", "dpm++", "--steps", "1"]) == 2
    assert "dpm++ needs steps >= 2" in error_line(capsys)
    assert main([*base, "--sampler", "heun", "--eta", "1"]) == 2
    assert "--eta is for --sampler ddim" in error_line(capsys)
    assert main([*base, "--sampler", "ddim", "--spacing", "karras"]) == 2
    assert "--spacing is for the ODE solvers dpm++, euler, heun, not ddim" in error_line(capsys)


def test_sample_spacing_option_reaches_the_solver(tmp_path, capsys):
    argv = ["sample", "--checkpoint", "pretrained:digits", "--n", "4", "--sampler", "dpm++", "--steps", "5", "--no-progress"]
    assert main([*argv, "--spacing", "karras", "--out", str(tmp_path / "k")]) == 0
    lib = sample_solver(load_model("pretrained:digits"), 4, 5, "dpm++", spacing="karras", seed=0)
    assert np.array_equal(read_samples(tmp_path / "k" / "samples.npz"), to_uint8(lib).permute(0, 2, 3, 1).numpy())
    assert main([*argv, "--out", str(tmp_path / "t")]) == 0  # the default: trailing
    lib = sample_solver(load_model("pretrained:digits"), 4, 5, "dpm++", spacing="trailing", seed=0)
    assert np.array_equal(read_samples(tmp_path / "t" / "samples.npz"), to_uint8(lib).permute(0, 2, 3, 1).numpy())


def test_train_records_the_prediction_target_and_sample_reads_it(tmp_path, capsys):
    out = tmp_path / "v"
    assert main(["train", "--steps", "3", "--prediction", "v", "--min-snr-gamma", "5", "--out", str(out), "--no-progress",
                 "--sample-every", "3", "--n-samples", "4"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["prediction"] == "v" and config["min_snr_gamma"] == 5.0 and config["train"]["prediction"] == "v"
    ddpm = load_model(out)
    assert ddpm.prediction == "v" and ddpm.min_snr_gamma == 5.0
    with pytest.raises(CheckpointError, match="trained to predict 'v', not 'eps'"):
        load_model(out, prediction="eps")
    assert main(["sample", "--checkpoint", str(out), "--n", "4", "--sampler", "dpm++", "--steps", "3",
                 "--out", str(tmp_path / "s"), "--no-progress"]) == 0


def test_eval_prints_score_floor_ratio_intervals_and_memorisation(samples, capsys):
    assert main(["eval", "--samples", str(samples / "samples.npz"), "--sets", "4"]) == 0
    out = capsys.readouterr().out
    r = evaluate_samples(read_samples(samples / "samples.npz"), n_sets=4)
    for text in ("40 images 8x8x1", "held-out digits", f"FD {r.fd:.3f} [{r.fd_low:.3f}, {r.fd_high:.3f}]",
                 f"floor {r.floor:.3f} [{r.floor_low:.3f}, {r.floor_high:.3f}]",
                 f"ratio {r.ratio:.2f}x [{r.ratio_low:.2f}, {r.ratio_high:.2f}]", "N = 10: 4 sets", "297 held-out real images",
                 "class entropy", f"{100 * r.memorisation.share_near:.1f}% of samples nearer", "no memorisation detected"):
        assert text in out, text


def test_eval_flags_a_copying_model(tmp_path, capsys):
    train = load_dataset("digits", split="train").images[:200]
    np.savez(tmp_path / "copies.npz", images=((train + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    assert main(["eval", "--samples", str(tmp_path / "copies.npz")]) == 0
    assert "MEMORISATION" in capsys.readouterr().out
    assert main(["eval", "--samples", str(tmp_path / "copies.npz"), "--sets", "1"]) == 2
    assert "n_sets must be >= 2" in error_line(capsys)


def test_eval_rejects_bad_files(tmp_path, capsys):
    cases = {
        "missing.npz": None,
        "text.npz": lambda p: p.write_text("hello"),
        "single.npz": lambda p: np.save(open(p, "wb"), np.zeros((2, 8, 8, 1), np.uint8)),
        "noimages.npz": lambda p: np.savez(p, pictures=np.zeros((2, 8, 8, 1), np.uint8)),
        "float.npz": lambda p: np.savez(p, images=np.zeros((2, 8, 8, 1), np.float32)),
        "nhw.npz": lambda p: np.savez(p, images=np.zeros((2, 8, 8), np.uint8)),
    }
    words = {"missing.npz": "no samples file", "text.npz": "not a .npz", "single.npz": "single .npy",
             "noimages.npz": "no array 'images'", "float.npz": "uint8", "nhw.npz": "N x H x W x C"}
    for name, make in cases.items():
        p = tmp_path / name
        if make:
            make(p)
        assert main(["eval", "--samples", str(p)]) == 2
        assert words[name] in error_line(capsys), name


def test_user_errors_are_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"\x00" * 64)
    monkeypatch.setenv("DDPM_COURSE_DATA", str(tmp_path / "data"))

    def offline(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", offline)  # offline even where CI has a network
    for argv, word, status in [
        (["sample", "--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")], "no checkpoint", 2),
        (["sample", "--checkpoint", str(tmp_path / "broken"), "--out", str(tmp_path / "o")], "corrupt", 2),
        (["sample", "--checkpoint", "pretrained:cats", "--out", str(tmp_path / "o")], "cats", 2),
        (["sample", "--checkpoint", "pretrained:../pretrained/digits", "--out", str(tmp_path / "o")], "not a path", 2),
        (["train", "--dataset", "imagenet", "--out", str(tmp_path / "r")], "unknown data set", 2),
        (["train", "--dataset", "mnist", "--steps", "1", "--out", str(tmp_path / "r")], "could not download", 1),
        (["eval", "--samples", str(tmp_path / "x.npz"), "--dataset", "cifar10"], "no samples file", 2),
    ]:
        assert main(argv) == status, argv
        assert word in error_line(capsys), argv


def test_eval_needs_a_classifier_for_the_dataset(samples, capsys):
    assert main(["eval", "--samples", str(samples / "samples.npz"), "--dataset", "cifar10"]) == 2
    assert "no classifier is shipped" in error_line(capsys)


def test_export_keeps_only_ema_weights(tmp_path):
    run, out = tmp_path / "run", tmp_path / "exported"
    main(["train", "--steps", "10", "--out", str(run), *QUICK])
    assert main(["export", "--checkpoint", str(run), "--out", str(out)]) == 0
    assert (out / "model.safetensors").stat().st_size < (run / "model.safetensors").stat().st_size / 2
    assert (out / "log.csv").read_text() == (run / "log.csv").read_text()
    for p, q in zip(load_model(run).parameters(), load_model(out).parameters()):
        assert torch.equal(p, q)


def test_threads_are_restored(tmp_path, monkeypatch):
    "--threads applies while the command runs and is undone afterwards, also when the command fails."
    seen = []
    def read_samples(path):
        seen.append(torch.get_num_threads())
        raise FileNotFoundError(f"no samples file at {str(path)!r}")

    monkeypatch.setattr(cli, "read_samples", read_samples)
    before = torch.get_num_threads()  # 1, set by the conftest fixture: so ask for another number
    assert main(["eval", "--samples", str(tmp_path / "none.npz"), "--threads", str(before + 1)]) == 2
    assert seen == [before + 1] and torch.get_num_threads() == before


def test_console_script(tmp_path):
    exe = Path(sys.executable).parent / "ddpm-course"
    assert exe.is_file(), "install the package (pip install -e .) to get the console script"
    ok = subprocess.run([str(exe), "sample", "--checkpoint", "pretrained:digits", "--n", "8", "--out", str(tmp_path), "--no-progress"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert read_samples(tmp_path / "samples.npz").shape == (8, 8, 8, 1)
    bad = subprocess.run([str(exe), "sample", "--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


def test_a_full_disk_says_so_in_one_line_and_keeps_the_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real_write_bytes, writes = Path.write_bytes, {"n": 0}

    def fills_up(self, data):
        writes["n"] += 1
        if writes["n"] == 2:  # the second checkpoint (step 20)
            real_write_bytes(self, data[: len(data) // 3])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real_write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", fills_up)
    assert main(["train", "--steps", "30", "--out", str(out), *QUICK]) == 1
    line = error_line(capsys)
    assert "disk" in line and "is full (at step 20)" in line and "last good checkpoint (step 10) is intact" in line
    monkeypatch.undo()
    assert load_checkpoint(out).step == 10 and not list(out.glob("*.tmp"))
    assert main(["train", "--steps", "30", "--out", str(out), *QUICK]) == 0
    assert "resumed from step 10" in capsys.readouterr().out


def test_a_second_train_on_the_same_folder_stops_at_once(tmp_path, capsys):
    out = tmp_path / "run"
    hold = "import sys, time\nfrom ddpm_course.checkpoint import run_lock\nwith run_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(60)\n"
    proc = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        assert main(["train", "--steps", "20", "--out", str(out), *QUICK]) == 1
        assert f"in use by another training process (pid {proc.pid})" in error_line(capsys)
        assert not (out / "log.csv").exists() and not (out / "model.safetensors").exists()
    finally:
        proc.kill()
        proc.wait()


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(tmp_path, capsys, monkeypatch):
    bad = ["sample", "--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "s")]
    assert main(bad) == 2
    assert "no checkpoint at" in error_line(capsys)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        main(["--debug", *bad])
    monkeypatch.setenv("DDPM_COURSE_DEBUG", "1")
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        main(bad)
    monkeypatch.delenv("DDPM_COURSE_DEBUG")

    def a_bug(*args, **kwargs):
        return torch.zeros(2) @ torch.zeros(3)  # a RuntimeError from inside torch: not the user's fault

    monkeypatch.setattr(cli, "load_model", a_bug)
    with pytest.raises(RuntimeError, match="inconsistent tensor size"):
        main(["sample", "--checkpoint", "pretrained:digits", "--out", str(tmp_path / "s")])

    def a_deep_value_error(*args, **kwargs):
        return np.zeros(3).reshape(2)  # a ValueError raised by numpy, not by our checks

    monkeypatch.setattr(cli, "load_model", a_deep_value_error)
    with pytest.raises(ValueError, match="reshape"):
        main(["sample", "--checkpoint", "pretrained:digits", "--out", str(tmp_path / "s")])


def test_conditional_train_sample_and_eval(tmp_path, capsys):
    "train --conditional records the classes; sample --class/--guidance draws them; eval reports the requested class's accuracy."
    run = tmp_path / "cond"
    tiny = ["--steps", "3", "--sample-every", "3", "--checkpoint-every", "3", "--n-samples", "20", "--no-progress"]
    assert main(["train", "--conditional", "--p-uncond", "0.2", "--out", str(run), *tiny]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["net"]["config"]["num_classes"] == 10 and config["train"]["p_uncond"] == 0.2
    assert (run / "samples.png").is_file()
    capsys.readouterr()
    out = tmp_path / "threes"
    assert main(["sample", "--checkpoint", str(run), "--class", "3", "--guidance", "2.5", "--n", "20", "--steps", "5",
                 "--out", str(out), "--no-progress"]) == 0
    assert "class 3, guidance s = 2.5 on doubled batches" in capsys.readouterr().out
    with np.load(out / "samples.npz") as npz:
        assert npz["images"].shape == (20, 8, 8, 1) and npz["labels"].tolist() == [3] * 20
    # the same samples as the library's guided sampler
    from ddpm_course.guidance import sample_guided
    from ddpm_course.data import to_uint8
    x = sample_guided(load_model(run), [3] * 20, 2.5, "ddim", 5, seed=0, batch_size=500)
    assert np.array_equal(to_uint8(x).permute(0, 2, 3, 1).numpy(), read_samples(out / "samples.npz"))
    every = tmp_path / "every"
    assert main(["sample", "--checkpoint", str(run), "--n", "30", "--steps", "5", "--out", str(every), "--no-progress"]) == 0
    with np.load(every / "samples.npz") as npz:
        assert np.bincount(npz["labels"]).tolist() == [3] * 10  # every class equally often
    assert main(["eval", "--samples", str(out / "samples.npz"), "--sets", "2"]) == 0
    assert "requested class recognised by the classifier in" in capsys.readouterr().out


def test_guidance_options_need_a_conditional_model_and_a_real_class(tmp_path, capsys):
    base = ["sample", "--n", "4", "--steps", "5", "--out", str(tmp_path / "s"), "--no-progress"]
    assert main([*base, "--checkpoint", "pretrained:digits", "--class", "3"]) == 2
    assert "need a class-conditional model" in error_line(capsys)
    assert main([*base, "--checkpoint", "pretrained:digits", "--guidance", "2"]) == 2
    assert "need a class-conditional model" in error_line(capsys)
    run = tmp_path / "cond"
    assert main(["train", "--conditional", "--steps", "1", "--sample-every", "5", "--out", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    assert main([*base, "--checkpoint", str(run), "--class", "10"]) == 2
    assert "--class must be in 0..9 (this model has 10 classes), got 10" in error_line(capsys)
    with pytest.raises(SystemExit) as e:  # argparse's own check: usage, then the error
        main([*base, "--checkpoint", str(run), "--guidance", "-1"])
    assert e.value.code == 2 and "--guidance: expected a number >= 0, got '-1'" in capsys.readouterr().err
    assert main([*base, "--checkpoint", str(run), "--eta", "0.5"]) == 2
    assert "guided DDIM is deterministic" in error_line(capsys)
    assert main([*base, "--checkpoint", str(run), "--sampler", "dpm++", "--spacing", "karras"]) == 2
    assert "--spacing is for unconditional models" in error_line(capsys)
    np.savez(tmp_path / "bad.npz", images=np.zeros((4, 8, 8, 1), np.uint8), labels=np.zeros(3, np.int64))
    assert main(["eval", "--samples", str(tmp_path / "bad.npz"), "--sets", "2"]) == 2
    line = error_line(capsys)
    assert "'labels'" in line and "must be 4 integers, one per image" in line
