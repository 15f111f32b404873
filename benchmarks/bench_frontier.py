"""The quality-versus-cost frontier of the samplers (chapter 12c) on a trained model, by network calls.

For a checkpoint (default: the shipped pretrained:digits) draw N samples (default 1,500) with DDIM, DPM-Solver++ (2M),
Euler and Heun at a budget of 5, 10, 20 and 50 network calls per image (Heun makes 2 * steps - 1 calls, so it gets the
largest step count within the budget), and with DDPM in all T = 1000 steps; time each on this CPU (wall time per image)
and score it with chapter 12's held-out evaluation (`ddpm_course.metrics.evaluate_samples`: Fréchet distance to the
held-out test digits, the floor, 95% intervals over disjoint sets). Prints a Markdown table, writes the rows to JSON.

    python benchmarks/bench_frontier.py                                  # everything: about an hour on one busy thread
    python benchmarks/bench_frontier.py --samplers ddim dpm++ --budgets 10
    python benchmarks/bench_frontier.py --samplers ddpm --json ddpm.json  # DDPM alone (most of the time), e.g. alongside
"""
import argparse
import json
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ddpm_course.metrics import evaluate_samples, load_classifier
from ddpm_course.solvers import SAMPLERS, network_calls, sample_with
from ddpm_course.checkpoint import load_model


def steps_for(sampler: str, budget: int) -> int:
    "The most steps whose network calls fit in `budget`."
    return (budget + 1) // 2 if sampler == "heun" else budget


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="pretrained:digits")
    p.add_argument("--n", type=int, default=1500, help="samples per sampler and budget")
    p.add_argument("--sets", type=int, default=5)
    p.add_argument("--samplers", nargs="+", choices=SAMPLERS, default=list(SAMPLERS),
                   help="ddpm runs once, with all T steps, whatever the budgets")
    p.add_argument("--budgets", nargs="+", type=int, default=[5, 10, 20, 50], help="network calls per image")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="benchmarks/results/frontier.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ddpm = load_model(args.checkpoint)
    clf = load_classifier("pretrained:digits_classifier")
    header = dict(checkpoint=args.checkpoint, n=args.n, sets=args.sets, threads=args.threads, seed=args.seed,
                  torch=torch.__version__, machine=platform.processor() or platform.machine(), date=time.strftime("%Y-%m-%d %H:%M"))
    print(header)
    print("\n| sampler | steps | network calls | wall s | ms / image | FD [95%] | floor [95%] | FD / floor [95%] |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|")
    runs = [(s, steps_for(s, b)) for b in args.budgets for s in args.samplers if s != "ddpm"]
    runs += [("ddpm", ddpm.num_timesteps)] if "ddpm" in args.samplers else []
    rows = []
    for sampler, steps in runs:
        t0 = time.perf_counter()
        x = sample_with(sampler, ddpm, args.n, steps, seed=args.seed, batch_size=500)
        seconds = time.perf_counter() - t0
        r = evaluate_samples(x, "digits", clf, n_sets=args.sets, seed=args.seed)
        row = dict(sampler=sampler, steps=steps, calls=network_calls(sampler, steps, ddpm.num_timesteps), seconds=seconds,
                   ms_per_image=1000 * seconds / args.n, **{k: v for k, v in asdict(r).items() if k != "memorisation"})
        rows.append(row)
        print(f"| {sampler} | {steps} | {row['calls']} | {seconds:.1f} | {row['ms_per_image']:.2f} | {r.fd:.2f} [{r.fd_low:.2f}, {r.fd_high:.2f}] | "
              f"{r.floor:.2f} [{r.floor_low:.2f}, {r.floor_high:.2f}] | {r.ratio:.2f} [{r.ratio_low:.2f}, {r.ratio_high:.2f}] |", flush=True)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(header=header, rows=rows), indent=1) + "\n")


if __name__ == "__main__":
    main()
