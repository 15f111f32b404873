"""Which training target wins at an equal budget on the digits: eps, v or x0 prediction, min-SNR-5, the cosine schedule.

Each variant trains the `digits` U-Net in batches of 64 at a constant lr 1e-3 (`ddpm_course.training.TrainConfig`, one thread) for the same number
of optimiser steps and the same seed, differing only in the named fields; its EMA weights then draw N samples with
DDIM in 50 steps, scored by chapter 12's held-out evaluation (`ddpm_course.metrics.evaluate_samples`: Fréchet
distance to the held-out test digits, with the floor and 95% intervals over disjoint sets). Prints a Markdown table
and writes the rows to a JSON file (the chapter 12b prints them from there).

    python benchmarks/bench_parameterisation.py                        # 1,500 steps each, all variants
    python benchmarks/bench_parameterisation.py --steps 400 --variants eps v
"""
import argparse
import json
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ddpm_course.metrics import evaluate_samples
from ddpm_course.sampling import sample_ddim
from ddpm_course.training import TrainConfig, train

VARIANTS = {
    "eps": {},
    "v": {"prediction": "v"},
    "x0": {"prediction": "x0"},
    "eps, min-SNR-5": {"min_snr_gamma": 5.0},
    "eps, cosine schedule": {"schedule": "cosine"},
}


BASE = dict(unet="digits", batch_size=64, lr=1e-3, lr_decay="constant")  # the run its recorded results used (the old defaults)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1500, help="optimiser steps per variant")
    p.add_argument("--n", type=int, default=1500, help="samples per variant")
    p.add_argument("--sets", type=int, default=5)
    p.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS))
    p.add_argument("--runs", default="runs/parameterisation", help="folder for the training runs")
    p.add_argument("--json", default="benchmarks/results/parameterisation.json")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    header = dict(steps=args.steps, n=args.n, sets=args.sets, threads=args.threads, torch=torch.__version__,
                  machine=platform.processor() or platform.machine(), date=time.strftime("%Y-%m-%d %H:%M"))
    print(header)
    print("\n| variant | steps | train s | last loss | FD [95%] | floor [95%] | FD / floor [95%] |\n|---|---:|---:|---:|---:|---:|---:|")
    rows = []
    for name in args.variants:
        cfg = TrainConfig(steps=args.steps, sample_every=args.steps, checkpoint_every=args.steps, **BASE, **VARIANTS[name])
        t0 = time.perf_counter()
        grid = lambda ddpm, n, seed: sample_ddim(ddpm, n, steps=50, seed=seed)
        result = train(cfg, Path(args.runs) / name.replace(", ", "_").replace(" ", "_"), progress=False, sampler=grid)
        seconds = time.perf_counter() - t0
        x = sample_ddim(result.ddpm, args.n, steps=50, seed=0, batch_size=500)
        r = evaluate_samples(x, "digits", n_sets=args.sets, seed=0)
        row = dict(variant=name, overrides=VARIANTS[name], train_seconds=seconds, last_loss=result.last_loss,
                   **{k: v for k, v in asdict(r).items() if k != "memorisation"})
        rows.append(row)
        print(f"| {name} | {args.steps} | {seconds:.0f} | {result.last_loss:.4f} | {r.fd:.2f} [{r.fd_low:.2f}, {r.fd_high:.2f}] | "
              f"{r.floor:.2f} [{r.floor_low:.2f}, {r.floor_high:.2f}] | {r.ratio:.2f} [{r.ratio_low:.2f}, {r.ratio_high:.2f}] |", flush=True)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(header=header, rows=rows), indent=1) + "\n")


if __name__ == "__main__":
    main()
