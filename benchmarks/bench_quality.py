"""Sample quality against sampling cost (chapter 12), with the commands recorded in benchmarks/RESULTS.md.

For a checkpoint (default: the shipped pretrained:digits) draw N samples (default 1,500) with DDPM in all T steps
and with DDIM in 10, 20, 50 and 100 steps; time each on this CPU and score it with ddpm_course.metrics against the
297 held-out test digits: Fréchet distance in the digit classifier's features, the floor (as many training digits
against the same pool) at the same set size, their ratio, each with a 95% interval from the scatter over disjoint
sets, the class entropy and the memorisation check. Prints a Markdown table.

    python benchmarks/bench_quality.py                                   # pretrained:digits, N = 1500, all samplers
    python benchmarks/bench_quality.py --checkpoint runs/digits --samplers ddim50 ddpm
"""
import argparse
import json
import platform
import time

import torch

from ddpm_course.metrics import load_classifier, sample_and_score
from ddpm_course.checkpoint import load_model

SAMPLERS = {"ddpm": ("ddpm", 1000), "ddim10": ("ddim", 10), "ddim20": ("ddim", 20), "ddim50": ("ddim", 50), "ddim100": ("ddim", 100)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="pretrained:digits")
    p.add_argument("--n", type=int, default=1500, help="samples per sampler")
    p.add_argument("--sets", type=int, default=5, help="disjoint sets the samples and the training digits are cut into")
    p.add_argument("--samplers", nargs="+", choices=tuple(SAMPLERS), default=list(SAMPLERS))
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ddpm = load_model(args.checkpoint)
    clf = load_classifier("pretrained:digits_classifier")
    print(f"checkpoint {args.checkpoint}, {args.n} samples per sampler, {args.sets} sets, seed {args.seed}, {args.threads} thread(s), "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d %H:%M')}")
    print()
    print("| sampler | steps | N x sets | wall s | ms / image | FD [95%] | floor [95%] | FD / floor [95%] | class entropy | "
          "nearest-training median ratio | share near |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for name in args.samplers:
        sampler, steps = SAMPLERS[name]
        r, _ = sample_and_score(ddpm, sampler, steps, n=args.n, classifier=clf, seed=args.seed, n_sets=args.sets)
        rows.append(r)
        m = r["memorisation"]
        print(f"| {sampler.upper()} | {r['steps']} | {r['n']} x {r['n_sets']} | {r['seconds']:.1f} | {r['ms_per_image']:.2f} | "
              f"{r['fd']:.3f} [{r['fd_low']:.3f}, {r['fd_high']:.3f}] | {r['floor']:.3f} [{r['floor_low']:.3f}, {r['floor_high']:.3f}] | "
              f"{r['ratio']:.2f} [{r['ratio_low']:.2f}, {r['ratio_high']:.2f}] | {r['entropy']:.3f} | {m['median_ratio']:.2f} | "
              f"{m['share_near']:.3f} |", flush=True)
    by = {(r["sampler"], r["steps"]): r for r in rows}
    if ("ddpm", 1000) in by and ("ddim", 50) in by:
        print(f"\nDDIM 50 is {by['ddpm', 1000]['seconds'] / by['ddim', 50]['seconds']:.1f}x faster than DDPM 1000")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
