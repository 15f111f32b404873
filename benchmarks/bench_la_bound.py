"""What the U-Net speed goals need from linear attention: the fast U-Net with and without its linear-attention layers.

Run: `python benchmarks/bench_la_bound.py --threads 1` (lucidrains' U-Net from `pip install -e ".[bench]"`).

Linear attention takes a larger share of the fast U-Net's time than of its FLOPs (chapter 08b's profile). This
script measures by how much, and what removing that excess would buy: in alternating rounds (as `bench_unet.py`
does, same configuration, batch and steps), the fast U-Net, the same network with every `FastLinearAttention`
replaced by the identity (its FLOPs gone, the rest unchanged), and lucidrains' `Unet`. From the medians:
- the linear-attention layers' share of the step time, and of the FLOPs (`torch.utils.flop_counter`);
- the step time if those layers ran at the rate of the rest of the network (FLOPs per second of the network without
  them): a bound for what a fused kernel could reach; and the ratios to lucidrains' step, now and at that bound.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from bench_unet import build, flops_per_image, make_sample_step, make_train_step
from ddpm_course.fast import FastLinearAttention


def without_linear_attention(net: nn.Module) -> nn.Module:
    "`net` with each `FastLinearAttention` replaced by the identity, in place."
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FastLinearAttention):
                setattr(parent, name, nn.Identity())
    return net


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: torch's)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    c = args.channels
    nets = {"fast": build("ddpm_course_fast", c), "without": without_linear_attention(build("ddpm_course_fast", c)),
            "lucidrains": build("lucidrains", c)}
    print(f"{c} channel(s), 32x32, {torch.get_num_threads()} thread(s), {args.rounds} alternating rounds")
    for kind, make, train in (("training step", make_train_step, True), ("sampling step", make_sample_step, False)):
        flops = {k: flops_per_image(net, c, train) for k, net in nets.items()}
        steps = {k: make(net, c) for k, net in nets.items()}
        for step in steps.values():
            step()  # warm-up
        spent: dict[str, list[float]] = {k: [] for k in steps}
        names = list(steps)
        for r in range(args.rounds):
            for k in names[r % len(names):] + names[:r % len(names)]:
                t0 = time.perf_counter()
                steps[k]()
                spent[k].append(time.perf_counter() - t0)
        t = {k: statistics.median(v) for k, v in spent.items()}
        la_flops = flops["fast"] - flops["without"]
        bound = t["without"] * (1 + la_flops / flops["without"])  # the layers at the rest's FLOP rate
        print(f"\n{kind}: fast U-Net {t['fast'] * 1e3:.0f} ms, without linear attention {t['without'] * 1e3:.0f} ms, "
              f"lucidrains {t['lucidrains'] * 1e3:.0f} ms")
        print(f"- linear attention: {1 - t['without'] / t['fast']:.1%} of the time, {la_flops / flops['fast']:.1%} of the FLOPs")
        print(f"- with linear attention at the rest's rate: {bound * 1e3:.0f} ms ({t['fast'] / bound:.2f}x faster)")
        print(f"- against lucidrains: {t['lucidrains'] / t['fast']:.2f}x now, {t['lucidrains'] / bound:.2f}x at that bound")


if __name__ == "__main__":
    main()
