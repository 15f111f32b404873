"""Training and sampling throughput of ddpm_course's UNet, plain and fast, against lucidrains' and diffusers' U-Nets.

Run: `python benchmarks/bench_unet.py` (the peers need `pip install -e ".[bench]"` for lucidrains'
denoising-diffusion-pytorch, and diffusers from the dev extras; a peer that is not installed is left out).

Ours comes twice: `ddpm_course` is the plain U-Net of chapters 07-08, `ddpm_course_fast` the same network after
`ddpm_course.fast.make_fast` (chapter 08b), as training and sampling use it; with `--compile`, also
`ddpm_course_compiled`, `torch.compile` of the plain U-Net (its compile time is reported; no memory measurement).

All models are measured in this one process, in alternating rounds: in each round, for training and then for
sampling, every model takes a step, one after the other (the order rotating from round to round), and then a float32
matmul is timed. A shared machine's load thus hits all models alike, and the ratios between models, taken within a
round (seconds apart), hold even when the load changes between rounds. Reported: medians over the rounds of
- train: forward + backward + AdamW step on a batch of 32 images, 32x32, noise-prediction MSE; img/s;
- sample: one denoising forward pass at batch 64 under `torch.inference_mode`; img/s;
- MFU: FLOPs per image (`torch.utils.flop_counter`: matmuls, convolutions, attention; for training, forward and
  backward) times img/s, over the rate of a 1024^3 float32 matmul timed in the same round;
- ours / peer: the within-round ratio of speeds, and of MFUs (the speed ratio times the FLOPs ratio);
- peak memory: in a fresh subprocess per model and kind, the peak resident set during 2 steps minus the resident set
  just before them (model, optimiser and inputs built), so that one model's allocations cannot hide another's.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

SIZE = 32
TRAIN_BATCH = 32
SAMPLE_BATCH = 64
OURS = ("ddpm_course", "ddpm_course_fast", "ddpm_course_compiled")
MODELS = (*OURS, "lucidrains", "diffusers")

# Our UNet at lucidrains' configuration: `denoising_diffusion_pytorch.Unet(dim=32, dim_mults=(1, 2, 4))` has a 7x7
# first conv, scale-shift time conditioning from a GELU time MLP on [sin | cos] embeddings, space-to-depth + 1x1 conv
# down-sampling, nearest + 3x3 conv up-sampling, linear attention (4 heads x 32) on the outer levels and full
# attention (4 x 32) on the innermost level and in the middle. Its levels have two ResNet blocks each way, but its
# way down runs at the previous level's width (32, 32, 64 channels, against 32, 64, 128 on the way up), and it has one
# attention layer per level and direction where ours has one per ResNet block. Ours with num_res_blocks=1 (one block
# down, two up per level) is the closest in size: 2.98M parameters and 0.92 GFLOP per image forward against
# lucidrains' 2.61M and 0.85 (num_res_blocks=2 would be 4.34M and about 1.5 times the FLOPs). Its norms are
# GroupNorm(8) where lucidrains uses RMSNorm.
LUCIDRAINS_CONFIG = dict(
    dim=32, dim_mults=(1, 2, 4), num_res_blocks=1, attn=("linear", "linear", "full"), mid_attn="full", heads=4,
    dim_head=32, dropout=0.0, weight_standardize=False, time_cond="scale_shift", embedding="ddpm", time_act="gelu",
    groups=8, downsample="space_to_depth", init_kernel=7,
)


def build(name: str, channels: int) -> nn.Module:
    "One of the benchmarked U-Nets, at lucidrains' configuration (dim 32, dim_mults 1,2,4) or a similar size."
    torch.manual_seed(0)
    if name in OURS:
        from ddpm_course.fast import make_fast
        from ddpm_course.unet import UNet
        net = UNet(channels=channels, **LUCIDRAINS_CONFIG)
        return make_fast(net) if name == "ddpm_course_fast" else torch.compile(net) if name == "ddpm_course_compiled" else net
    if name == "lucidrains":
        from denoising_diffusion_pytorch import Unet
        return Unet(dim=32, dim_mults=(1, 2, 4), channels=channels)
    if name == "diffusers":  # 2.7M parameters: one ResNet block per level, attention at the lowest level
        from diffusers import UNet2DModel
        return UNet2DModel(sample_size=SIZE, in_channels=channels, out_channels=channels,
                           block_out_channels=(32, 64, 128), layers_per_block=1, norm_num_groups=8,
                           down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), attention_head_dim=32)
    raise ValueError(f"unknown model {name!r}: expected one of {MODELS}")


def call(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    "The model's noise prediction, whatever its output type."
    out = model(x, t)
    return out.sample if hasattr(out, "sample") else out


def make_train_step(model: nn.Module, channels: int) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(TRAIN_BATCH, channels, SIZE, SIZE, generator=g)
    t = torch.randint(0, 1000, (TRAIN_BATCH,), generator=g)
    noise = torch.randn(x.shape, generator=g)

    def step() -> None:
        model.train()
        loss = nn.functional.mse_loss(call(model, x, t), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def make_sample_step(model: nn.Module, channels: int) -> Callable[[], None]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLE_BATCH, channels, SIZE, SIZE, generator=g)
    t = torch.full((SAMPLE_BATCH,), 500)

    def step() -> None:
        model.eval()
        with torch.inference_mode():
            call(model, x, t)
    return step


def make_matmul(n: int = 1024) -> Callable[[], None]:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return lambda: a @ b


def _sdpa_cpu(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(q, k, v)


def _sdpa_cpu_backward(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    return 2 * sdpa_flop_count(q, k, v)  # the two matmuls' gradients; not the recomputation of the weights


# FlopCounterMode knows the CUDA fused attention kernels but not the CPU one: without these, every
# F.scaled_dot_product_attention on CPU would count as 0 FLOPs
_aten = torch.ops.aten
CPU_SDPA_FLOPS = {_aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu,
                  _aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward}


def flops_per_image(model: nn.Module, channels: int, train: bool) -> float:
    "FLOPs of one training step (forward + backward, not the optimiser) or one sampling forward, per image."
    batch = 4
    x = torch.randn(batch, channels, SIZE, SIZE)
    t = torch.randint(0, 1000, (batch,))
    model.train(train)
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as counter:
        if train:
            call(model, x, t).square().mean().backward()
        else:
            with torch.inference_mode():
                call(model, x, t)
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


_MEMORY_SCRIPT = """
import sys, torch
sys.path.insert(0, {here!r})
import bench_unet as b
torch.set_num_threads({threads})
m = b.build({name!r}, {channels})
step = (b.make_train_step if {kind!r} == "train" else b.make_sample_step)(m, {channels})
def status(key):  # kB
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the present resident set
except OSError:
    pass
