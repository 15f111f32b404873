"""The quality-versus-cost frontier of the samplers (chapter 12c) on a trained model, by network calls.

For a checkpoint (default: the shipped pretrained:digits) draw N samples (default 1,500) with DDIM, DPM-Solver++ (2M),
Euler and Heun at a budget of 5, 10, 20 and 50 network calls per image (Heun makes 2 * steps - 1 calls, so it gets the
largest step count within the budget), and with DDPM in all T = 1000 steps; time each on this CPU (wall time per image)
and score it with chapter 12's held-out evaluation (`ddpm_course.metrics.evaluate_samples`: Fréchet distance to the
held-out test digits, the floor, 95% intervals over disjoint sets). The solvers run on each noise-level spacing of
--spacings (`solver_sigmas`), DDIM with each noise level of --etas. Each row keeps the FD of every set as well: all deterministic
samplers start from the same noise, so their differences can be taken set by set (paired), which resolves far smaller
differences than the intervals of each row. Prints a Markdown table and updates the JSON file:
a row measured again replaces the old one (same sampler, steps, spacing and eta), the others are kept with their dates.

    python benchmarks/bench_frontier.py                                  # everything: about an hour on one busy thread
    python benchmarks/bench_frontier.py --samplers ddim dpm++ --budgets 10
    python benchmarks/bench_frontier.py --samplers ddpm --json ddpm.json  # DDPM alone (most of the time), e.g. alongside
    python benchmarks/bench_frontier.py --samplers dpm++ heun euler --spacings trailing karras lambda   # the spacings
    python benchmarks/bench_frontier.py --samplers ddim --budgets 20 --etas 0.3                        # stochastic DDIM
"""
import argparse
import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ddpm_course.data import load_dataset
from ddpm_course.metrics import evaluate_samples, extract_features, frechet_distance, gaussian_stats, load_classifier
from ddpm_course.solvers import SAMPLERS, SIGMA_SPACINGS, SOLVERS, network_calls, sample_with
from ddpm_course.checkpoint import load_model


def key(row: dict) -> tuple:
    "What identifies a measurement: the sampler, its steps, the solvers' spacing, DDIM's eta, the sets and the seed."
    return row["sampler"], row["steps"], row.get("spacing"), row.get("eta"), row["n"], row["n_sets"], row.get("seed", 0)


def set_fds(x: torch.Tensor, clf, sets: int, seed: int) -> list[float]:
    "The FD of each of the disjoint sets evaluate_samples cuts `x` into (its fd is their mean): samplers started from the same noise pair up set by set."
    pool = load_dataset("digits", clf.image_size, split="test", channels=clf.config["channels"]).images
    pool_stats = gaussian_stats(extract_features(clf, pool)[0])
    features = extract_features(clf, x[torch.randperm(len(x), generator=torch.Generator().manual_seed(2 * seed + 1))])[0]
    n = len(features) // sets
    return [frechet_distance(*gaussian_stats(features[i * n:(i + 1) * n]), *pool_stats) for i in range(sets)]


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
    p.add_argument("--spacings", nargs="+", choices=SIGMA_SPACINGS, default=["trailing"], help="noise levels of the ODE solvers")
    p.add_argument("--etas", nargs="+", type=float, default=[0.0], help="DDIM's noise (0: deterministic)")
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
    print("\n| sampler | spacing / eta | steps | network calls | wall s | ms / image | FD [95%] | floor [95%] | FD / floor [95%] |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|---:|")
    variants = lambda s: [dict(spacing=sp) for sp in args.spacings] if s in SOLVERS else [dict(eta=e) for e in args.etas]
    runs = [(s, steps_for(s, b), v) for b in args.budgets for s in args.samplers if s != "ddpm" for v in variants(s)]
    runs += [("ddpm", ddpm.num_timesteps, {})] if "ddpm" in args.samplers else []
    path = Path(args.json)
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    for sampler, steps, variant in runs:
        t0 = time.perf_counter()
        x = sample_with(sampler, ddpm, args.n, steps, seed=args.seed, batch_size=500, **variant)
        seconds = time.perf_counter() - t0
        r = evaluate_samples(x, "digits", clf, n_sets=args.sets, seed=args.seed)
        per_set = set_fds(x, clf, args.sets, args.seed)
        assert abs(sum(per_set) / len(per_set) - r.fd) < 1e-9, "the per-set FDs must be evaluate_samples' sets"
        row = dict(sampler=sampler, **variant, steps=steps, calls=network_calls(sampler, steps, ddpm.num_timesteps), seconds=seconds,
                   ms_per_image=1000 * seconds / args.n, date=time.strftime("%Y-%m-%d %H:%M"), load=os.getloadavg()[0], seed=args.seed,
                   **{k: v for k, v in asdict(r).items() if k != "memorisation"}, set_fds=per_set)
        rows = [old for old in rows if key(old) != key(row)] + [row]
        print(f"| {sampler} | {'/'.join(str(v) for v in variant.values())} | {steps} | {row['calls']} | {seconds:.1f} | "
              f"{row['ms_per_image']:.2f} | {r.fd:.2f} [{r.fd_low:.2f}, {r.fd_high:.2f}] | "
              f"{r.floor:.2f} [{r.floor_low:.2f}, {r.floor_high:.2f}] | {r.ratio:.2f} [{r.ratio_low:.2f}, {r.ratio_high:.2f}] |", flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dict(header=header, rows=rows), indent=1) + "\n")


if __name__ == "__main__":
    main()
