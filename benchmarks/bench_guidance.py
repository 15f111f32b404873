"""The classifier-free guidance sweep (chapter 12d) on a class-conditional model.

For a checkpoint (default: the shipped pretrained:digits_cond) draw N samples (default 1,500: the same number of each
digit) at each guidance scale s = 1 + w, for Ho and Salimans' w in {0, 0.1, 0.3, 1, 2, 4} and the unconditional s = 0,
with one sampler (default DDIM in 50 steps), and score them: the share the project's classifier labels as the digit
asked for, the within-class spread of the classifier features against the held-out digits' (1: as varied as real
digits), and chapter 12's held-out evaluation (Fréchet distance to the 297 test digits beside the floor, 95% intervals
over disjoint sets, memorisation). For comparison, the unconditional model trained for as many steps (default
pretrained:digits) with the same sampler. Prints a Markdown table, writes the rows to JSON.

    python benchmarks/bench_guidance.py                       # about 15 minutes on one busy CPU thread
    python benchmarks/bench_guidance.py --scales 1 3 --n 300 --sets 2 --json /tmp/quick.json
"""
import argparse
import json
import platform
import time
from pathlib import Path

import torch

from ddpm_course.checkpoint import load_model
from ddpm_course.guidance import guidance_sweep, report_fields
from ddpm_course.metrics import evaluate_samples, load_classifier
from ddpm_course.solvers import SAMPLERS, sample_with


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="pretrained:digits_cond")
    p.add_argument("--unconditional", default="pretrained:digits", help="an unconditional model to compare with ('none': skip)")
    p.add_argument("--scales", nargs="+", type=float, default=[0, 1, 1.1, 1.3, 2, 3, 5], help="guidance scales s = 1 + w")
    p.add_argument("--n", type=int, default=1500, help="samples per scale (a multiple of the number of classes)")
    p.add_argument("--sets", type=int, default=5)
    p.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="benchmarks/results/guidance.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ddpm = load_model(args.checkpoint)
    clf = load_classifier("pretrained:digits_classifier")
    k = ddpm.model.num_classes
    if args.n % k:
        raise SystemExit(f"--n must be a multiple of the {k} classes, got {args.n}")
    header = dict(checkpoint=args.checkpoint, n=args.n, sets=args.sets, sampler=args.sampler, steps=args.steps,
                  threads=args.threads, seed=args.seed, torch=torch.__version__,
                  machine=platform.processor() or platform.machine(), date=time.strftime("%Y-%m-%d %H:%M"))
    print(header)
    record = dict(header=header, rows=[], unconditional=None)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.unconditional != "none":
        base = load_model(args.unconditional)
        t0 = time.perf_counter()
        x = sample_with(args.sampler, base, args.n, args.steps, seed=args.seed, batch_size=500)
        seconds = time.perf_counter() - t0
        r = evaluate_samples(x, "digits", clf, n_sets=args.sets, seed=args.seed)
        record["unconditional"] = dict(checkpoint=args.unconditional, seconds=seconds, **report_fields(r))
        print(f"unconditional {args.unconditional}: FD {r.fd:.3f} [{r.fd_low:.3f}, {r.fd_high:.3f}], "
              f"FD / floor {r.ratio:.2f} [{r.ratio_low:.2f}, {r.ratio_high:.2f}], {seconds:.0f} s", flush=True)
    print("\n| s | w | accuracy | spread | FD [95%] | floor [95%] | FD / floor [95%] | share near | wall s |\n"
          "|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in args.scales:  # one scale at a time, so that the JSON holds every finished row
        row = guidance_sweep(ddpm, [s], args.n // k, args.sampler, args.steps, classifier=clf, n_sets=args.sets,
                             seed=args.seed)[0]
        record["rows"].append(row)
        print(f"| {s:g} | {s - 1:g} | {row['accuracy']:.3f} | {row['spread']:.2f} | {row['fd']:.3f} [{row['fd_low']:.3f}, "
              f"{row['fd_high']:.3f}] | {row['floor']:.3f} [{row['floor_low']:.3f}, {row['floor_high']:.3f}] | "
              f"{row['ratio']:.2f} [{row['ratio_low']:.2f}, {row['ratio_high']:.2f}] | {row['share_near']:.3f} | "
              f"{row['seconds']:.1f} |", flush=True)
        out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