before = status("VmRSS:")
for _ in range(2):
    step()
print(status("VmHWM:") - before)
"""


def peak_memory_mb(name: str, channels: int, kind: str, threads: int) -> float:
    """Peak resident memory (MB) that 2 steps of `kind` add to the built model, in a fresh subprocess (Linux).

    Read from /proc/self/status: `ru_maxrss` will not do, as Linux carries it over from the parent through fork and
    exec, so a child would report at least this process's own resident set."""
    code = _MEMORY_SCRIPT.format(here=str(Path(__file__).resolve().parent), threads=threads, name=name,
                                 channels=channels, kind=kind)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) / 1024


def measure(names: list[str], channels: int, rounds: int, steps: int, threads: int, memory: bool) -> dict:
    models = {n: build(n, channels) for n in names}
    batch = {"train": TRAIN_BATCH, "sample": SAMPLE_BATCH}
    steps_of = {"train": make_train_step, "sample": make_sample_step}
    fns = {(n, kind): steps_of[kind](m, channels) for kind in batch for n, m in models.items()}
    matmul = make_matmul()
    warmup_s = {}
    for key, fn in (*fns.items(), (None, matmul)):  # warm-up: allocator, oneDNN primitive caches, compilation
        start = time.perf_counter()
        fn()
        warmup_s[key] = time.perf_counter() - start
    # rounds: each kind, the models one after the other (the order rotating from round to round), then the matmul;
    # a model's rate and its ratio to a peer are taken within a round, seconds apart, then the median over rounds
    rates: dict[tuple[str, str], list[float]] = {key: [] for key in fns}
    matmul_rates: list[float] = []
    for r in range(rounds):
        for kind in batch:
            for n in names[r % len(names):] + names[:r % len(names)]:
                start = time.perf_counter()
                for _ in range(steps):
                    fns[(n, kind)]()
                rates[(n, kind)].append(steps * batch[kind] / (time.perf_counter() - start))
        start = time.perf_counter()
        for _ in range(4):
            matmul()
        matmul_rates.append(4 * 2 * 1024**3 / (time.perf_counter() - start))
        print(f"  {channels} channel(s): round {r + 1}/{rounds}", file=sys.stderr, flush=True)
    result = {"channels": channels, "matmul_gflops": statistics.median(matmul_rates) / 1e9,
              "matmul_gflops_rounds": [x / 1e9 for x in matmul_rates], "models": {}}
    for n, m in models.items():
        res = dict(params=sum(p.numel() for p in m.parameters()))
        for kind in batch:
            res[f"{kind}_first_step_s"] = warmup_s[(n, kind)]
            f = flops_per_image(getattr(m, "_orig_mod", m), channels, kind == "train")
            res[f"{kind}_img_s"] = statistics.median(rates[(n, kind)])
            res[f"{kind}_img_s_rounds"] = rates[(n, kind)]
            res[f"{kind}_gflop_img"] = f / 1e9
            res[f"{kind}_mfu"] = statistics.median(x * f / mm for x, mm in zip(rates[(n, kind)], matmul_rates))
            measured = memory and n != "ddpm_course_compiled"
            res[f"{kind}_peak_mb"] = peak_memory_mb(n, channels, kind, threads) if measured else float("nan")
        result["models"][n] = res
    for o in OURS:  # per-round ratios: ours / peer, in speed and in MFU (FLOPs per image times speed)
        ours = result["models"].get(o)
        if ours is None:
            continue
        ours["vs"] = {}
        for n, peer in result["models"].items():
            if n == o:
                continue
            r = ours["vs"][n] = {}
            for kind in batch:
                speed = [a / b for a, b in zip(ours[f"{kind}_img_s_rounds"], peer[f"{kind}_img_s_rounds"])]
                r[f"{kind}_speed"] = statistics.median(speed)
                r[f"{kind}_mfu"] = r[f"{kind}_speed"] * ours[f"{kind}_gflop_img"] / peer[f"{kind}_gflop_img"]
                r[f"{kind}_peak_memory"] = ours[f"{kind}_peak_mb"] / peer[f"{kind}_peak_mb"]
    return result


