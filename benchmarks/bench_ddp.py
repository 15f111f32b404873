"""Data-parallel training throughput (chapter 09c), with the commands recorded in benchmarks/RESULTS.md.

Trains the same run (the `digits` U-Net, the same global batch) with `python -m ddpm_course.cli train` on
one process and with `torchrun --standalone --nproc_per_node=N -m ddpm_course.cli train` on N processes (gloo on
the CPU, NCCL on GPUs), one thread per process, and reads the images per second from each run's log.csv (the first
logging interval, which holds the start-up, is left out). Prints a Markdown table and the ratio.

    python benchmarks/bench_ddp.py                                  # CPU: 1 process against 2 gloo processes
    python benchmarks/bench_ddp.py --device cuda --nproc 1 --amp bf16 none   # one GPU, the NCCL path, with and without AMP
"""
import argparse
import csv
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def run(launcher: list[str], out: Path, args: argparse.Namespace, amp: str) -> tuple[float, float]:
    "Train into `out` under `launcher`; (images per second after the first log interval, wall seconds)."
    cmd = [*launcher, "-m", "ddpm_course.cli", "train", "--out", str(out), "--steps", str(args.steps), "--unet", "digits",
           "--batch-size", str(args.batch_size), "--log-every", str(args.log_every), "--device", args.device,
           "--amp", amp, "--threads", "1", "--no-progress"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    with open(out / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))[1:]
    seconds = sum(args.log_every * args.batch_size / float(r["img_per_s"]) for r in rows)
    return len(rows) * args.log_every * args.batch_size / seconds, wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=64, help="the global batch")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--nproc", type=int, default=2, help="processes of the data-parallel run")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", nargs="+", default=["none"], help="mixed-precision modes to measure (CUDA: bf16, fp16, none)")
    args = p.parse_args()
    print(f"digits default model, {args.steps} steps of global batch {args.batch_size}, device {args.device}, one thread "
          f"per process, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d %H:%M')}")
    print()
    print("| processes | amp | img/s | wall s (with start-up) |")
    print("|---|---|---|---|")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    with tempfile.TemporaryDirectory() as tmp:
        for amp in args.amp:
            results = {}
            for name, launcher in (("1 (plain)", [sys.executable]), (f"{args.nproc} (torchrun)", torchrun)):
                results[name] = run(launcher, Path(tmp) / f"{amp}-{len(results)}", args, amp)
                print(f"| {name} | {amp} | {results[name][0]:.0f} | {results[name][1]:.0f} |", flush=True)
            (one, _), (many, _) = results.values()
            print(f"\n{args.nproc} processes / 1 process, amp {amp}: {many / one:.2f}x\n")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