def report(result: dict) -> None:
    ms = result["models"]
    mm = result["matmul_gflops_rounds"]
    print(f"\n### {result['channels']} channel(s), 32x32: train batch {TRAIN_BATCH}, sample batch {SAMPLE_BATCH}; "
          f"float32 matmul {result['matmul_gflops']:.0f} GFLOP/s (median of rounds; range {min(mm):.0f}-{max(mm):.0f})\n")
    print("| model | params | train img/s | sample img/s | train GFLOP/img | sample GFLOP/img | train MFU | sample MFU "
          "| train peak MB | sample peak MB |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for n, m in ms.items():
        print(f"| {n} | {m['params']:,} | {m['train_img_s']:.1f} | {m['sample_img_s']:.1f} | {m['train_gflop_img']:.2f} "
              f"| {m['sample_gflop_img']:.2f} | {m['train_mfu']:.0%} | {m['sample_mfu']:.0%} | {m['train_peak_mb']:.0f} "
              f"| {m['sample_peak_mb']:.0f} |")
    for o in OURS:
        if o not in ms:
            continue
        print(f"\n{o} against each model (speed and MFU: median over rounds of the within-round ratio):\n")
        for n, r in ms[o]["vs"].items():
            print(f"- / {n}: speed train {r['train_speed']:.2f}x, sample {r['sample_speed']:.2f}x; "
                  f"MFU train {r['train_mfu']:.2f}x, sample {r['sample_mfu']:.2f}x; "
                  f"peak memory train {r['train_peak_memory']:.2f}x, sample {r['sample_peak_memory']:.2f}x")
    if "ddpm_course_compiled" in ms:
        c = ms["ddpm_course_compiled"]
        print(f"\nddpm_course_compiled: first (compiling) step {c['train_first_step_s']:.0f} s in training, "
              f"{c['sample_first_step_s']:.0f} s in sampling")
    fast = ms.get("ddpm_course_fast")
    if not fast:
        return
    vs = fast["vs"]
    goals = []
    if "lucidrains" in vs:
        goals += [("train >= 1.5x lucidrains", vs["lucidrains"]["train_speed"] >= 1.5),
                  ("sample (batch 64) >= 2x lucidrains", vs["lucidrains"]["sample_speed"] >= 2),
                  ("train peak memory <= lucidrains", "not measured" if math.isnan(vs["lucidrains"]["train_peak_memory"])
                   else vs["lucidrains"]["train_peak_memory"] <= 1)]
    if "diffusers" in vs:
        goals += [("train MFU >= 1.1x diffusers", vs["diffusers"]["train_mfu"] >= 1.1),
                  ("sample MFU >= 1.1x diffusers", vs["diffusers"]["sample_mfu"] >= 1.1)]
    print()
    for goal, met in goals:
        print(f"- goal (ddpm_course_fast) {goal}: {'met' if met is True else 'NOT met' if met is False else met}")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=[m for m in MODELS if m != "ddpm_course_compiled"], choices=MODELS)
    p.add_argument("--compile", action="store_true", help="also measure torch.compile of the plain U-Net")
    p.add_argument("--channels", nargs="+", type=int, default=[1, 3])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=1, help="steps per model, kind and round")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: torch's)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--json", help="also write the raw results to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    names = []
    for n in args.models + (["ddpm_course_compiled"] if args.compile and "ddpm_course_compiled" not in args.models else []):
        package = {"lucidrains": "denoising_diffusion_pytorch", "diffusers": "diffusers"}.get(n, "ddpm_course")
        if importlib.util.find_spec(package) is None:
            print(f"leaving out {n}: {package} is not installed (pip install -e '.[bench]')", file=sys.stderr)
        else:
            names.append(n)
    started = time.time()
    print(f"{datetime.datetime.now():%Y-%m-%d %H:%M}; {cpu_name()}, {os.cpu_count()} "
          f"logical CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; load average at start "
          f"{os.getloadavg()[0]:.1f}; MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', '(unset)')}; "
          f"command: python {' '.join(sys.argv)}")
    results = [measure(names, c, args.rounds, args.steps, args.threads, not args.no_memory) for c in args.channels]
    for r in results:
        report(r)
    print(f"\n{time.time() - started:.0f} s; load average at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": sys.argv, "torch": torch.__version__, "threads": args.threads, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
